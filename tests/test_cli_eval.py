"""``lavakv eval`` refuses what would silently give no or meaningless results: filters that leave no
sample, NIAH/RULER lengths beyond the model's context, and shards written with a leading dash."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import TinyTokenizer, tiny_model

from lavakv import models
from lavakv.cli import build_parser, main
from lavakv.eval import niah, ruler
from lavakv.eval.longbench import load_longbench

TINY_CONTEXT = 2048


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the check under test must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def tiny(monkeypatch):
    """``--model`` loads a tiny random model whose context is TINY_CONTEXT tokens; sample generation fails the test."""
    model = tiny_model("llama", max_position_embeddings=TINY_CONTEXT)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (model, TinyTokenizer()))

    def refuse(*args, **kwargs):
        raise AssertionError("samples were generated before the lengths were checked")

    monkeypatch.setattr(niah, "niah_samples", refuse)
    monkeypatch.setattr(ruler, "ruler_samples", refuse)
    return model


def _longbench_dir(path, lengths: dict[str, list[int]]):
    path.mkdir()
    for dataset, values in lengths.items():
        records = [
            {"input": f"q{i}?", "context": f"text {i}", "answers": [f"a{i}"], "length": n, "_id": f"{dataset}{i}"}
            for i, n in enumerate(values)
        ]
        (path / f"{dataset}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _eval(tmp_path, *options: str) -> list[str]:
    return ["eval", "--out", str(tmp_path / "run"), "--methods", "snapkv", "--budgets", "64", *options]


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_words_below_one_is_refused_before_loading(value, tmp_path, capsys, no_model):
    data = _longbench_dir(tmp_path / "data", {"qasper": [100, 200]})
    assert main(_eval(tmp_path, "--benchmark", "longbench", "--data", str(data), "--max-words", value)) == 2
    err = capsys.readouterr().err
    assert "--max-words must be an integer >= 1" in err and f"got {value}" in err
    assert not (tmp_path / "run").exists()


def test_a_max_words_filter_that_removes_every_sample_says_so_before_loading(tmp_path, capsys, no_model):
    lengths = {"qasper": [300, 120, 500], "trec": [250]}
    data = _longbench_dir(tmp_path / "data", lengths)
    command = _eval(tmp_path, "--benchmark", "longbench", "--data", str(data), "--max-words", "100")
    assert main(command) == 2
    err = capsys.readouterr().err
    removed = sum(len(values) for values in lengths.values())
    shortest = min(min(values) for values in lengths.values())
    assert f"max_words=100 removed all {removed} samples" in err
    assert f"shortest is {shortest} words" in err
    assert not (tmp_path / "run").exists()


def test_a_dataset_emptied_by_max_words_is_named_while_others_run(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lavakv"), "propagate", True)
    data = _longbench_dir(tmp_path / "data", {"qasper": [300, 500], "trec": [50, 80, 400]})
    with caplog.at_level(logging.WARNING, logger="lavakv"):
        samples = load_longbench(data, max_words=100)
    assert {sample.dataset for sample in samples} == {"trec"}
    assert any("removed all 2 samples of LongBench qasper" in r.getMessage() for r in caplog.records)
    assert not any("trec" in r.getMessage() for r in caplog.records)


def test_max_words_without_longbench_is_refused(tmp_path, capsys, no_model):
    assert main(_eval(tmp_path, "--benchmark", "niah", "--max-words", "3000")) == 2
    assert "--max-words filters LongBench samples only" in capsys.readouterr().err


def test_a_benchmark_without_samples_is_refused_before_loading(tmp_path, capsys, no_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "qasper.jsonl").write_text("")
    assert main(_eval(tmp_path, "--benchmark", "longbench", "--data", str(data))) == 2
    err = capsys.readouterr().err
    assert "--benchmark longbench has no samples" in err and str(data) in err


def test_niah_lengths_beyond_the_model_context_are_refused_before_any_sample(tmp_path, capsys, tiny):
    too_long = TINY_CONTEXT + 100
    assert main(_eval(tmp_path, "--benchmark", "niah", "--lengths", f"1000,{too_long}")) == 2
    err = capsys.readouterr().err
    assert f"niah length {too_long} does not fit the model's context of {TINY_CONTEXT} tokens" in err
    assert f"max_new_tokens={niah.NIAH_MAX_NEW_TOKENS}" in err
    assert f"at most {TINY_CONTEXT - niah.NIAH_MAX_NEW_TOKENS}" in err
    assert "length 1000 " not in err


def test_a_length_that_fits_only_without_its_answer_is_refused(tmp_path, capsys, tiny):
    assert main(_eval(tmp_path, "--benchmark", "niah", "--lengths", str(TINY_CONTEXT))) == 2
    assert f"niah length {TINY_CONTEXT} does not fit" in capsys.readouterr().err


def test_ruler_lengths_count_the_answer_and_fit_the_context_exactly(tmp_path, capsys, no_model):
    args = _eval(tmp_path, "--benchmark", "ruler", "--datasets", "vt", "--lengths", "1000", "--max-length", "999")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ruler length 1000 does not fit --max-length of 999 tokens" in err
    assert "give --lengths of at most 999" in err


def test_max_length_is_checked_before_loading(tmp_path, capsys, no_model):
    assert main(_eval(tmp_path, "--benchmark", "niah", "--lengths", "1000", "--max-length", "1000")) == 2
    err = capsys.readouterr().err
    assert "niah length 1000 does not fit --max-length of 1000 tokens" in err


def test_lengths_that_fit_pass():
    from lavakv.eval.benchmarks import check_lengths_fit

    check_lengths_fit("niah", [1000, TINY_CONTEXT - niah.NIAH_MAX_NEW_TOKENS], None, TINY_CONTEXT, "the context")
    check_lengths_fit("longbench", [10**6], None, TINY_CONTEXT, "the context")


@pytest.mark.parametrize("spelling", [["--shard", "-1/2"], ["--shard=-1/2"], ["--shard", "-2/3"]])
def test_a_negative_shard_reaches_the_shard_rule(spelling, tmp_path, capsys, no_model):
    assert main(_eval(tmp_path, "--benchmark", "niah", *spelling)) == 2
    err = capsys.readouterr().err
    assert "--shard i/N needs N >= 1 and 0 <= i < N" in err
    assert "expected one argument" not in err
    assert not (tmp_path / "run").exists()


def test_a_dash_value_does_not_swallow_a_missing_value():
    args = build_parser().parse_args(["eval", "--benchmark", "niah", "--out", "x", "--shard", "-1/2"])
    assert args.shard == "-1/2"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--benchmark", "niah", "--shard", "--out", "x"])


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--benchmark", "niah", "--datasets", "qasper"],
            "--datasets qasper is read by longbench, infinitebench, ruler",
        ),
        (["--benchmark", "niah", "--data", "."], "--data . is read by longbench, infinitebench, ruler only"),
        (["--benchmark", "longbench", "--data", ".", "--lengths", "1000"], "--lengths 1000 is read by niah, ruler"),
        (["--benchmark", "ruler", "--depths", "0.5"], "--depths 0.5 is read by niah only"),
        (["--benchmark", "longbench", "--data", ".", "--seed", "3"], "--seed 3 is read by niah, ruler only"),
    ],
)
def test_an_option_no_benchmark_of_the_run_reads_is_refused(options, message, tmp_path, capsys, no_model):
    assert main(_eval(tmp_path, *options)) == 2
    err = capsys.readouterr().err
    assert message in err and "does not use it" in err


def test_an_option_one_benchmark_of_the_run_reads_is_accepted(tmp_path, capsys, no_model):
    # --depths is niah's; in a niah,ruler run it passes the option check and fails only later, at the model.
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(_eval(tmp_path, "--benchmark", "niah,ruler", "--depths", "0.5", "--lengths", "1000"))


@pytest.mark.parametrize("option", [["--budgets", "64"], ["--window", "8"]])
def test_budgets_or_window_without_a_compressing_method_are_refused(option, tmp_path, capsys, no_model):
    command = ["eval", "--out", str(tmp_path / "run"), "--benchmark", "niah", "--methods", "full", *option]
    assert main(command) == 2
    assert f"{option[0]} {option[1]} has no effect: no method in --methods full compresses" in capsys.readouterr().err


def test_max_length_beyond_the_model_context_is_refused(tmp_path, capsys, tiny):
    data = _longbench_dir(tmp_path / "data", {"qasper": [100]})
    command = _eval(tmp_path, "--benchmark", "longbench", "--data", str(data), "--max-length", str(TINY_CONTEXT + 1))
    assert main(command) == 2
    assert f"--max-length {TINY_CONTEXT + 1} exceeds the model's context of {TINY_CONTEXT}" in capsys.readouterr().err


def test_chat_template_on_without_one_is_refused(tmp_path, capsys, tiny):
    data = _longbench_dir(tmp_path / "data", {"qasper": [100]})
    command = _eval(tmp_path, "--benchmark", "longbench", "--data", str(data), "--chat-template", "on")
    assert main(command) == 2
    assert "--chat-template on: the model's tokenizer has no chat template" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "--device 'gpu' is not a device; valid: auto, cpu, cuda"), ("cuda:7", "--device cuda:7: this machine")],
)
def test_a_bad_or_missing_device_is_a_clear_error(device, message, monkeypatch):
    import torch

    from lavakv.cli import _eval_device

    if device.startswith("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape(message)):
        _eval_device(device, None)
    assert _eval_device("cpu", None) == "cpu"


def test_a_non_integer_local_rank_is_named():
    from lavakv.eval.runner import resolve_shard

    with pytest.raises(ValueError, match=r"LOCAL_RANK='gpu0' must be an integer"):
        resolve_shard("auto", None, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "gpu0"})


def test_a_bug_in_a_command_surfaces_as_a_traceback_not_a_user_error(tmp_path, monkeypatch, capsys):
    from lavakv import cli

    def buggy(args):
        return len(None)

    monkeypatch.setattr(cli, "cmd_report", buggy)
    with pytest.raises(TypeError, match="NoneType"):
        main(["report", str(tmp_path)])
    assert "lavakv: error" not in capsys.readouterr().err


def test_a_bad_option_value_is_still_a_one_line_user_error(capsys, no_model):
    assert main(["generate", "--method", "lava:alphaa=0.5", "--budget", "64", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavakv: error:") and "alphaa" in err
