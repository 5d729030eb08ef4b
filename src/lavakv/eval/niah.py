"""Needle in a haystack: one invented fact hidden at a chosen depth of a long essay text.

The haystack is Paul Graham's essays (shipped as package data), cut so that the whole prompt
has the requested number of tokens for the tokenizer at hand. The needle goes at the sentence
boundary nearest to the requested depth, so the text around it stays natural. Needles are
sentences with word answers rather than numbers: the default SmolLM2 spells numbers one digit
per token, and word answers with partial credit (``needle_recall``) separate compression methods
more finely than all-or-nothing digit strings.

The helpers here (essay loading, token counting, length fitting, needle insertion) are shared
with :mod:`lavakv.eval.ruler`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from lavakv.eval.samples import Sample

_SENTENCE_END = re.compile(r"[.!?]\s+")


@dataclass(frozen=True)
class Needle:
    """A fact whose sentence is ``cue + " " + answer + "."``; the prompt ends with ``cue`` for the model to finish."""

    cue: str
    answer: str
    question: str

    @property
    def sentence(self) -> str:
        return f"{self.cue} {self.answer}."


# Facts a model cannot guess from the cue. The first two are answered by SmolLM2 with the full
# cache and not without the needle; the tomato-soup answer is half guessable ("smoked paprika").
NEEDLES: tuple[Needle, ...] = (
    Needle(
        "The lighthouse keeper on Marrow Island spends every evening",
        "painting seagulls with old watercolors",
        "How does the lighthouse keeper on Marrow Island spend every evening?",
    ),
    Needle(
        "The password to the vault of the old city library is",
        "purple elephants dancing in the rain",
        "What is the password to the vault of the old city library?",
    ),
    Needle(
        "The secret ingredient in Grandma Rosa's tomato soup is",
        "smoked paprika and a spoonful of honey",
        "What is the secret ingredient in Grandma Rosa's tomato soup?",
    ),
    Needle(
        "The best way to calm a nervous horse is",
        "humming a slow lullaby while brushing its mane",
        "What is the best way to calm a nervous horse?",
    ),
    Needle(
        "Captain Moreau buried the stolen gold",
        "beneath the crooked olive tree behind the chapel",
        "Where did Captain Moreau bury the stolen gold?",
    ),
    Needle(
        "The favorite hobby of the mayor of Brightwater is",
        "building tiny sailing ships inside glass bottles",
        "What is the favorite hobby of the mayor of Brightwater?",
    ),
)

NIAH_MAX_NEW_TOKENS = 32
"""Tokens a needle answer may take."""
NIAH_INSTRUCTION = "Read the text below carefully. A question about one fact in it follows at the end.\n\n"


@functools.lru_cache(maxsize=1)
def _essays() -> tuple[str, ...]:
    folder = resources.files("lavakv.eval").joinpath("data", "paul_graham_essays")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}; the lavakv package data is incomplete")
    return tuple(f.read_text(encoding="utf-8").strip() for f in files)


def load_essays() -> str:
    """All shipped essays in file-name order, joined with blank lines: a fixed haystack for every run."""
    return "\n\n".join(_essays())


@functools.lru_cache(maxsize=1)
def essay_vocabulary() -> tuple[str, ...]:
    """Distinct all-lowercase alphabetic words of 4+ letters in the essays, sorted so seeded picks are stable."""
    words = {w for w in re.findall(r"[A-Za-z]+", load_essays()) if len(w) >= 4 and w.islower()}
    return tuple(sorted(words))


def count_tokens(tokenizer, text: str, special_tokens: bool = False) -> int:
    """Tokens of ``text``; with ``special_tokens`` as the runner prefills a context (BOS included, if any)."""
    if special_tokens:
        return len(tokenizer(text)["input_ids"])
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_tokens(tokenizer, context: str, question: str) -> int:
    """Prompt length as the runner sees it: the context and the question are tokenized separately."""
    return count_tokens(tokenizer, context, special_tokens=True) + count_tokens(tokenizer, question)


def length_tolerance(length: int) -> int:
    """How far below ``length`` a generated prompt may end: 2 %, or 8 tokens for short prompts."""
    return max(8, int(0.02 * length))


def check_lengths(lengths: Sequence[int]) -> list[int]:
    """Reject non-integers, non-positive and repeated lengths early, before any tokenization."""
    if isinstance(lengths, (int, str)) or not lengths:
        raise ValueError(f"lengths must be a non-empty list of token counts, got {lengths!r}")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"lengths must be integers (tokens), got {length!r} of type {type(length).__name__}")
        if length <= 0:
            raise ValueError(f"length {length} must be a positive number of tokens")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must not repeat (they name the samples), got {list(lengths)}")
    return list(lengths)


class EssayHaystack:
    """The essays tokenized once, so a haystack of ``n`` tokens is a decode of the first ``n`` ids.

    Essays are tokenized one by one: no tokenizer length warnings, and the ids are as good a basis
    as one long tokenization because every prompt is measured again after assembly anyway.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for index, essay in enumerate(_essays()):
            if index:
                ids.extend(separator)
            ids.extend(tokenizer(essay, add_special_tokens=False)["input_ids"])
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def text(self, num_tokens: int) -> str:
        """Essay text of about ``num_tokens`` tokens, cut after a word and closed with a period.

        The period makes the end a sentence boundary too, so a needle at depth 1 follows a
        complete-looking sentence like at any other depth.
        """
        if num_tokens <= 0:
            return ""
        text = self.tokenizer.decode(self.ids[:num_tokens]).replace("\ufffd", "").rstrip()
        if num_tokens < len(self.ids):
            cut = max(text.rfind(" "), text.rfind("\n"))
            text = text[:cut] if cut > 0 else ""
        text = text.rstrip(" \t\n,;:-'\"([")
        return text if not text or text.endswith((".", "!", "?")) else text + "."


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence may be inserted: the start, after '.', '!' or '?' plus whitespace, the end."""
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(text)] + [len(text)]
    return sorted(set(bounds))


def insert_sentences(text: str, inserts: Sequence[tuple[int, str]]) -> tuple[str, list[int]]:
    """Insert sentences at boundary offsets of ``text``; returns the new text and where each sentence starts.

    Sentences at the same offset keep their given order. At the end of a non-empty text a space
    precedes the sentence; elsewhere the sentence is followed by one.
    """
    order = sorted(range(len(inserts)), key=lambda i: (inserts[i][0], i))
    pieces: list[str] = []
    starts = [0] * len(inserts)
    done = 0
    length = 0
    for i in order:
        offset, sentence = inserts[i]
        pieces.append(text[done:offset])
        length += offset - done
        done = offset
        if offset == len(text) and text:
            pieces.append(" ")
            length += 1
            starts[i] = length
            pieces.append(sentence)
            length += len(sentence)
        else:
            starts[i] = length
            pieces.append(sentence + " ")
            length += len(sentence) + 1
    pieces.append(text[done:])
    return "".join(pieces), starts


def nearest_boundary(tokenizer, text: str, depth: float) -> int:
    """The sentence boundary whose token offset is nearest to ``depth`` of the text's tokens (binary search)."""
    bounds = sentence_boundaries(text)
    target = depth * count_tokens(tokenizer, text)
    counts: dict[int, int] = {}

    def tokens_before(i: int) -> int:
        if i not in counts:
            counts[i] = count_tokens(tokenizer, text[: bounds[i]])
        return counts[i]

    lo, hi = 0, len(bounds) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if tokens_before(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    if lo > 0 and target - tokens_before(lo - 1) <= tokens_before(lo) - target:
        lo -= 1
    return bounds[lo]


def fit_length(measure: Callable[[int], int], length: int, max_size: int, slope: float, what: str) -> int:
    """The largest size ``n`` (haystack tokens, list items...) whose prompt of ``measure(n)`` tokens fits ``length``.

    Prompt tokens grow with ``n`` but not exactly linearly (tokens merge across joins), so secant
    steps narrow a bracket instead of trusting one estimate; a handful of tokenizations suffices.
    Raises ``ValueError`` naming the minimum or maximum when ``length`` cannot be reached.
    """
    tolerance = length_tolerance(length)
    close_enough = max(1, tolerance // 4)
    aim = length - close_enough // 2
    lo, t_lo = 0, measure(0)
    if t_lo > length:
        raise ValueError(f"{what}: length {length} is too short; it needs at least {t_lo} tokens")
    hi = max_size + 1
    n_prev, t_prev = lo, t_lo
    n = round((aim - t_lo) / slope)
    for _ in range(64):
        if length - t_lo <= close_enough or hi - lo <= 1:
            break
        n = min(max(n, lo + 1), hi - 1)
        t = measure(n)
        if t <= length:
            lo, t_lo = n, t
        else:
            hi = n
        if n != n_prev and (t - t_prev) / (n - n_prev) > 0:
            slope = (t - t_prev) / (n - n_prev)
        n_prev, t_prev = n, t
        n = n + round((aim - t) / slope)
    if length - t_lo > tolerance:
        if lo >= max_size:
            raise ValueError(f"{what}: length {length} exceeds the maximum of about {t_lo} tokens")
        raise RuntimeError(f"{what}: could not fit {length} tokens (closest below: {t_lo}, tolerance {tolerance})")
    return lo


def _check_depths(depths: Sequence[float]) -> list[float]:
    if isinstance(depths, (int, float, str)) or not depths:
        raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {depths!r}")
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)):
            raise TypeError(f"depths must be numbers in [0, 1], got {depth!r}")
        if math.isnan(depth) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside the valid range [0, 1]")
    return [float(d) for d in depths]


