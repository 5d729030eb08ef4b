"""Hand-computed cases for every metric in lavakv.eval.metrics."""

from __future__ import annotations

import pytest

from lavakv.eval import metrics
from lavakv.eval.metrics import METRICS, score
from lavakv.eval.samples import Sample

# A valid (answers, extra) pair for every metric, used by the tests that run over all of them.
VALID_INPUTS = {
    "qa_f1": (["Paris"], {}),
    "qa_f1_zh": (["北京"], {}),
    "rouge_l": (["the cat sat"], {}),
    "rouge_l_zh": (["我喜欢猫"], {}),
    "classification": (["city"], {"all_classes": ["city", "country"]}),
    "retrieval": (["Paragraph 3"], {}),
    "retrieval_zh": (["段落3"], {}),
    "count": (["4"], {}),
    "code_sim": (["return x"], {}),
    "string_match_all": (["123", "456"], {}),
    "string_match_part": (["123", "456"], {}),
    "needle_recall": (["eat a sandwich"], {}),
    "first_int_match": (["71432"], {}),
    "kv_retrieval_match": (["a1b2-c3d4"], {}),
    "dialogue_name_match": (["MARY"], {}),
    "rouge_lsum": (["the cat sat"], {}),
    "math_find_match": (["3"], {}),
    "math_calc_prefix": (["1", "3"], {}),
    "code_run_match": (["3"], {}),
    "book_choice": (["London", "B"], {}),
    "code_debug_choice": (["bad", "B"], {}),
}


def make_sample(metric: str, answers: list[str], **extra) -> Sample:
    return Sample(
        benchmark="test",
        dataset="test",
        sample_id="0",
        context="",
        question="",
        answers=answers,
        max_new_tokens=8,
        metric=metric,
        extra=extra,
    )


def test_metric_names():
    assert set(METRICS) == set(VALID_INPUTS)


# ------------------------------------------------------------------------------------ shared rules


@pytest.mark.parametrize("name", sorted(VALID_INPUTS))
@pytest.mark.parametrize("prediction", ["", "  \n\n "])
def test_empty_prediction_scores_zero(name, prediction):
    answers, extra = VALID_INPUTS[name]
    if name == "code_sim" and prediction.strip("\n"):
        pytest.skip("code_sim compares a line of spaces, as LongBench does (test_code_sim_scores_a_blank_line)")
    assert METRICS[name](prediction, answers, extra) == 0.0


@pytest.mark.parametrize("name", sorted(VALID_INPUTS))
def test_empty_answers_raise(name):
    _, extra = VALID_INPUTS[name]
    with pytest.raises(ValueError, match="answers is empty"):
        METRICS[name]("some prediction 3", [], extra)


@pytest.mark.parametrize("name", sorted(VALID_INPUTS))
def test_answers_given_as_a_string_raise(name):
    _, extra = VALID_INPUTS[name]
    with pytest.raises(TypeError, match="list of strings"):
        METRICS[name]("some prediction 3", "Paris", extra)


def test_unknown_metric_names_the_metric_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown metric 'bleu'") as info:
        score(make_sample("bleu", ["x"]), "x")
    assert "qa_f1" in str(info.value) and "string_match_all" in str(info.value)


# ---------------------------------------------------------------------------------------- qa_f1


def test_qa_f1_partial_overlap():
    # "the"/"a" are dropped: prediction [cat, sat], answer [cat, sat, down]: P = 2/2, R = 2/3, F1 = 0.8.
    assert METRICS["qa_f1"]("the cat sat", ["a cat sat down"], {}) == pytest.approx(0.8)


def test_qa_f1_normalisation():
    assert METRICS["qa_f1"]("The Cat, sat!", ["cat sat"], {}) == pytest.approx(1.0)
    assert METRICS["qa_f1"]("An apple.", ["apple"], {}) == pytest.approx(1.0)
    # "there" is not the article "the".
    assert METRICS["qa_f1"]("there", ["the"], {}) == 0.0


