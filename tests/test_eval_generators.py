"""NIAH and RULER-style generators: prompt lengths, determinism, needle placement, answers, errors."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from lavakv.eval.niah import NEEDLES, NIAH_INSTRUCTION, length_tolerance, load_essays, niah_samples
from lavakv.eval.ruler import RULER_TASKS, ruler_samples


class WordTokenizer:
    """One token per whitespace-separated word, ids assigned on first sight: fast and easy to reason about."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def __call__(self, text, add_special_tokens=True):
        ids = []
        for word in text.split():
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            ids.append(self.vocab[word])
        return {"input_ids": ids}

    def decode(self, ids, **kwargs):
        return " ".join(self.words[i] for i in ids)


def tokens(tokenizer, text, special_tokens=False):
    if special_tokens:
        return len(tokenizer(text)["input_ids"])
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_length(tokenizer, sample, length):
    total = tokens(tokenizer, sample.context, True) + tokens(tokenizer, sample.question)
    assert total == sample.extra["prompt_tokens"]
    assert length - length_tolerance(length) <= total <= length, (sample.sample_id, total)


@pytest.fixture(scope="module")
def niah_set():
    return niah_samples(WordTokenizer(), [300, 2000, 6000], [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], seed=3)


@pytest.fixture(scope="module")
def ruler_set():
    return ruler_samples(WordTokenizer(), None, [300, 3000], 3, seed=5)


def test_essays_are_packaged():
    essays = load_essays()
    assert len(essays) > 500_000
    assert essays.count("\n\n") > 49


def test_niah_lengths_fields_and_ids(niah_set):
    tokenizer = WordTokenizer()
    assert len(niah_set) == 21
    assert len({s.sample_id for s in niah_set}) == 21
    for sample in niah_set:
        check_length(tokenizer, sample, sample.extra["length"])
        assert sample.sample_id == f"len{sample.extra['length']}-depth{sample.extra['depth']:.2f}"
        assert (sample.benchmark, sample.dataset, sample.metric) == ("niah", "niah", "needle_recall")
        assert sample.max_new_tokens == 32 and sample.chat_template is False
        assert sample.prompt == sample.context + sample.question


def test_niah_answers_in_context_question_separate(niah_set):
    for sample in niah_set:
        needle = next(n for n in NEEDLES if n.sentence == sample.extra["needle"])
        assert sample.answers == [needle.answer] and sample.stop_at_newline
        assert sample.context.count(needle.sentence) == 1
        assert sample.context.startswith(NIAH_INSTRUCTION)
        assert needle.question in sample.question and needle.question not in sample.context
        assert "Question:" not in sample.context
        assert sample.question.startswith("\n\n") and sample.question.endswith(needle.cue)
    assert len({s.extra["needle"] for s in niah_set}) == 1


def test_niah_needle_at_depth_and_sentence_boundary(niah_set):
    tokenizer = WordTokenizer()
    for sample in niah_set:
        if sample.extra["length"] < 2000:
            continue
        ids = tokenizer(sample.context)["input_ids"]
        start = sample.extra["needle_start_token"]
        assert abs(start / len(ids) - sample.extra["depth"]) <= 0.05, sample.sample_id
        needle_ids = tokenizer(sample.extra["needle"])["input_ids"]
        assert ids[start : start + len(needle_ids)] == needle_ids
        before = sample.context[: sample.context.index(sample.extra["needle"])].rstrip()
        assert before == NIAH_INSTRUCTION.rstrip() or before[-1] in ".!?", sample.sample_id
    first = {s.extra["depth"]: s.extra["needle_start_token"] for s in niah_set if s.extra["length"] == 6000}
    assert first[0.0] == tokens(tokenizer, NIAH_INSTRUCTION)
    assert first[0.0] < first[0.25] < first[0.5] < first[0.75] < first[1.0]


def test_niah_deterministic():
    args = ([400, 1500], [0.0, 0.3, 1.0])
    again = niah_samples(WordTokenizer(), *args, seed=1)
    assert again == niah_samples(WordTokenizer(), *args, seed=1)
    assert again != niah_samples(WordTokenizer(), *args, seed=2)