def _token_index(tokenizer, text: str, start: int) -> int:
    """Index of the token of ``text`` (tokenized with special tokens) where the character ``start`` begins.

    Counting the tokens before ``start`` is off by one when the whitespace before it merges into
    the next word (" The"), so count up to the whitespace and skip a whitespace-only token.
    """
    index = count_tokens(tokenizer, text[:start].rstrip(), special_tokens=True)
    ids = tokenizer(text)["input_ids"]
    if index < len(ids) and not tokenizer.decode(ids[index : index + 1]).strip():
        index += 1
    return index


def _niah_question(needle: Needle) -> str:
    return f"\n\nQuestion: {needle.question}\nAnswer: {needle.cue}"


def niah_samples(tokenizer, lengths: list[int], depths: list[float], seed: int = 0) -> list[Sample]:
    """One needle-in-a-haystack sample per (length, depth), each prompt ``length`` tokens long for ``tokenizer``.

    ``tokenizer`` is any HuggingFace-style tokenizer (called with ``add_special_tokens``, with
    ``decode``). Prompts land within 2 % (at least 8 tokens) below ``length``, never above it.
    The needle is ``NEEDLES[seed % 6]`` for every sample, and the haystack is always the essays'
    beginning, so the grid compares lengths and depths on the same text and the same fact, and a
    sample id always names the same prompt whatever else a run asks for. Prompts are plain text
    (``chat_template=False``): the small default model answers needle questions more reliably so.
    """
    lengths = check_lengths(lengths)
    depths = _check_depths(depths)
    ids = [f"len{length}-depth{depth:.2f}" for length in lengths for depth in depths]
    if len(set(ids)) != len(ids):
        raise ValueError(f"depths must differ at two decimals (they name the samples), got {depths}")
    overheads = [
        prompt_tokens(tokenizer, NIAH_INSTRUCTION + needle.sentence, _niah_question(needle)) for needle in NEEDLES
    ]
    shortest = min(lengths)
    if shortest < max(overheads):
        raise ValueError(
            f"length {shortest} is too short: the instruction, needle and question need at least "
            f"{max(overheads)} tokens"
        )
    haystack = EssayHaystack(tokenizer)
    longest = max(lengths)
    if longest > min(overheads) + len(haystack):
        raise ValueError(
            f"length {longest} exceeds the maximum of about {min(overheads) + len(haystack)} tokens "
            "that the essays can fill"
        )
    needle = NEEDLES[seed % len(NEEDLES)]
    return [_niah_sample(tokenizer, haystack, needle, length, depth) for length in lengths for depth in depths]