def test_qa_f1_counts_repeated_tokens_once_per_occurrence():
    # prediction [cat, cat], answer [cat]: overlap 1, P = 1/2, R = 1, F1 = 2/3.
    assert METRICS["qa_f1"]("cat cat", ["cat"], {}) == pytest.approx(2 / 3)


def test_qa_f1_max_over_answers():
    # vs "paris france": P = 1, R = 1/2, F1 = 2/3; vs "London": 0.
    assert METRICS["qa_f1"]("Paris", ["London", "Paris France"], {}) == pytest.approx(2 / 3)
    assert METRICS["qa_f1"]("Paris", ["London", "Paris France", "paris"], {}) == pytest.approx(1.0)
    assert METRICS["qa_f1"]("Rome", ["London", "Paris"], {}) == 0.0


def test_qa_f1_zh_counts_jieba_words():
    # jieba: [北京大学] vs [北京]: no common word (character F1 would give 2/3).
    assert METRICS["qa_f1_zh"]("北京大学", ["北京"], {}) == 0.0
    # [他, 毕业, 于, 北京大学] vs [北京大学]: P = 1/4, R = 1, F1 = 0.4.
    assert METRICS["qa_f1_zh"]("他毕业于北京大学", ["北京大学"], {}) == pytest.approx(0.4)
    # [GPT4, 模型] lowercased vs [gpt4]: P = 1/2, R = 1, F1 = 2/3.
    assert METRICS["qa_f1_zh"]("GPT4模型", ["gpt4"], {}) == pytest.approx(2 / 3)
    # Max over answers.
    assert METRICS["qa_f1_zh"]("北京大学", ["北京", "北京大学"], {}) == pytest.approx(1.0)


def test_qa_f1_zh_normalises_each_word_and_drops_empty_ones():
    # jieba: [（, 北, " ", 京, ，, 大学, 。, ）] -> [北, 京, 大学]: none equals 北京大学.
    assert METRICS["qa_f1_zh"]("（北 京，大学。）", ["北京大学"], {}) == 0.0
    # [北京, ，, 大学] -> [北京, 大学] vs [北京, 大学]: 1.
    assert METRICS["qa_f1_zh"]("北京，大学", ["北京 大学"], {}) == pytest.approx(1.0)


# -------------------------------------------------------------------------------------- rouge_l


def test_rouge_l_keeps_case_and_counts_distinct_words():
    # Words as split on spaces, case kept: hyp {The, cat, sat, on, the, mat} (6), ref {the, cat, is, on, mat} (5);
    # LCS [cat, on, the, mat] = 4: P = 4/6, R = 4/5, F = 8/11 (a lowercased LCS would give 5/6).
    assert METRICS["rouge_l"]("The cat sat on the mat.", ["the cat is on the mat"], {}) == pytest.approx(8 / 11)
    # Distinct words: hyp {x}, ref {x}, LCS {x}: 1 (a plain LCS over the three tokens gives 1/2).
    assert METRICS["rouge_l"]("x x x", ["x"], {}) == pytest.approx(1.0)


def test_rouge_l_splits_sentences_on_periods_and_unites_their_lcs():
    # Hyp sentences [a b], [c d]; the reference's union LCS with them is {a, b, c, d}: F = 1.
    assert METRICS["rouge_l"]("a b. c d", ["c d a b"], {}) == pytest.approx(1.0)
    # One sentence: LCS of [police killed the gunman] and [the gunman police killed] is 2 of 4.
    assert METRICS["rouge_l"]("police killed the gunman", ["the gunman police killed"], {}) == pytest.approx(0.5)


def test_rouge_l_failure_of_the_package_scores_zero():
    # Only periods: no sentence is left and the package raises; LongBench scores that 0.
    assert METRICS["rouge_l"]("...", ["a summary"], {}) == 0.0


def test_rouge_l_max_over_answers():
    assert METRICS["rouge_l"]("a b c d", ["x y", "b d e", "a b c d"], {}) == pytest.approx(1.0)
    # LCS [b, d]: P = 2/4, R = 2/3, F = 4/7.
    assert METRICS["rouge_l"]("a b c d", ["x y", "b d e"], {}) == pytest.approx(4 / 7)


