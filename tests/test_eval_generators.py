"""NIAH and RULER-style generators: prompt lengths, determinism, needle placement, answers, errors."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from lavakv.eval.niah import NEEDLES, NIAH_INSTRUCTION, length_tolerance, load_essays, niah_samples
from lavakv.eval.ruler import RULER_TASKS, TOKENS_TO_GENERATE, ruler_samples


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
    return ruler_samples(WordTokenizer(), None, [1500, 4096], 2, seed=5)


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


def ruler_budget(sample):
    return sample.extra["length"] - TOKENS_TO_GENERATE[sample.dataset]


def test_ruler_tasks_are_rulers_thirteen():
    assert RULER_TASKS == (
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
    )  # fmt: skip


def test_ruler_lengths_count_the_prompt_and_the_answers_room(ruler_set):
    tokenizer = WordTokenizer()
    tasks = [t for t in RULER_TASKS if not t.startswith("qa")]
    assert [s.dataset for s in ruler_set] == [t for t in tasks for _ in range(4)]
    for sample in ruler_set:
        total = tokens(tokenizer, sample.context + sample.question + sample.answer_prefix)
        assert total == sample.extra["prompt_tokens"] <= ruler_budget(sample)
        # The haystack is the largest that fits: within one haystack unit of the budget.
        assert total >= ruler_budget(sample) - 120, (sample.dataset, sample.sample_id, total)
        assert sample.max_new_tokens == TOKENS_TO_GENERATE[sample.dataset]
        assert sample.metric == "string_match_all" and sample.answer_prefix.startswith(" ")
    assert [s.sample_id for s in ruler_set if s.dataset == "vt"] == ["len1500-0", "len1500-1", "len4096-0", "len4096-1"]


def test_ruler_answers_are_in_the_context_and_the_question_follows_it(ruler_set):
    for sample in ruler_set:
        assert sample.answers and all(answer in sample.context for answer in sample.answers), sample.dataset
        assert "Question:" in sample.question or "What is" in sample.question or "What are" in sample.question
    for task in RULER_TASKS[:11]:
        contexts = [s.context for s in ruler_set if s.dataset == task]
        assert len(set(contexts)) == len(contexts)


NEEDLE_LINE = re.compile(r"One of the special magic (numbers|uuids) for ([\w-]+) is: ([\w-]+)\.")


def test_ruler_niah_needles_haystacks_and_wording(ruler_set):
    for sample in (s for s in ruler_set if s.dataset.startswith("niah")):
        needles = NEEDLE_LINE.findall(sample.context)
        task = sample.dataset
        if task in ("niah_multikey_2", "niah_multikey_3"):
            # The haystack is look-alike needles; the asked key's needle is the answer.
            assert len(needles) > 20 and "The grass is green" not in sample.context
            key = re.search(r"for (\S+) mentioned", sample.question).group(1)
            assert [v for _, k, v in needles if k == key] == sample.answers
        else:
            expected = 4 if task in ("niah_multikey_1", "niah_multivalue", "niah_multiquery") else 1
            assert len(needles) == expected
        if task == "niah_single_1":
            assert sample.context.count("The grass is green. The sky is blue.") > 10
        if task in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"):
            assert "The grass is green" not in sample.context and len(sample.context.split()) > 500
        if task in ("niah_single_3", "niah_multikey_3"):
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sample.answers[0]
            )
        elif task.startswith("niah_single") or task.startswith("niah_multikey"):
            assert re.fullmatch(r"\d{7}", sample.answers[0])
        if task in ("niah_multivalue", "niah_multiquery"):
            assert len(sample.answers) == 4 and sample.context.startswith("Some special magic numbers are hidden")
            assert sample.answer_prefix.endswith("mentioned in the provided text are")
        else:
            kind = "uuid" if task in ("niah_single_3", "niah_multikey_3") else "number"
            assert sample.context.startswith(f"A special magic {kind} is hidden within the following text.")
            assert sample.question.startswith(f"\nWhat is the special magic {kind} for ")
            assert sample.answer_prefix.endswith("mentioned in the provided text is")
        if task == "niah_multivalue":
            assert len({k for _, k, _ in needles}) == 1
        if task == "niah_multiquery":
            query = re.search(r"for (.+) mentioned", sample.question).group(1)
            keys = query.replace(", and ", ", ").split(", ")
            assert len(keys) == 4 and [v for k in keys for _, kk, v in needles if kk == k] == sample.answers


def resolve(assigned, name):
    while assigned[name] in assigned:
        name = assigned[name]
    return assigned[name]


def test_ruler_vt_chain_after_a_one_shot_example(ruler_set):
    for sample in (s for s in ruler_set if s.dataset == "vt"):
        example, task = sample.context.split("\nMemorize and track", 1)
        assert example.startswith("Memorize and track") and re.search(r"they are:  [A-Z]{3}( [A-Z]{3}){4}\n$", example)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (?:VAR )?(\w+)", task))
        value = re.search(r"the value (\d{5}),", sample.answer_prefix).group(1)
        assert len(sample.answers) == 5 and "5 variables are assigned" in sample.answer_prefix
        assert sorted(n for n in assigned if resolve(assigned, n) == value) == sorted(sample.answers)
        positions = [task.index(f"VAR {name} =") for name in sample.answers]
        assert positions == sorted(positions)


def test_ruler_cwe_counts_and_fwe_ranks(ruler_set):
    for sample in ruler_set:
        if sample.dataset == "cwe":
            main = sample.context.rsplit("Below is a numbered list of words.", 1)[1].split("\n", 1)[1]
            words = re.findall(r"\d+\. (\S+)", main)
            counts = Counter(words)
            common = 30 if sample.extra["length"] >= 4096 else 6
            assert {counts[w] for w in sample.answers} == {common} and len(sample.answers) == 10
            assert {c for w, c in counts.items() if w not in sample.answers} == {3 if common == 30 else 1}
        elif sample.dataset == "fwe":
            text = sample.context.split("coded words. ", 1)[1]
            ranked = [w for w, _ in Counter(text.split()).most_common()]
            assert ranked[0] == "..." and ranked[1:4] == sample.answers


def test_ruler_counts_the_chat_wrapper():
    class ChatWordTokenizer(WordTokenizer):
        chat_template = "user/assistant"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "<user> " + messages[0]["content"] + " <end> <assistant>"

    tokenizer = ChatWordTokenizer()
    for sample in ruler_samples(tokenizer, ["niah_single_1", "fwe"], [1000], 1, chat_template=True):
        total = tokens(
            tokenizer, "<user> " + sample.context + sample.question + " <end> <assistant>" + sample.answer_prefix
        )
        assert total == sample.extra["prompt_tokens"] <= ruler_budget(sample) and sample.chat_template


def squad_file(tmp_path):
    article = {
        "paragraphs": [
            {"context": f"Paragraph {i} about topic {i} says the answer is value{i}.",
             "qas": [{"question": f"What is topic {i}?", "answers": [{"text": f"value{i}"}], "is_impossible": False},
                     {"question": "Unanswerable?", "answers": [], "is_impossible": True}]}
            for i in range(40)
        ]
    }  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps({"data": [article]}))
    hotpot = [
        {"question": f"Who is person {i}?", "answer": f"name{i}",
         "context": [[f"Title {i}-{j}", [f" Person {i} is name{i}.", f" Fact {j}."]] for j in range(10)]}
        for i in range(3)
    ]  # fmt: skip
    (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(hotpot))
    return tmp_path


def test_ruler_qa_reads_squad_and_hotpotqa(tmp_path, caplog):
    data = squad_file(tmp_path)
    samples = ruler_samples(WordTokenizer(), ["qa_1", "qa_2"], [600], 2, data=data)
    assert [s.dataset for s in samples] == ["qa_1", "qa_1", "qa_2", "qa_2"]
    for sample in samples:
        assert sample.metric == "string_match_part" and sample.answer_prefix == " Answer:"
        assert "Document 1:\n" in sample.context and all(a in sample.context for a in sample.answers)
        assert sample.question.endswith(f"Question: {'What is topic' if sample.dataset == 'qa_1' else 'Who is person'} "
                                        f"{sample.sample_id[-1]}?")  # fmt: skip
        assert sample.extra["prompt_tokens"] <= ruler_budget(sample)
    # The unanswerable question is skipped: sample 1 is the second paragraph's question.
    assert samples[1].answers == ["value1"]
    # Without --data, a run of every task skips qa with a warning; asking for qa by name is an error.
    assert {s.dataset for s in ruler_samples(WordTokenizer(), None, [1500], 1)} == set(RULER_TASKS[:11])
    assert "skipping qa_1" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"qa_2 reads hotpotqa.json or hotpot_dev_distractor_v1.json"):
        ruler_samples(WordTokenizer(), ["qa_2"], [600], 1)


def test_ruler_deterministic():
    tasks = ["niah_multiquery", "vt", "cwe", "fwe"]
    first = ruler_samples(WordTokenizer(), tasks, [800], 2, seed=9)
    assert first == ruler_samples(WordTokenizer(), tasks, [800], 2, seed=9)
    other = ruler_samples(WordTokenizer(), tasks, [800], 2, seed=10)
    assert all(a.context != b.context and a.sample_id == b.sample_id for a, b in zip(first, other))


@pytest.mark.parametrize(
    "tasks, lengths, num_samples, error, match",
    [
        (["niah_single_1", "qa"], [500], 1, ValueError, r"unknown RULER task.*'qa'.*valid names: niah_single_1"),
        ("vt", [500], 1, ValueError, "list of task names"),
        (["vt", "vt"], [500], 1, ValueError, "must not repeat"),
        (["vt"], [500], 0, ValueError, "num_samples must be an integer >= 1"),
        (["vt"], [-5], 1, ValueError, "positive number of tokens"),
        (["vt"], ["500"], 1, TypeError, "lengths must be integers"),
        (["vt"], [60], 1, ValueError, r"ruler vt at length 60: too short"),
        (["cwe"], [10**6], 1, ValueError, "more than the 8169 distinct words of wonderwords"),
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
    for sample in ruler_samples(tokenizer, ["niah_multikey_1", "vt", "cwe"], [1024, 4096], 1):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.context + sample.question}], tokenize=False, add_generation_prompt=True
        )
        total = tokens(tokenizer, text + sample.answer_prefix)
        assert total == sample.extra["prompt_tokens"] <= sample.extra["length"] - sample.max_new_tokens
        assert total >= 0.95 * (sample.extra["length"] - sample.max_new_tokens)
        assert all(answer in sample.context for answer in sample.answers)