def _niah_sample(tokenizer, haystack: EssayHaystack, needle: Needle, length: int, depth: float) -> Sample:
    question = _niah_question(needle)

    def measure(n: int) -> int:
        text = haystack.text(n)
        context = NIAH_INSTRUCTION + insert_sentences(text, [(len(text), needle.sentence)])[0]
        return prompt_tokens(tokenizer, context, question)

    what = f"niah at length {length}"
    size = fit_length(measure, length, len(haystack), 1.0, what)
    # The needle's final place can shift the count by a token or two; shrink until it fits.
    for _ in range(8):
        text = haystack.text(size)
        offset = nearest_boundary(tokenizer, text, depth)
        body, (start,) = insert_sentences(text, [(offset, needle.sentence)])
        context = NIAH_INSTRUCTION + body
        total = prompt_tokens(tokenizer, context, question)
        if total <= length:
            break
        size -= total - length
    if not length - length_tolerance(length) <= total <= length:
        raise RuntimeError(f"{what}: could not fit the prompt ({total} tokens)")
    start += len(NIAH_INSTRUCTION)
    return Sample(
        benchmark="niah",
        dataset="niah",
        sample_id=f"len{length}-depth{depth:.2f}",
        context=context,
        question=question,
        answers=[needle.answer],
        max_new_tokens=NIAH_MAX_NEW_TOKENS,
        metric="needle_recall",
        chat_template=False,
        extra={
            "length": length,
            "depth": depth,
            "prompt_tokens": total,
            "needle_start_token": _token_index(tokenizer, context, start),
            "needle": needle.sentence,
        },
        stop_at_newline=True,
    )