def test_rouge_l_zh_scores_jieba_words():
    # [我, 喜欢, 猫, ！] vs [我, 也, 喜欢, 猫, 。]: LCS 3, P = 3/4, R = 3/5, F = 2/3.
    assert METRICS["rouge_l_zh"]("我喜欢猫！", ["我也喜欢猫。"], {}) == pytest.approx(2 / 3)
    # [猫, 喜欢, 我] vs [我, 喜欢, 猫]: LCS 1 of 3.
    assert METRICS["rouge_l_zh"]("猫喜欢我", ["我喜欢猫"], {}) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------- classification

CLASSES = {"all_classes": ["entity", "other entity", "city", "country"]}


def test_classification_overlapping_class_names():
    # "entity" only matched inside "other entity", so it is dropped.
    assert METRICS["classification"]("other entity", ["other entity"], CLASSES) == pytest.approx(1.0)
    # The answer "entity" is kept even though it is inside "other entity": 2 matches, 1/2.
    assert METRICS["classification"]("other entity", ["entity"], CLASSES) == pytest.approx(0.5)
    # LongBench drops only matches that sit inside the answer: city, entity, other entity all count: 1/3.
    assert METRICS["classification"]("city or other entity", ["city"], CLASSES) == pytest.approx(1 / 3)


def test_classification_skips_the_name_after_a_removed_one():
    # Matched [bird, bird of prey, bird of prey species]; "bird" is removed, which shifts the list,
    # so "bird of prey" is never checked and stays: 1/2, not 1.
    classes = {"all_classes": ["bird", "bird of prey", "bird of prey species", "fish"]}
    answer = ["bird of prey species"]
    assert METRICS["classification"]("bird of prey species", answer, classes) == pytest.approx(0.5)
    # Listed in another order, the walk reaches both shorter names and removes them: 1.
    reordered = {"all_classes": ["bird", "bird of prey species", "bird of prey", "fish"]}
    assert METRICS["classification"]("bird of prey species", answer, reordered) == pytest.approx(1.0)


def test_classification_wrong_and_exact():
    assert METRICS["classification"]("country", ["city"], CLASSES) == 0.0
    assert METRICS["classification"]("It is a city.", ["city"], CLASSES) == pytest.approx(1.0)
    # Case-sensitive, as in LongBench.
    assert METRICS["classification"]("City", ["city"], CLASSES) == 0.0


def test_classification_needs_all_classes():
    with pytest.raises(ValueError, match="all_classes"):
        METRICS["classification"]("city", ["city"], {})


# -------------------------------------------------------------------------- retrieval and count


def test_retrieval_several_numbers():
    # Numbers 12, 3, 12: two of three are right.
    prediction = "Paragraph 12, Paragraph 3 and Paragraph 12"
    assert METRICS["retrieval"](prediction, ["Paragraph 12"], {}) == pytest.approx(2 / 3)
    assert METRICS["retrieval"]("Paragraph 1", ["Paragraph 12"], {}) == 0.0
    assert METRICS["retrieval"]("I do not know", ["Paragraph 12"], {}) == 0.0


def test_retrieval_and_count_see_full_width_digits_as_numbers():
    # \d+ finds "１２" too, a number that is not "12": one of two right.
    assert METRICS["retrieval"]("Paragraph １２ or Paragraph 12", ["Paragraph 12"], {}) == pytest.approx(0.5)
    assert METRICS["retrieval"]("Paragraph １２", ["Paragraph 12"], {}) == 0.0
    assert METRICS["count"]("There are ５ or 5 paragraphs", ["5"], {}) == pytest.approx(0.5)


def test_retrieval_zh():
    assert METRICS["retrieval_zh"]("段落12和段落5", ["段落12"], {}) == pytest.approx(0.5)
    assert METRICS["retrieval_zh"]("段落5", ["段落12"], {}) == 0.0


