"""Scoring functions for every benchmark, keyed by the name a :class:`Sample` carries in ``metric``.

Each metric has the signature ``(prediction, answers, extra) -> float`` and returns a score in
[0, 1]; ``extra`` is :attr:`Sample.extra`. Unless its docstring says otherwise a metric scores the
prediction against each reference answer and keeps the best score, as LongBench does. An empty (or
whitespace-only) prediction scores 0.0 under every metric; an empty ``answers`` list is a
:class:`ValueError`, since it would otherwise silently score 0.

The rules are the benchmarks' own: LongBench (Bai et al. 2023, THUDM/LongBench ``metrics.py``),
RULER (Hsieh et al. 2024) and InfiniteBench (Zhang et al. 2024, ``compute_scores.py``), with the
libraries LongBench scores with (``rouge`` for ROUGE-L, ``jieba`` for Chinese words) and
fuzzywuzzy's ratio reproduced by :func:`fuzz_ratio`, so that scores stand next to published ones.
Where an official rule looks odd (the list walk of ``classification``, full-width digits in
``count``), it is kept and the docstring says so.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

from lavakv.eval.samples import Sample

Metric = Callable[[str, list[str], dict], float]

__all__ = ["METRICS", "SCORING", "Metric", "score"]

SCORING = "official"
"""The scoring rules a run records in its identity: the benchmarks' own (a run scored otherwise is not resumed)."""

_ASCII_PUNCT = frozenset(string.punctuation)
# Full-width forms (U+FF01-FF5E) of the ASCII punctuation, common in Chinese text; several are
# Unicode symbols (category S), not punctuation (category P), so they are listed explicitly.
_FULLWIDTH_PUNCT = frozenset(chr(ord(c) + 0xFEE0) for c in string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"\w+")
# LongBench's Chinese punctuation (normalize_zh_answer), with ASCII punctuation.
_ZH_PUNCT = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」"
    + "『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_DIGITS = re.compile(r"\d+")
_PARAGRAPH = re.compile(r"Paragraph (\d+)")
_PARAGRAPH_ZH = re.compile(r"段落(\d+)")
_INT = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_LETTERS = "ABCD"

#: Words :func:`needle_recall` ignores in the answer, besides one-character words.
NEEDLE_STOP_WORDS = frozenset({"a", "an", "the", "and", "or", "of", "to", "in", "on", "at", "by", "for", "with", "is"})


def _is_punct(char: str) -> bool:
    return char in _ASCII_PUNCT or char in _FULLWIDTH_PUNCT or unicodedata.category(char).startswith("P")


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError(f"answers must be a list of strings, not a string: {answers!r}")
    if len(answers) == 0:
        raise ValueError("answers is empty: a sample needs at least one reference answer to be scored")


def _best_over_answers(fn: Callable[[str, str, dict], float] | None = None, *, blank_scores_zero: bool = True):
    """Turn a (prediction, one answer, extra) scorer into a metric taking the max over answers.

    A blank prediction scores 0 without calling ``fn``, unless ``blank_scores_zero`` is false for a
    scorer whose official rule gives whitespace a score of its own (LongBench's code similarity).
    """

    def wrap(fn: Callable[[str, str, dict], float]) -> Metric:
        @functools.wraps(fn)
        def metric(prediction: str, answers: list[str], extra: dict | None = None) -> float:
            _check_answers(answers)
            if blank_scores_zero and not prediction.strip():
                return 0.0
            return max(fn(prediction, answer, extra or {}) for answer in answers)

        return metric

    return wrap(fn) if fn is not None else wrap


def _all_answers(fn: Callable[[str, list[str], dict], float]) -> Metric:
    """Add the shared empty-answers / empty-prediction handling to a metric that sees all answers."""

    @functools.wraps(fn)
    def metric(prediction: str, answers: list[str], extra: dict | None = None) -> float:
        _check_answers(answers)
        if not prediction.strip():
            return 0.0
        return fn(prediction, list(answers), extra or {})

    return metric