@pytest.mark.parametrize(
    "lengths, depths, error, match",
    [
        ([1000], [1.5], ValueError, r"depth 1.5 .*\[0, 1\]"),
        ([1000], [-0.1], ValueError, r"depth -0.1 .*\[0, 1\]"),
        ([1000], [float("nan")], ValueError, r"depth nan"),
        ([1000], ["half"], TypeError, "depths must be numbers"),
        ([1000], [], ValueError, "depths must be a non-empty list"),
        ([1000], [0.001, 0.002], ValueError, "differ at two decimals"),
        ([10], [0.5], ValueError, r"length 10 is too short: .* at least \d+ tokens"),
        ([10**7], [0.5], ValueError, r"length 10000000 exceeds the maximum of about \d+ tokens"),
        ([1000.0], [0.5], TypeError, "lengths must be integers"),
        ([True], [0.5], TypeError, "lengths must be integers"),
        ([0], [0.5], ValueError, "must be a positive number"),
        ([500, 500], [0.5], ValueError, "must not repeat"),
        ([], [0.5], ValueError, "non-empty list"),
    ],
)
def test_niah_errors(lengths, depths, error, match):
    with pytest.raises(error, match=match):
        niah_samples(WordTokenizer(), lengths, depths)


def test_ruler_lengths_fields_and_ids(ruler_set):
    tokenizer = WordTokenizer()
    assert [s.dataset for s in ruler_set] == [t for t in RULER_TASKS for _ in range(6)]
    for task in RULER_TASKS:
        ids = [s.sample_id for s in ruler_set if s.dataset == task]
        assert ids == ["len300-0", "len300-1", "len300-2", "len3000-0", "len3000-1", "len3000-2"]
    expected_new_tokens = {"niah_single_uuids": 48, "niah_multivalue": 48, "niah_multiquery": 48, "cwe": 64}
    for sample in ruler_set:
        check_length(tokenizer, sample, sample.extra["length"])
        assert (sample.benchmark, sample.metric, sample.chat_template) == ("ruler", "string_match_all", False)
        assert sample.max_new_tokens == expected_new_tokens.get(sample.dataset, 32)


def test_ruler_answers_in_context_question_separate(ruler_set):
    for sample in ruler_set:
        assert sample.answers and all(isinstance(a, str) and a for a in sample.answers)
        for answer in sample.answers:
            assert answer in sample.context, (sample.dataset, sample.sample_id, answer)
        assert "Question:" in sample.question and "Question:" not in sample.context
        assert "Answer:" in sample.question and "Answer:" not in sample.context
        assert sample.question.startswith("\n\n")
    for task in RULER_TASKS:
        contexts = [s.context for s in ruler_set if s.dataset == task]
        assert len(set(contexts)) == len(contexts)


def magic_needles(context):
    return re.findall(r"The special magic (\w+) for ([\w-]+) is: ([\w-]+)\.", context)


def test_ruler_niah_needles(ruler_set):
    for sample in ruler_set:
        if not sample.dataset.startswith("niah_"):
            continue
        needles = magic_needles(sample.context)
        keys = [key for _, key, _ in needles]
        values = [value for _, _, value in needles]
        assert len(set(values)) == len(values)
        if sample.dataset.startswith("niah_single"):
            kind = sample.dataset.removeprefix("niah_single_")[:-1]
            assert len(needles) == 1 and needles[0][0] == kind and values == sample.answers
            if kind == "number":
                assert re.fullmatch(r"\d{7}", values[0])
            if kind == "uuid":
                assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", values[0])
        elif sample.dataset == "niah_multikey":
            assert len(needles) == 4 and len(set(keys)) == 4
            assert [v for _, k, v in needles if f" {k} " in sample.question] == sample.answers
        elif sample.dataset == "niah_multivalue":
            assert len(needles) == 4 and len(set(keys)) == 1 and sorted(values) == sorted(sample.answers)
        else:
            assert len(needles) == 4 and len(set(keys)) == 4 and 2 <= len(sample.answers) <= 4
            assert set(sample.answers) <= set(values)