def test_retrieval_rejects_malformed_answer():
    with pytest.raises(ValueError, match="Paragraph"):
        METRICS["retrieval"]("Paragraph 3", ["3"], {})


def test_count_several_numbers():
    # Numbers 5, 6, 5: two of three equal the answer.
    prediction = "There are 5 unique paragraphs, not 6 or 5."
    assert METRICS["count"](prediction, ["5"], {}) == pytest.approx(2 / 3)
    assert METRICS["count"](prediction, ["6"], {}) == pytest.approx(1 / 3)
    assert METRICS["count"](prediction, ["6", "5"], {}) == pytest.approx(2 / 3)
    assert METRICS["count"]("fifteen", ["15"], {}) == 0.0


# ------------------------------------------------------------------------------------- code_sim


def test_code_sim_skips_fences_and_comments():
    prediction = "\n\n```python\n# add one\n    // not python either\n    return x + 1\n```"
    assert METRICS["code_sim"](prediction, ["    return x + 1"], {}) == pytest.approx(1.0)


def test_code_sim_scores_a_blank_line():
    # LongBench keeps a line of spaces: fuzz.ratio("   ", "    return x") = round(100 * 2 * 3 / 15) = 40.
    assert METRICS["code_sim"]("   ", ["    return x"], {}) == pytest.approx(0.40)
    assert METRICS["code_sim"]("\n\n", ["    return x"], {}) == 0.0


def test_code_sim_partial():
    # Matching blocks "abc": ratio = 2 * 3 / (4 + 4) = 0.75.
    assert METRICS["code_sim"]("// comment\nabcd\nzzzz", ["abce"], {}) == pytest.approx(0.75)
    # Only the first code line counts: "zzzz" shares nothing with "abce".
    assert METRICS["code_sim"]("zzzz\nabce", ["abce"], {}) == 0.0
    assert METRICS["code_sim"]("# only a comment", ["abce"], {}) == 0.0
    # LongBench skips any line containing a comment marker, trailing comments included.
    assert METRICS["code_sim"]("x = 1  # set\nabce", ["abce"], {}) == pytest.approx(1.0)


def test_code_sim_rounds_to_whole_percent_as_fuzz_ratio():
    # "ab" matches: 2 * 2 / 6 = 66.7% -> 67.
    assert METRICS["code_sim"]("abc", ["abd"], {}) == pytest.approx(0.67)
    # One match in 8 + 8 characters: 12.5% -> 12 (half to even).
    assert METRICS["code_sim"]("axxxxxxx", ["ayyyyyyy"], {}) == pytest.approx(0.12)


def test_fuzz_ratio_edge_cases():
    assert metrics.fuzz_ratio("same", "same") == 100
    assert metrics.fuzz_ratio("", "") == 100
    assert metrics.fuzz_ratio("", "x") == 0 and metrics.fuzz_ratio("x", "") == 0


# ---------------------------------------------------------------------------------------- RULER


def test_string_match_all_partial_credit():
    prediction = "The special numbers are 123 and 456."
    assert METRICS["string_match_all"](prediction, ["123", "456", "789"], {}) == pytest.approx(2 / 3)
    assert METRICS["string_match_all"]("APPLE and Pear", ["apple", "pear"], {}) == pytest.approx(1.0)
    assert METRICS["string_match_all"]("nothing", ["apple", "pear"], {}) == 0.0


def test_string_match_part():
    assert METRICS["string_match_part"]("it is 456", ["123", "456"], {}) == 1.0
    assert METRICS["string_match_part"]("It is PEAR", ["pear"], {}) == 1.0
    assert METRICS["string_match_part"]("it is 45", ["123", "456"], {}) == 0.0


# ------------------------------------------------------------------------------- needle_recall

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."


def test_needle_recall_partial_credit():
    # Content words: best thing do san francisco eat sandwich sit dolores park sunny day (12); 4 found.
    assert METRICS["needle_recall"]("Eat a sandwich in Dolores Park.", [NEEDLE], {}) == pytest.approx(4 / 12)
    assert METRICS["needle_recall"](NEEDLE.upper(), [NEEDLE], {}) == pytest.approx(1.0)
    # alice, owns, red, car ("a" skipped): "owns" missing, punctuation separates words.
    assert METRICS["needle_recall"]("Alice's car is red!", ["Alice owns a red car"], {}) == pytest.approx(3 / 4)


