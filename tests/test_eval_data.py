"""LongBench and InfiniteBench readers on hand-made fixture files, plus the shared LongBench sample."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lavakv.eval.infinitebench import INFINITEBENCH_TASKS, load_infinitebench
from lavakv.eval.longbench import LONGBENCH_DATASETS, load_longbench, longbench_maxlen, longbench_prompts

SHARED_LONGBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "longbench"


def _record(i: int = 0, **fields) -> dict:
    record = {
        "input": f"question {i}?",
        "context": f"document {i} text",
        "answers": [f"answer {i}"],
        "length": 100 * (i + 1),
        "dataset": "qasper",
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }
    record.update(fields)
    return record


def _write(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _filled(template: str, context: str, inp: str) -> str:
    before, after = template.split("{context}")
    return before.replace("{input}", inp) + context + after.replace("{input}", inp)


# LongBench: specs and packaged data


def test_every_dataset_has_a_template_and_a_length():
    prompts, maxlen = longbench_prompts(), longbench_maxlen()
    assert len(LONGBENCH_DATASETS) == 21
    assert set(prompts) == set(maxlen) == set(LONGBENCH_DATASETS)
    for name, template in prompts.items():
        assert template.count("{context}") == 1, name
        assert template.find("{input}") == -1 or template.find("{input}") > template.find("{context}"), name


def test_raw_and_first_line_flags():
    raw = {n for n, s in LONGBENCH_DATASETS.items() if not s.chat_template}
    assert raw == {"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"}
    assert {n for n, s in LONGBENCH_DATASETS.items() if s.first_line} == {"trec", "triviaqa", "samsum", "lsht"}
    assert LONGBENCH_DATASETS["dureader"].metric == "rouge_l_zh"
    assert LONGBENCH_DATASETS["passage_retrieval_zh"].metric == "retrieval_zh"


# LongBench: building samples


def test_prompt_is_template_filled_and_split_after_context(tmp_path):
    _write(tmp_path / "qasper.jsonl", [_record(0), _record(1)])
    samples = load_longbench(tmp_path, ["qasper"])
    template = longbench_prompts()["qasper"]
    assert [s.sample_id for s in samples] == ["id0", "id1"]
    s = samples[0]
    assert s.prompt == _filled(template, "document 0 text", "question 0?")
    assert s.context == template.split("{context}")[0] + "document 0 text"
    assert s.question == template.split("{context}")[1].replace("{input}", "question 0?")
    assert (s.benchmark, s.dataset, s.answers) == ("longbench", "qasper", ["answer 0"])
    assert (s.max_new_tokens, s.metric, s.chat_template) == (128, "qa_f1", True)
    assert s.extra == {"all_classes": None, "length": 100, "language": "en", "first_line": False}


def test_template_without_input(tmp_path):
    _write(tmp_path / "gov_report.jsonl", [_record(0)])
    (s,) = load_longbench(tmp_path, "gov_report")
    assert s.context.endswith("document 0 text")
    assert s.question == "\n\nNow, write a one-page summary of the report.\n\nSummary:"


def test_braces_in_context_and_input_survive(tmp_path):
    context = "def f(x): return {'a': {x}} {input} {context} {0}"
    inp = "Q {context} {}"
    _write(tmp_path / "repobench-p.jsonl", [_record(0, context=context, input=inp)])
    (s,) = load_longbench(tmp_path, ["repobench-p"])
    assert s.context == "Please complete the code given below. \n" + context
    assert s.question == inp + "Next line of code:\n"


def test_e_suffix_uses_base_template(tmp_path):
    _write(tmp_path / "trec_e.jsonl", [_record(0, all_classes=["A", "B"])])
    (s,) = load_longbench(tmp_path, ["trec_e"])
    assert s.dataset == "trec_e"
    assert s.prompt == _filled(longbench_prompts()["trec"], "document 0 text", "question 0?")
    assert (s.metric, s.max_new_tokens) == ("classification", 64)
    assert s.chat_template is False and s.extra["first_line"] is True and s.stop_at_newline is True
    assert s.extra["all_classes"] == ["A", "B"]


def test_input_before_context_stays_in_context(tmp_path):
    _write(tmp_path / "_prompts.json", [json.dumps({"narrativeqa": "Q: {input}\nDoc: {context}\nAgain: {input}\nA:"})])
    _write(tmp_path / "narrativeqa.jsonl", [_record(0)])
    (s,) = load_longbench(tmp_path)
    assert s.context == "Q: question 0?\nDoc: document 0 text"
    assert s.question == "\nAgain: question 0?\nA:"


def test_data_dir_overrides_only_what_it_defines(tmp_path):
    _write(tmp_path / "_prompts.json", [json.dumps({"qasper": "<<{context}>> {input} =", "not_a_dataset": "x"})])
    _write(tmp_path / "_maxlen.json", [json.dumps({"hotpotqa": 7})])
    _write(tmp_path / "qasper.jsonl", [_record(0)])
    _write(tmp_path / "hotpotqa.jsonl", [_record(0)])
    hotpot, qasper = load_longbench(tmp_path)
    assert qasper.prompt == "<<document 0 text>> question 0? ="
    assert qasper.context == "<<document 0 text"
    assert qasper.max_new_tokens == 128
    assert hotpot.max_new_tokens == 7
    assert hotpot.prompt == _filled(longbench_prompts()["hotpotqa"], "document 0 text", "question 0?")


def test_bad_override_files(tmp_path):
    _write(tmp_path / "qasper.jsonl", [_record(0)])
    _write(tmp_path / "_maxlen.json", [json.dumps({"qasper": "long"})])
    with pytest.raises(ValueError, match=r"_maxlen\.json.*'qasper'"):
        load_longbench(tmp_path)
    _write(tmp_path / "_maxlen.json", ["{"])
    with pytest.raises(ValueError, match=r"_maxlen\.json: not valid JSON"):
        load_longbench(tmp_path)
    (tmp_path / "_maxlen.json").unlink()
    _write(tmp_path / "_prompts.json", [json.dumps({"qasper": "no placeholder"})])
    with pytest.raises(ValueError, match=r"\{context\}"):
        load_longbench(tmp_path)


def test_max_words_then_limit(tmp_path):
    lengths = [500, 4000, 1200, 3000, 2999, 100]
    _write(tmp_path / "qmsum.jsonl", [_record(i, length=n) for i, n in enumerate(lengths)])
    assert [s.sample_id for s in load_longbench(tmp_path, max_words=3000)] == ["id0", "id2", "id3", "id4", "id5"]
    assert [s.sample_id for s in load_longbench(tmp_path, max_words=3000, limit=3)] == ["id0", "id2", "id3"]
    assert [s.sample_id for s in load_longbench(tmp_path, limit=2)] == ["id0", "id1"]
    assert load_longbench(tmp_path, limit=0) == []


def test_limit_applies_per_dataset_and_default_order_is_sorted(tmp_path):
    for name in ["trec", "qasper_e", "qasper"]:
        _write(tmp_path / f"{name}.jsonl", [_record(i) for i in range(3)])
    _write(tmp_path / "computation.jsonl", [_record(0)])
    samples = load_longbench(tmp_path, limit=2)
    assert [(s.dataset, s.sample_id) for s in samples] == [
        ("qasper", "id0"),
        ("qasper", "id1"),
        ("qasper_e", "id0"),
        ("qasper_e", "id1"),
        ("trec", "id0"),
        ("trec", "id1"),
    ]


def test_missing_id_falls_back_to_line_number(tmp_path):
    record = _record(0)
    del record["_id"]
    _write(tmp_path / "musique.jsonl", [_record(1), "", record])
    assert [s.sample_id for s in load_longbench(tmp_path)] == ["id1", "musique-3"]


# LongBench: errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_longbench(tmp_path / "nowhere")
    _write(tmp_path / "file", [])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_longbench(tmp_path / "file")


def test_directory_without_datasets(tmp_path):
    _write(tmp_path / "computation.jsonl", [_record(0)])
    with pytest.raises(FileNotFoundError, match=r"no LongBench dataset file.*expected.*qasper\.jsonl"):
        load_longbench(tmp_path)


def test_requested_dataset_missing(tmp_path):
    _write(tmp_path / "trec.jsonl", [_record(0)])
    with pytest.raises(FileNotFoundError, match=r"qasper\.jsonl not found.*present.*: trec"):
        load_longbench(tmp_path, ["qasper"])


def test_unknown_dataset(tmp_path):
    _write(tmp_path / "computation.jsonl", [_record(0)])
    with pytest.raises(ValueError, match=r"unknown LongBench dataset 'computation'.*valid names:.*qasper_e"):
        load_longbench(tmp_path, ["computation"])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"qasper\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"qasper\.jsonl:2: expected a JSON object"),
        ({k: v for k, v in _record(1).items() if k != "input"}, r"qasper\.jsonl:2: missing required field 'input'"),
        ({k: v for k, v in _record(1).items() if k != "context"}, r"qasper\.jsonl:2: missing required field 'context'"),
        ({k: v for k, v in _record(1).items() if k != "answers"}, r"qasper\.jsonl:2: missing required field 'answers'"),
        (_record(1, context=["a"]), r"qasper\.jsonl:2: field 'context' must be a string"),
        (_record(1, answers="yes"), r"qasper\.jsonl:2: field 'answers' must be a non-empty list of strings"),
        (_record(1, answers=["yes", 3]), r"qasper\.jsonl:2: field 'answers' must be"),
        (_record(1, answers=[]), r"qasper\.jsonl:2: field 'answers' must be"),
        (_record(0), r"qasper\.jsonl:2: duplicate sample id 'id0'"),
    ],
)
def test_a_bad_record_is_an_error_sample_and_the_others_load(tmp_path, line, message):
    _write(tmp_path / "qasper.jsonl", [_record(0), line, _record(2)])
    samples = load_longbench(tmp_path, ["qasper"])
    # A record keeps its own id; a line without one (not JSON, or a duplicate id) is named by its line.
    own_id = isinstance(line, dict) and line["_id"] != "id0"
    assert [s.sample_id for s in samples] == ["id0", "id1" if own_id else "qasper-2", "id2"]
    assert samples[0].error is None and samples[2].error is None
    assert re.search(message, samples[1].error) and samples[1].prompt == ""


def test_bad_arguments(tmp_path):
    _write(tmp_path / "qasper.jsonl", [_record(0)])
    with pytest.raises(ValueError, match="limit"):
        load_longbench(tmp_path, limit=-1)
    with pytest.raises(ValueError, match="max_words"):
        load_longbench(tmp_path, max_words=-1)
    _write(tmp_path / "qasper.jsonl", [_record(0, length="long")])
    assert re.search(r"qasper\.jsonl:1: field 'length'", load_longbench(tmp_path, max_words=10)[0].error)


# LongBench: the shared sample of the real data


@pytest.mark.skipif(not SHARED_LONGBENCH.is_dir(), reason="shared LongBench sample not present")
def test_real_longbench_sample():
    samples = load_longbench(SHARED_LONGBENCH, ["qasper", "hotpotqa_e", "trec"], max_words=3000)
    assert {s.dataset for s in samples} == {"qasper", "hotpotqa_e", "trec"}
    prompts = longbench_prompts()
    for s in samples:
        assert s.extra["length"] <= 3000
        assert s.answers and all(isinstance(a, str) for a in s.answers)
        base = s.dataset.removesuffix("_e")
        assert s.context.startswith(prompts[base].split("{context}")[0])
        assert s.question.endswith(prompts[base].split("{input}")[-1])
    trec = [s for s in samples if s.dataset == "trec"]
    assert trec and all(not s.chat_template and s.extra["first_line"] and s.extra["all_classes"] for s in trec)
    everything = load_longbench(SHARED_LONGBENCH)
    assert "computation" not in {s.dataset for s in everything}
    assert len({(s.dataset, s.sample_id) for s in everything}) == len(everything)
    records = {
        (name, r["_id"]): r
        for name in ["qasper", "hotpotqa_e", "trec"]
        for r in map(json.loads, (SHARED_LONGBENCH / f"{name}.jsonl").read_text(encoding="utf-8").splitlines())
    }
    for s in samples:
        record = records[s.dataset, s.sample_id]
        assert s.context.endswith(record["context"])
        assert s.prompt == _filled(prompts[s.dataset.removesuffix("_e")], record["context"], record["input"])


# InfiniteBench

INFINITE_RECORDS = {
    "passkey": {"id": 0, "context": "The pass key is 71432.", "input": "What is the pass key?", "answer": 71432},
    "number_string": {"context": "noise 0123456789 noise", "input": "What is the sequence?", "answer": ["0123456789"]},
    "kv_retrieval": {"id": "k1", "context": '{"ab": "cd", "ef": "gh"}', "input": 'Key: "ef"', "answer": "gh"},
    "longbook_sum_eng": {"id": 2, "context": "A long book.", "input": "", "answer": ["A summary."]},
    "longbook_qa_eng": {"id": 3, "context": "Once upon a time.", "input": "When?", "answer": ["once", "a time"]},
    "longbook_choice_eng": {
        "id": 4,
        "context": "Alice met Bob.",
        "input": "Who did Alice meet?",
        "answer": ["Bob"],
        "options": ["Carol", "Bob", "Dan", "Eve"],
    },
    "longdialogue_qa_eng": {"id": 7, "context": "JOHN: hi\n$$MASK$$: hello", "input": "", "answer": ["MARY"]},
    "math_find": {
        "id": 5,
        "context": "[3, 9, 2]",
        "input": "You should answer with only one number, no other words. The largest number of the list is: ",
        "answer": 9.0,
    },
    "math_calc": {"id": 8, "context": "1 + 2 - 5", "input": "", "answer": [1, 3, -2]},
    "code_run": {
        "id": 9,
        "context": "def func_1(x):\n    return x + 1",
        "input": "Please give me the exact number of the return value of func_1(2). Be concise.",
        "answer": 3,
    },
    "code_debug": {
        "id": 6,
        "context": "def good(): pass\ndef bad(): retrun {}",
        "input": "",
        "answer": "bad",
        "options": ["good", "bad", "ugly", "main"],
    },
}

# InfiniteBench's yarn_mistral_templates, filled by hand for the records above.
INFINITE_PROMPTS = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will "
    "quiz you about the important information there.\n\nThe pass key is 71432.\n\nWhat is the pass key?\n\n"
    "The pass key is",
    "longbook_choice_eng": "Read the book and answer the question.\n\nAlice met Bob.\n\nQuestion: Who did Alice "
    "meet?\nA. Carol\nB. Bob\nC. Dan\nD. Eve\n\nThe letter of the correct answer is",
    "math_find": "What is the largest number in the following list?\n\n[3, 9, 2]\n\nYou should answer with only "
    "one number, no other words. The largest number of the list is: ",
    "math_calc": "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: "
    "[1, 4, 8]\n\nExpression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: 1 + 2 - 5\nValues:",
    "code_run": "There is a function called func_1 in the following Python code.\n\ndef func_1(x):\n    return "
    "x + 1\n\nPlease compute the exact value of func_1(2). The value of func_1(2) is",
    "code_debug": "Following is a Python code where exactly one of the functions/methods has a deliberate error that "
    "makes it crash.\n\ndef good(): pass\ndef bad(): retrun {}\n\nOptions:\nA. good\nB. bad\nC. ugly\nD. main"
    "\n\nThe correct option is:",
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is replaced "
    'with "$$MASK$$", and you should try to guess who that character is.\n\nJOHN: hi\n$$MASK$$: hello\n\nThe name '
    "that has been replaced with $$MASK$$ is likely",
}


def test_every_infinitebench_task_builds_its_official_prompt(tmp_path):
    assert set(INFINITE_RECORDS) == set(INFINITEBENCH_TASKS)
    for name, record in INFINITE_RECORDS.items():
        _write(tmp_path / f"{name}.jsonl", [record])
    samples = {s.dataset: s for s in load_infinitebench(tmp_path)}
    assert list(samples) == sorted(INFINITEBENCH_TASKS)
    for name, s in samples.items():
        record = INFINITE_RECORDS[name]
        assert s.error is None and s.benchmark == "infinitebench" and s.chat_template is False
        assert s.context.endswith(record["context"]) and record["context"] not in s.question
        assert s.max_new_tokens == INFINITEBENCH_TASKS[name].max_new_tokens
        assert s.metric == INFINITEBENCH_TASKS[name].metric and s.extra["prompts"] == "yarn_mistral_templates"
        if name in INFINITE_PROMPTS:
            assert s.prompt == INFINITE_PROMPTS[name], name
    assert samples["passkey"].answers == ["71432"] and samples["passkey"].sample_id == "0"
    assert samples["number_string"].sample_id == "number_string-1"
    assert samples["math_find"].answers == ["9.0"]  # a float label is scored as a float
    assert samples["math_calc"].answers == ["1", "3", "-2"]
    assert samples["longbook_choice_eng"].answers == ["Bob", "B"]
    assert samples["code_debug"].answers == ["bad", "B"]
    assert samples["code_debug"].extra["options"] == ["good", "bad", "ugly", "main"]
    maxlen = {name: s.max_new_tokens for name, s in samples.items()}
    assert maxlen == {
        "passkey": 6,
        "number_string": 12,
        "kv_retrieval": 50,
        "longbook_sum_eng": 1200,
        "longbook_choice_eng": 40,
        "longbook_qa_eng": 40,
        "longdialogue_qa_eng": 40,
        "math_find": 3,
        "math_calc": 30000,
        "code_run": 5,
        "code_debug": 5,
    }


def test_infinitebench_limit_and_selection(tmp_path):
    _write(tmp_path / "passkey.jsonl", [dict(INFINITE_RECORDS["passkey"], id=i) for i in range(5)])
    _write(tmp_path / "math_find.jsonl", [INFINITE_RECORDS["math_find"]])
    samples = load_infinitebench(tmp_path, ["passkey"], limit=2)
    assert [(s.dataset, s.sample_id) for s in samples] == [("passkey", "0"), ("passkey", "1")]


@pytest.mark.parametrize(
    ("task", "record", "message"),
    [
        ("passkey", {"context": "c", "input": "q"}, r"passkey\.jsonl:1: missing required field 'answer'"),
        ("passkey", {"input": "q", "answer": "1"}, r"passkey\.jsonl:1: missing required field 'context'"),
        ("passkey", {"context": "c", "answer": "1"}, r"passkey\.jsonl:1: missing required field 'input'"),
        ("passkey", {"context": "c", "input": "q", "answer": [1, None]}, r"passkey\.jsonl:1: field 'answer'"),
        ("passkey", {"context": "c", "input": "q", "answer": []}, r"passkey\.jsonl:1: field 'answer'"),
        ("code_debug", {"context": "c", "input": "", "answer": "f"}, r"code_debug\.jsonl:1:.*options"),
        (
            "code_debug",
            {"context": "c", "input": "", "answer": "f", "options": "f"},
            r"code_debug\.jsonl:1: field 'options' must be a list of 4 strings",
        ),
        (
            "code_debug",
            {"context": "c", "input": "", "answer": "x", "options": ["f", "g", "h", "i"]},
            r"code_debug\.jsonl:1: field 'answer' must be one of the options",
        ),
        (
            "math_find",
            {"context": "[1]", "input": "Find it.", "answer": 1},
            r"math_find\.jsonl:1: .*'The <word> number'",
        ),
        (
            "code_run",
            {"context": "def func_1(x): return x", "input": "What does it return?", "answer": 1},
            r"code_run\.jsonl:1: .*names no call like 'func_1\(-2\)'",
        ),
        ("passkey", "oops", r"passkey\.jsonl:1: not valid JSON"),
    ],
)
def test_an_infinitebench_bad_record_is_an_error_sample(tmp_path, task, record, message):
    _write(tmp_path / f"{task}.jsonl", [record])
    (sample,) = load_infinitebench(tmp_path)
    assert re.search(message, sample.error) and sample.sample_id == f"{task}-1"


def test_infinitebench_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_infinitebench(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no InfiniteBench task file.*passkey\.jsonl"):
        load_infinitebench(tmp_path)
    _write(tmp_path / "passkey.jsonl", [INFINITE_RECORDS["passkey"]])
    with pytest.raises(ValueError, match=r"unknown InfiniteBench task 'longbook_qa_chn'.*valid names:.*math_find"):
        load_infinitebench(tmp_path, ["longbook_qa_chn"])
    with pytest.raises(FileNotFoundError, match=r"math_find\.jsonl not found.*: passkey"):
        load_infinitebench(tmp_path, ["math_find"])


def test_infinitebench_finds_the_target_and_the_call_as_infinitebench_does(tmp_path):
    math_find = {
        "id": 1,
        "context": "[3, 9, 2]",
        "input": "You should answer with only one number. The smallest number of the list, out of all of them, is: ",
        "answer": 2,
    }
    code_run = {
        "id": 2,
        "context": "def func_12(x): return x",
        "input": "What is func_12(-7)? Not func_3(1).",
        "answer": -7,
    }
    _write(tmp_path / "math_find.jsonl", [math_find])
    _write(tmp_path / "code_run.jsonl", [code_run])
    samples = {s.dataset: s for s in load_infinitebench(tmp_path)}
    assert samples["math_find"].context.startswith("What is the smallest number in the following list?\n\n")
    assert samples["code_run"].context.startswith("There is a function called func_12 in the following")
    assert "Please compute the exact value of func_12(-7)." in samples["code_run"].question