def _f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _normalize_en(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop ASCII punctuation and articles, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --------------------------------------------------------------------------------------- LongBench


@_best_over_answers
def qa_f1(prediction: str, answer: str, extra: dict) -> float:
    """Token-level F1 after SQuAD-style normalisation (LongBench, Bai et al. 2023: ``qa_f1_score``).

    Lowercase, remove ASCII punctuation, remove the articles a/an/the, split on whitespace; F1 of
    the bag-of-tokens overlap. Max over answers.
    """
    return _f1(_normalize_en(prediction).split(), _normalize_en(answer).split())


def _jieba_words(text: str) -> list[str]:
    """jieba's precise-mode segmentation (``cut_all=False``), the one LongBench scores Chinese with."""
    import jieba

    if not getattr(_jieba_words, "quiet", False):
        jieba.setLogLevel(logging.WARNING)
        _jieba_words.quiet = True
    return list(jieba.cut(text, cut_all=False))


def _normalize_zh(token: str) -> str:
    """LongBench's ``normalize_zh_answer``: lowercase, drop its punctuation set, drop all whitespace."""
    return "".join(c for c in token.lower() if c not in _ZH_PUNCT and not c.isspace())


@_best_over_answers
def qa_f1_zh(prediction: str, answer: str, extra: dict) -> float:
    """F1 over jieba words (LongBench, Bai et al. 2023: ``qa_f1_zh_score``).

    Both texts are segmented by jieba in precise mode; each word is normalised (lowercase,
    ASCII and Chinese punctuation and whitespace removed) and words left empty are dropped. Max
    over answers.
    """
    words = [w for w in map(_normalize_zh, _jieba_words(prediction)) if w]
    reference = [w for w in map(_normalize_zh, _jieba_words(answer)) if w]
    return _f1(words, reference)


def _rouge_package_l(prediction: str, answer: str) -> float:
    """ROUGE-L F of the ``rouge`` package (1.0.1), LongBench's ``rouge_score``: 0.0 when it raises.

    The package splits sentences on ``"."`` and words on spaces, keeps case, and takes the union
    LCS of each reference sentence over the prediction's sentences. It raises on an empty text
    (and recurses past Python's limit on very long sentences); LongBench scores any failure 0.
    """
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [answer], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 - LongBench scores every failure of the package as 0
        return 0.0


@_best_over_answers
def rouge_l(prediction: str, answer: str, extra: dict) -> float:
    """ROUGE-L F of the ``rouge`` package, as LongBench (Bai et al. 2023: ``rouge_score``) computes it.

    Sentences split on ``"."``, words on spaces, case kept, union LCS per reference sentence (see
    :func:`_rouge_package_l`). Max over answers.
    """
    return _rouge_package_l(prediction, answer)


@_best_over_answers
def rouge_l_zh(prediction: str, answer: str, extra: dict) -> float:
    """ROUGE-L over jieba words (LongBench, Bai et al. 2023: ``rouge_zh_score``).

    Both texts are segmented by jieba in precise mode and joined with spaces, then scored by
    :func:`rouge_l`'s package. Max over answers.
    """
    return _rouge_package_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(answer)))


@_best_over_answers
def classification(prediction: str, answer: str, extra: dict) -> float:
    """Class-name matching (LongBench, Bai et al. 2023: ``classification_score``); needs ``extra["all_classes"]``.

    The class names of ``all_classes`` (in their order, duplicates kept) found as substrings of
    the prediction form a list. LongBench then walks that list by index and removes each name
    that is part of the answer without being it; a removal shifts the list, so the name right
    after a removed one is never checked (classes A, AB and ABC all in the prediction, answer ABC:
    A is removed, AB is skipped, the score is 1/2). Score 1/len(list) if the answer is in the
    list, else 0. Case-sensitive. Max over answers.
    """
    all_classes = extra.get("all_classes")
    if not all_classes:
        raise ValueError("the classification metric needs a non-empty extra['all_classes']")
    matched = [name for name in all_classes if name in prediction]
    index = 0
    while index < len(matched):
        name = matched[index]
        if name in answer and name != answer:
            matched.remove(name)
        index += 1
    return 1.0 / len(matched) if answer in matched else 0.0