def test_needle_recall_max_over_answers_and_stop_word_only_answer():
    assert METRICS["needle_recall"]("red car", ["blue boat", "Alice owns a red car"], {}) == pytest.approx(2 / 4)
    # An answer made only of skipped words is scored on all its words.
    assert METRICS["needle_recall"]("the end", ["to the"], {}) == pytest.approx(1 / 2)
    assert METRICS["needle_recall"]("nothing relevant", [NEEDLE], {}) == 0.0


# ------------------------------------------------------------------------------- InfiniteBench


def test_first_int_match():
    assert METRICS["first_int_match"]("The passkey is 71432. Remember it.", ["71432"], {}) == 1.0
    assert METRICS["first_int_match"]("The passkey is 7143 2.", ["71432"], {}) == 0.0
    # Only the first number counts.
    assert METRICS["first_int_match"]("Among 12 keys the passkey is 71432", ["71432"], {}) == 0.0


def test_kv_retrieval_match_splits_on_the_official_characters_only():
    key = "a1b2c3d4-e5f6-7890-abcd-ef0123456789"
    assert METRICS["kv_retrieval_match"](f'The value is "{key}".', [key], {}) == 1.0
    assert METRICS["kv_retrieval_match"](f"value:{key},", [key], {}) == 1.0
    assert METRICS["kv_retrieval_match"](f"{{{key}}}!", [key], {}) == 1.0
    assert METRICS["kv_retrieval_match"](f"The value is {key[:-1]}.", [key], {}) == 0.0
    # Brackets and semicolons are not separators in compute_scores.py.
    assert METRICS["kv_retrieval_match"](f"[{key}]", [key], {}) == 0.0
    assert METRICS["kv_retrieval_match"](f"{key};", [key], {}) == 0.0


def test_dialogue_name_match_upper_cases_the_prediction_only():
    assert METRICS["dialogue_name_match"]("It is likely Mary, I think.", ["MARY"], {}) == 1.0
    assert METRICS["dialogue_name_match"]("Maryanne", ["MARY"], {}) == 0.0
    assert METRICS["dialogue_name_match"]("MARY", ["Mary"], {}) == 0.0


def test_rouge_lsum_is_summary_level_over_lines():
    assert METRICS["rouge_lsum"]("the cat sat", ["the cat sat on the mat"], {}) == pytest.approx(2 / 3)
    # One line: LCS "sat on the mat" = 4 of 6 tokens each way. Two lines: the union of both LCSs covers all 6.
    assert METRICS["rouge_lsum"]("sat on the mat the cat", ["The cat sat on the mat."], {}) == pytest.approx(4 / 6)
    assert METRICS["rouge_lsum"]("sat on the mat\nthe cat", ["The cat sat on the mat."], {}) == pytest.approx(1.0)


def test_math_find_match_reads_the_first_unsigned_number_as_the_label_type():
    assert METRICS["math_find_match"]("42, then 7", ["42"], {}) == 1.0
    assert METRICS["math_find_match"]("42.0", ["42"], {}) == 0.0  # an int label needs an int
    assert METRICS["math_find_match"]("42", ["42.0"], {}) == 1.0  # a float label compares as a float
    assert METRICS["math_find_match"]("3.50 is it", ["3.5"], {}) == 1.0
    assert METRICS["math_find_match"]("-3", ["-3"], {}) == 0.0  # minus signs are not read
    assert METRICS["math_find_match"]("no number", ["3"], {}) == 0.0
    with pytest.raises(ValueError, match="numeric answer"):
        METRICS["math_find_match"]("3", ["three"], {})


