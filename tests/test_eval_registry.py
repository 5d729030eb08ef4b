"""The benchmark registry and ``lavakv.eval.evaluate``: a registered benchmark is a ``lavakv eval`` benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import TinyTokenizer, random_prompt, tiny_model

import lavakv.eval
from lavakv import models
from lavakv.cli import build_parser, eval_config, main
from lavakv.eval.benchmarks import BENCHMARKS, Benchmark, create_benchmark, ints, option, register_benchmark
from lavakv.eval.evaluation import EvalConfig, evaluate
from lavakv.eval.report import dataset_categories
from lavakv.eval.samples import Sample
from lavakv.eval.store import read_run


@dataclass(frozen=True)
class Digits(Benchmark):
    """Prompts of random ids whose answer is one of them: enough to exercise the harness on a tiny model."""

    name: ClassVar[str] = "digits-test"

    sizes: tuple[int, ...] = option((120, 150), "prompt lengths in ids", ints)

    def samples(self, tokenizer, chat_template: bool = True) -> list[Sample]:
        samples = []
        for index, size in enumerate(self.sizes[: self.limit or None]):
            ids = random_prompt(size, seed=index)
            samples.append(
                Sample(
                    self.name,
                    "ids",
                    f"s{index}",
                    " ".join(map(str, ids)),
                    " 7 8 9",
                    [str(ids[5])],
                    4,
                    "string_match_all",
                )
            )
        return samples


@pytest.fixture
def digits(monkeypatch):
    monkeypatch.setitem(BENCHMARKS, Digits.name, Digits)
    model = tiny_model("llama", max_position_embeddings=2048)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: (model, TinyTokenizer()))
    return model


def test_the_shipped_benchmarks_are_registered_with_their_options():
    assert list(BENCHMARKS)[:4] == ["niah", "ruler", "longbench", "infinitebench"]
    assert BENCHMARKS["niah"].options() == ("limit", "lengths", "depths", "seed")
    assert BENCHMARKS["longbench"].reads_files and not BENCHMARKS["niah"].reads_files
    assert create_benchmark("niah", lengths=[1000], limit=2).lengths == (1000,)


def test_an_option_the_benchmark_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match="benchmark longbench takes no option lengths; its options: limit, data"):
        create_benchmark("longbench", lengths=[1000])
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; valid: niah, ruler"):
        create_benchmark("nope")


def test_registering_a_name_twice_is_refused():
    @dataclass(frozen=True)
    class Other(Benchmark):
        name: ClassVar[str] = "niah"

    with pytest.raises(ValueError, match="benchmark 'niah' is already registered by Niah"):
        register_benchmark(Other)
    assert BENCHMARKS["niah"].__name__ == "Niah"


def test_a_registered_benchmark_gets_its_fields_as_flags(digits, tmp_path):
    args = build_parser().parse_args(["eval", "--benchmark", "digits-test", "--sizes", "130,140", "--out", "x"])
    config = eval_config(args)
    assert config.benchmarks == (Digits(sizes=(130, 140)),)
    bad = build_parser().parse_args(["eval", "--benchmark", "niah", "--sizes", "130", "--out", "x"])
    with pytest.raises(ValueError, match="--sizes 130 is read by digits-test only; --benchmark niah does not use it"):
        eval_config(bad)


def test_a_bad_list_value_names_the_flag(digits):
    args = build_parser().parse_args(["eval", "--benchmark", "digits-test", "--sizes", "1,x", "--out", "x"])
    with pytest.raises(ValueError, match="--sizes takes a comma-separated list of int values, got '1,x'"):
        eval_config(args)


def test_evaluate_runs_a_registered_benchmark_resumes_and_the_cli_agrees(digits, tmp_path, capsys):
    config = EvalConfig(
        benchmarks=(Digits(),), out=str(tmp_path / "run"), methods=("full", "snapkv"), budgets=(32,), progress=False
    )
    first = evaluate(config)
    assert first.written == 4 and len(first.rows) == 4 and first.errors == 0
    assert {(row.sample_id, row.method, row.budget) for row in first.rows} == {
        (sample, method, budget) for sample in ("s0", "s1") for method, budget in (("full", 0), ("snapkv", 32))
    }
    again = evaluate(config)
    assert again.written == 0 and len(again.rows) == 4
    identity, _ = read_run(tmp_path / "run")
    assert identity["seed"] == 0 and identity["max_length"] == 2048
    command = ["eval", "--benchmark", "digits-test", "--methods", "full,snapkv", "--budgets", "32"]
    assert main([*command, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert "4 results in" in capsys.readouterr().out
    assert lavakv.eval.evaluate is evaluate and lavakv.eval.EvalConfig is EvalConfig


def test_a_config_with_no_or_repeated_benchmarks_is_refused():
    with pytest.raises(ValueError, match="at least one benchmark"):
        EvalConfig(benchmarks=(), out="x")
    with pytest.raises(ValueError, match="a benchmark is named twice in niah, niah"):
        EvalConfig(benchmarks=(create_benchmark("niah"), create_benchmark("niah", seed=1)), out="x")


def test_categories_come_from_the_benchmark_class():
    assert dataset_categories("longbench", {"qasper", "trec_e", "hotpotqa"}) == {
        "single-doc QA": ["qasper"],
        "multi-doc QA": ["hotpotqa"],
        "few-shot": ["trec_e"],
    }
    assert dataset_categories("niah", {"niah"}) == {}
    assert dataset_categories("unregistered", {"a"}) == {}