def _fraction_equal(prediction: str, target: str) -> float:
    """The share of the prediction's ``\\d+`` runs (Unicode digits, full-width included) equal to ``target``."""
    numbers = _DIGITS.findall(prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def _retrieval(prediction: str, answer: str, pattern: re.Pattern, label: str) -> float:
    found = pattern.search(answer)
    if found is None:
        raise ValueError(f"retrieval answer {answer!r} does not look like '{label}<number>'")
    return _fraction_equal(prediction, found.group(1))


@_best_over_answers
def retrieval(prediction: str, answer: str, extra: dict) -> float:
    """Passage retrieval (LongBench, Bai et al. 2023: ``retrieval_score``), answers like ``"Paragraph 12"``.

    The paragraph number is the first ``Paragraph (\\d+)`` of the answer (one space); the score is
    the fraction of the prediction's ``\\d+`` runs equal to it as strings (0 without any), so naming
    several paragraphs earns partial credit. Python's ``\\d`` matches full-width digits too, and a
    full-width number never equals an ASCII one. Max over answers.
    """
    return _retrieval(prediction, answer, _PARAGRAPH, "Paragraph ")


@_best_over_answers
def retrieval_zh(prediction: str, answer: str, extra: dict) -> float:
    """Chinese passage retrieval (LongBench, Bai et al. 2023: ``retrieval_zh_score``), answers like ``"段落12"``.

    As :func:`retrieval`, the number read by ``段落(\\d+)``. Max over answers.
    """
    return _retrieval(prediction, answer, _PARAGRAPH_ZH, "段落")


@_best_over_answers
def count(prediction: str, answer: str, extra: dict) -> float:
    """Passage counting (LongBench, Bai et al. 2023: ``count_score``).

    The fraction of the prediction's ``\\d+`` runs (Unicode digits) equal to the answer string as
    it is (not stripped); 0 if there is none. Max over answers.
    """
    return _fraction_equal(prediction, answer)


def fuzz_ratio(first: str, second: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` as LongBench installs it, without python-Levenshtein.

    100 for equal strings, 0 when either is empty, else ``round(100 * ratio)`` of
    :class:`difflib.SequenceMatcher` with its default junk heuristic (Python's rounding, half to
    even).
    """
    if first == second:
        return 100
    if not first or not second:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, first, second).ratio()))


@_best_over_answers(blank_scores_zero=False)
def code_sim(prediction: str, answer: str, extra: dict) -> float:
    """Edit similarity of the first code line (LongBench, Bai et al. 2023: ``code_sim_score``).

    The first line of the prediction (leading newlines stripped) that contains no backtick, ``#``
    or ``//`` (markdown fences and comments), or ``""`` if there is none, is compared with the
    answer by :func:`fuzz_ratio`, divided by 100. Max over answers. A line of spaces is compared too,
    as LongBench compares it.
    """
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if not any(mark in ln for mark in ("`", "#", "//"))),
        "",
    )
    return fuzz_ratio(line, answer) / 100


# ------------------------------------------------------------------------------------------- RULER


@_all_answers
def string_match_all(prediction: str, answers: list[str], extra: dict) -> float:
    """Fraction of the references found in the prediction, case-insensitive (RULER, Hsieh et al. 2024).

    Uses all references together (no max): finding 2 of 3 needles scores 2/3.
    """
    text = prediction.lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


@_all_answers
def string_match_part(prediction: str, answers: list[str], extra: dict) -> float:
    """1.0 if any reference occurs in the prediction, case-insensitive (RULER, Hsieh et al. 2024)."""
    text = prediction.lower()
    return float(any(answer.lower() in text for answer in answers))


# ------------------------------------------------------------------------------ Needle in a haystack


def _needle_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if len(w) > 1 and w not in NEEDLE_STOP_WORDS]


@_best_over_answers
def needle_recall(prediction: str, answer: str, extra: dict) -> float:
    """Fraction of the needle's content words that the prediction contains (needle-in-a-haystack).

    Words are the lowercased ``\\w+`` runs (punctuation separates words); in the answer,
    one-character words and :data:`NEEDLE_STOP_WORDS` are skipped, so recall measures the facts,
    not the phrasing. An answer made only of skipped words is scored on all its words. Max over answers.
    """
    words = _needle_words(answer) or _WORD.findall(answer.lower())
    if not words:
        return 0.0
    predicted = set(_WORD.findall(prediction.lower()))
    return sum(w in predicted for w in words) / len(words)


# ----------------------------------------------------------------------------------- InfiniteBench
# The rules of InfiniteBench's compute_scores.py (Zhang et al. 2024, OpenBMB/InfiniteBench), kept
# where they are stricter than a reader would be: they score the raw prediction, case and leading
# whitespace included, so a model that answers " B" after "The correct option is:" scores 0 on
# code_debug exactly as it does in the official harness.


def _blank_out(text: str, chars: Sequence[str]) -> str:
    for char in chars:
        text = text.replace(char, " ")
    return text