def test_math_calc_prefix_counts_values_up_to_the_first_mistake():
    assert METRICS["math_calc_prefix"]("[1, 3, 7, 9]", ["1", "3", "6", "9"], {}) == pytest.approx(2 / 4)
    assert METRICS["math_calc_prefix"]("1 3", ["1", "3", "6"], {}) == pytest.approx(2 / 3)
    # Minus signs are dropped from the prediction, so a negative value is never matched.
    assert METRICS["math_calc_prefix"]("[1, -2]", ["1", "-2"], {}) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="integer answers"):
        METRICS["math_calc_prefix"]("1", ["one"], {})


def test_code_run_match_reads_the_last_word():
    assert METRICS["code_run_match"]("The value of func_1(2) is 3.", ["3"], {}) == 1.0
    assert METRICS["code_run_match"]("`-3`", ["-3"], {}) == 1.0
    assert METRICS["code_run_match"]("3, I think", ["3"], {}) == 0.0
    assert METRICS["code_run_match"]("3)", ["3"], {}) == 0.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", 1.0),
        ("Bob is right", 1.0),  # the first character decides, whatever follows
        ("Carol", 0.0),
        (" B", 1.0),  # not a letter first: the words, and "B" is the first one within "ABCD"
        ("The answer is B", 1.0),
        ("The answer is: London", 1.0),
        ("the option is London.", 1.0),
        ("the answer is the second", 0.0),  # the text after the first prefix decides
        ("I pick D", 0.0),
        ("I pick B", 1.0),
        ("(B)", 0.0),  # "(B)" is not within "ABCD" and there is no prefix
        ("The Answer is B", 1.0),  # no lowercase prefix: the first word within "ABCD" is B
        ("nothing", 0.0),
    ],
)
def test_book_choice_follows_compute_scores(prediction, expected):
    assert METRICS["book_choice"](prediction, ["London", "B"], {}) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B.", 1.0),
        ("B: bad", 1.0),
        ("B", 0.0),  # a bare letter is not accepted
        (" B.", 0.0),  # nor one after a space: compute_scores reads the first two characters
        ("The answer is: B", 1.0),
        ("Option B is: bad", 1.0),
        ("answer: `bad`", 1.0),
        ("The answer is: C", 0.0),
        ("I think it is B", 0.0),
    ],
)
def test_code_debug_choice_is_as_strict_as_compute_scores(prediction, expected):
    assert METRICS["code_debug_choice"](prediction, ["bad", "B"], {}) == expected


def test_choice_metrics_need_the_text_and_letter_label():
    with pytest.raises(ValueError, match=r"\[option text, option letter A-D\]"):
        METRICS["book_choice"]("B", ["London"], {})
    with pytest.raises(ValueError, match=r"\[option text, option letter A-D\]"):
        METRICS["code_debug_choice"]("B.", ["bad", "E"], {})


# ---------------------------------------------------------------------------------------- score


def test_score_first_line():
    prediction = "\n\nParis\nQuestion: what else? Answer: London"
    assert score(make_sample("qa_f1", ["Paris"], first_line=True), prediction) == pytest.approx(1.0)
    # Whole prediction: [paris, question, what, else, answer, london] vs [paris]: P = 1/6, R = 1, F1 = 2/7.
    assert score(make_sample("qa_f1", ["Paris"]), prediction) == pytest.approx(2 / 7)
    assert score(make_sample("qa_f1", ["Paris"], first_line=False), prediction) == pytest.approx(2 / 7)


def test_score_first_line_classification():
    sample = make_sample("classification", ["city"], first_line=True, **CLASSES)
    assert score(sample, "city\ncountry") == pytest.approx(1.0)
    assert score(make_sample("classification", ["city"], **CLASSES), "city\ncountry") == pytest.approx(0.5)
    # A prediction that is only newlines has an empty first line.
    assert score(sample, "\n\n\n") == 0.0


def test_score_passes_all_answers_and_extra():
    sample = make_sample("string_match_all", ["123", "456", "789"])
    assert score(sample, "123 and 456") == pytest.approx(2 / 3)
    assert score(make_sample("book_choice", ["London", "B"]), "B") == 1.0
