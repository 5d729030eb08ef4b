"""Budgets too small for a method's options: StreamingLLM's sink must fit beside the window."""

from __future__ import annotations

import logging

import pytest
from conftest import random_prompt, tiny_model

import lavakv
from lavakv.bench import check_bench_arguments
from lavakv.cli import main
from lavakv.eval.runner import make_pairs
from lavakv.methods import Budget, Method, parse_spec


def _streaming(sink: int, **options) -> Method:
    return Method.preset("streamingllm", sink=sink, **options)


def test_a_sink_larger_than_the_budget_minus_the_window_is_refused():
    method = _streaming(200)
    with pytest.raises(ValueError) as error:
        method.check_budget(Budget(64))
    message = str(error.value)
    assert "sink 200" in message and "budget 64" in message
    assert f"sink must be <= {64 - method.window}" in message
    assert "sink + window <= budget" in message


@pytest.mark.parametrize("window", [8, 32])
def test_the_sink_may_fill_exactly_what_the_window_leaves(window):
    budget = 48
    _streaming(budget - window, window=window).check_budget(Budget(budget))
    with pytest.raises(ValueError, match=f"sink {budget - window + 1} does not fit in budget {budget}"):
        _streaming(budget - window + 1, window=window).check_budget(Budget(budget))


def test_the_half_window_policy_leaves_the_sink_half_the_budget():
    budget = Budget(32, window_policy="half")
    window = budget.window_for(Method.preset("streamingllm").window, 32)
    _streaming(32 - window).check_budget(budget)
    with pytest.raises(ValueError, match=f"sink must be <= {32 - window}"):
        _streaming(32 - window + 1).check_budget(budget)


def test_methods_without_a_sink_and_ratio_budgets_pass_up_front():
    parse_spec("snapkv").check_budget(Budget(33))
    _streaming(200).check_budget(Budget(ratio=0.1))
    Method.preset("full").check_budget(Budget(64))


def test_eval_refuses_the_sink_before_loading_anything(tmp_path, capsys):
    out = tmp_path / "run"
    command = ["eval", "--benchmark", "niah", "--methods", "streamingllm:sink=200", "--budgets", "64"]
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sink 200 does not fit in budget 64" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="sink 200"):
        make_pairs(["streamingllm:sink=200"], [64], window=16)


def test_bench_refuses_the_sink():
    with pytest.raises(ValueError, match="sink 100 does not fit in budget 64"):
        check_bench_arguments(["streamingllm:sink=100"], [64], 2048, 8)


def test_a_ratio_budget_warns_when_one_prompt_leaves_no_room_for_the_sink(tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("lavakv"), "propagate", True)
    model = tiny_model("llama")
    length, ratio, sink = 200, 0.25, 30
    tokens = Budget(ratio=ratio).tokens_for(length)
    with caplog.at_level(logging.WARNING, logger="lavakv"):
        out = lavakv.generate(
            model, tokenizer, random_prompt(length), method="streamingllm", ratio=ratio, sink=sink, max_new_tokens=2
        )
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    expected = (f"sink {sink} does not fit in budget {tokens}", f"{length}-token prompt")
    assert any(all(part in line for part in expected) for line in warnings)
    assert out.stats.kept_entries == tokens * 2 * 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lavakv"):
        lavakv.generate(model, tokenizer, random_prompt(length), method="streamingllm", ratio=ratio, max_new_tokens=2)
    assert not [record for record in caplog.records if "sink" in record.getMessage()]