def _single_spaced(text: str) -> str:
    while "  " in text:
        text = text.replace("  ", " ")
    return text


_RETRIEVAL_SEPARATORS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


@_best_over_answers
def first_int_match(prediction: str, answer: str, extra: dict) -> float:
    """The first run of ASCII digits in the prediction equals the answer (InfiniteBench: passkey, number_string).

    InfiniteBench, Zhang et al. 2024 (``get_score_one_passkey`` / ``_number_string``): the
    prediction is split on every character that is not 0-9 and its first non-empty piece must equal
    the label, so only the first number counts and "7143 2" is not "71432".
    """
    found = _INT.search(prediction)
    return float(found is not None and found.group() == answer)


@_best_over_answers
def kv_retrieval_match(prediction: str, answer: str, extra: dict) -> float:
    """The value is one of the prediction's words (InfiniteBench, Zhang et al. 2024: kv_retrieval).

    The prediction's newlines and ``: " ' . , ? ! { }`` become spaces and it is split on whitespace;
    the label must equal one of the words, so ``[value]`` or ``value;`` does not match.
    """
    return float(answer in _blank_out(prediction, _RETRIEVAL_SEPARATORS).split())


@_best_over_answers
def dialogue_name_match(prediction: str, answer: str, extra: dict) -> float:
    """The masked character's name is one of the prediction's words, upper-cased (InfiniteBench: longdialogue_qa_eng).

    InfiniteBench, Zhang et al. 2024: the prediction is split as for kv_retrieval and every word is
    upper-cased; the label (the script's upper-case name) must equal one of them as it is.
    """
    return float(answer in [word.upper() for word in _blank_out(prediction, _RETRIEVAL_SEPARATORS).split()])


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)


@_best_over_answers
def rouge_lsum(prediction: str, answer: str, extra: dict) -> float:
    """ROUGE-Lsum F-measure from the ``rouge_score`` package (InfiniteBench, Zhang et al. 2024: longbook_sum_eng).

    What InfiniteBench computes with Hugging Face ``evaluate``'s ``rouge`` (which calls
    ``rouge_score`` without stemming): summary-level LCS over newline-separated sentences, with the
    package's own lowercasing alphanumeric tokenizer. Max over answers.
    """
    return _rouge_scorer().score(answer, prediction)["rougeLsum"].fmeasure


_MATH_FIND_NUMBER = re.compile(r"\d+\.\d+|\d+")


@_best_over_answers
def math_find_match(prediction: str, answer: str, extra: dict) -> float:
    r"""The first unsigned number in the prediction equals the answer (InfiniteBench, Zhang et al. 2024: math_find).

    The first match of ``\d+\.\d+|\d+`` is read as the label's type: an integer label (an answer
    without a ".") needs an integer there (a decimal such as "3.5" scores 0; the official scorer
    raises on it), a decimal label is compared as a float. Minus signs are not read, so a negative
    label never matches, as in the official scorer.
    """
    found = _MATH_FIND_NUMBER.search(prediction)
    if found is None:
        return 0.0
    try:
        if "." in answer:
            return float(float(found.group()) == float(answer))
        return float(int(found.group()) == int(answer))
    except ValueError:
        if not _NUMBER.fullmatch(answer.strip()):
            raise ValueError(f"math_find_match needs a numeric answer, got {answer!r}") from None
        return 0.0


@_all_answers
def math_calc_prefix(prediction: str, answers: list[str], extra: dict) -> float:
    """The share of the expected values the prediction gets right before its first mistake (InfiniteBench: math_calc).

    InfiniteBench, Zhang et al. 2024: ``answers`` are the expression's intermediate values in order;
    the prediction's runs of digits are read as integers (minus signs dropped, as the official
    scorer does) and compared position by position until the first difference.
    """
    try:
        expected = [int(value) for value in answers]
    except ValueError:
        raise ValueError(f"math_calc_prefix needs integer answers, got {answers!r:.200}") from None
    predicted = [int(run) for run in _INT.findall(prediction)]
    right = 0
    for value, guess in zip(expected, predicted):
        if value != guess:
            break
        right += 1
    return right / len(expected)