def resolve(assigned, name):
    while assigned[name] in assigned:
        name = assigned[name]
    return assigned[name]


def test_ruler_vt_chain(ruler_set):
    for sample in (s for s in ruler_set if s.dataset == "vt"):
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (\w+)\.", sample.context))
        assert len(assigned) == 15
        value = re.search(r"hold (\d{5}) are:$", sample.question).group(1)
        assert sorted(n for n in assigned if resolve(assigned, n) == value) == sorted(sample.answers)
        assert len(sample.answers) == 5
        positions = [sample.context.index(f"VAR {name} =") for name in sample.answers]
        assert positions == sorted(positions)


def test_ruler_cwe_and_fwe_answers_are_the_unique_most_frequent(ruler_set):
    for sample in ruler_set:
        if sample.dataset == "cwe":
            lines = sample.context.split("\n\n", 1)[1].split("\n")
            assert [line.split(". ")[0] for line in lines] == [str(i) for i in range(1, len(lines) + 1)]
            counts = Counter(line.split(". ")[1] for line in lines)
            top, rest = [counts[w] for w in sample.answers], [c for w, c in counts.items() if w not in sample.answers]
            assert len(sample.answers) == 10 and min(top) > max(rest)
        elif sample.dataset == "fwe":
            counts = Counter(sample.context.split("\n\n", 1)[1].split())
            ranked = counts.most_common()
            assert [w for w, _ in ranked[:3]] == sample.answers
            assert ranked[2][1] > ranked[3][1]


def test_ruler_deterministic():
    tasks = ["niah_multiquery", "vt", "cwe", "fwe"]
    first = ruler_samples(WordTokenizer(), tasks, [500], 2, seed=9)
    assert first == ruler_samples(WordTokenizer(), tasks, [500], 2, seed=9)
    other = ruler_samples(WordTokenizer(), tasks, [500], 2, seed=10)
    assert all(a.context != b.context and a.sample_id == b.sample_id for a, b in zip(first, other))


@pytest.mark.parametrize(
    "tasks, lengths, num_samples, error, match",
    [
        (["niah_single_words", "qa"], [500], 1, ValueError, r"unknown RULER task.*'qa'.*valid names: niah_single"),
        ("vt", [500], 1, ValueError, "list of task names"),
        (["vt", "vt"], [500], 1, ValueError, "must not repeat"),
        (["vt"], [500], 0, ValueError, "num_samples must be an integer >= 1"),
        (["vt"], [500], 1.5, ValueError, "num_samples must be an integer >= 1"),
        (["vt"], [-5], 1, ValueError, "positive number of tokens"),
        (["vt"], ["500"], 1, TypeError, "lengths must be integers"),
        (["vt"], [20], 1, ValueError, r"vt at length 20: length 20 is too short; it needs at least \d+ tokens"),
        (["cwe"], [20], 1, ValueError, r"cwe at length 20: .* at least \d+ tokens"),
        (["niah_multikey"], [10**7], 1, ValueError, "exceeds the maximum of about"),
    ],
)
def test_ruler_errors(tasks, lengths, num_samples, error, match):
    with pytest.raises(error, match=match):
        ruler_samples(WordTokenizer(), tasks, lengths, num_samples)


@pytest.mark.smollm2
def test_generators_with_smollm2_tokenizer(smollm2):
    _, tokenizer = smollm2
    depths = [0.0, 0.5, 1.0]
    for sample in niah_samples(tokenizer, [500, 2000], depths):
        check_length(tokenizer, sample, sample.extra["length"])
        assert sample.answers[0] in sample.context
        ids = tokenizer(sample.context)["input_ids"]
        start = sample.extra["needle_start_token"]
        assert abs(start / len(ids) - sample.extra["depth"]) <= 0.05
        assert tokenizer.decode(ids[start:]).lstrip().startswith(sample.extra["needle"])
    for sample in ruler_samples(tokenizer, ["niah_multikey", "vt"], [500, 2000], 2):
        check_length(tokenizer, sample, sample.extra["length"])
        assert all(answer in sample.context for answer in sample.answers)