@_best_over_answers
def code_run_match(prediction: str, answer: str, extra: dict) -> float:
    """The prediction's last word is the returned integer (InfiniteBench, Zhang et al. 2024: code_run).

    The stripped prediction's newlines and ``. ` ' " :`` become spaces; its last word must parse as
    an integer equal to the label.
    """
    words = _blank_out(prediction.strip(), ("\n", ".", "`", "'", '"', ":")).split()
    try:
        return float(bool(words) and int(words[-1]) == int(answer))
    except ValueError:
        return 0.0


def _text_and_letter(answers: list[str], metric: str) -> tuple[str, str]:
    if len(answers) != 2 or answers[1] not in tuple(_LETTERS):
        raise ValueError(f"{metric} needs answers [option text, option letter A-D], got {answers!r:.200}")
    return answers[0], answers[1]


_CHOICE_SEPARATORS = ("\n", '"', "'", ".", ",", "?", "!", "{", "}")
_CHOICE_PREFIXES = ("answer is:", "answer:", "answer is", "option is")


@_all_answers
def book_choice(prediction: str, answers: list[str], extra: dict) -> float:
    """InfiniteBench's multiple-choice rule for longbook_choice_eng (Zhang et al. 2024).

    ``answers`` is the label as InfiniteBench builds it, ``[option text, option letter]``. In
    order: a prediction starting with A-D is that letter; else, with newlines and
    ``" ' . , ? ! { }`` made spaces, the text after the first of "answer is:", "answer:",
    "answer is", "option is" (lowercase, as written) must start with the text or the letter; else
    the first word that is a substring of "ABCD" must be the text or the letter.
    """
    label = _text_and_letter(answers, "book_choice")
    if prediction[0] in _LETTERS:
        return float(prediction[0] in label)
    text = _single_spaced(_blank_out(prediction, _CHOICE_SEPARATORS))
    for prefix in _CHOICE_PREFIXES:
        at = text.find(prefix)
        if at == -1:
            continue
        after = text[at + len(prefix) + 1 :]
        return float(len(text) >= at + len(prefix) + 1 and any(after.startswith(s) for s in label))
    for word in text.split():
        if word in _LETTERS:
            return float(word in label)
    return 0.0


_DEBUG_SEPARATORS = ("\n", "`", "'", '"', "-", "*", "Option", "option")
_DEBUG_PREFIXES = ("answer is:", "is:", "answer:")


@_all_answers
def code_debug_choice(prediction: str, answers: list[str], extra: dict) -> float:
    """InfiniteBench's rule for code_debug (Zhang et al. 2024): the option letter first, or after an answer prefix.

    ``answers`` is ``[function name, option letter]``. The prediction scores when it starts with the
    letter and "." or ":" ("B." or "B:", not " B" or "B"); else, stripped, with newlines, backticks,
    quotes, "-", "*" and "Option"/"option" made spaces, the text after the first of "answer is:",
    "is:", "answer:" must start with the letter or the function's name.
    """
    name, letter = _text_and_letter(answers, "code_debug_choice")
    if prediction[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    text = _single_spaced(_blank_out(prediction.strip(), _DEBUG_SEPARATORS))
    for prefix in _DEBUG_PREFIXES:
        at = text.find(prefix)
        if at == -1:
            continue
        rest = text[at + len(prefix) + 1 :]
        return float(len(text) >= at + len(prefix) + 1 and (rest.startswith(letter) or rest.startswith(name)))
    return 0.0


METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "needle_recall": needle_recall,
    "first_int_match": first_int_match,
    "kv_retrieval_match": kv_retrieval_match,
    "dialogue_name_match": dialogue_name_match,
    "rouge_lsum": rouge_lsum,
    "math_find_match": math_find_match,
    "math_calc_prefix": math_calc_prefix,
    "code_run_match": code_run_match,
    "book_choice": book_choice,
    "code_debug_choice": code_debug_choice,
}


def score(sample: Sample, prediction: str) -> float:
    """Score ``prediction`` for ``sample`` with the metric it names, applying ``extra["first_line"]``.

    With ``first_line`` set, only the prediction's first line counts (after leading newlines are
    stripped), as LongBench does for trec, triviaqa, samsum and lsht, whose few-shot prompts make
    models continue with further made-up examples.
    """
    metric = METRICS.get(sample.metric)
    if metric is None:
        raise ValueError(f"unknown metric {sample.metric!r}; valid metrics: {', '.join(sorted(METRICS))}")
    if sample.extra.get("first_line"):
        prediction = prediction.lstrip("\n").split("\n", 1)[0]
    return metric(prediction, sample.answers, sample.extra)
