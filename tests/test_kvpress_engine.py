"""The kvpress engine's lavakv half: requests, rows from generations, error rows, resumption, identity.

kvpress itself runs in its own venv (benchmarks/kvpress/setup_venv.sh); here a stand-in script plays
``generate.py``'s part, writing generation lines as it does, so the engine is tested without it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TinyTokenizer
from eval_worker import tiny_samples

from lavakv.eval.benchmarks import create_benchmark
from lavakv.eval.evaluation import EvalConfig, logged_config, run_identity
from lavakv.eval.runner import plan, prepare
from lavakv.eval.samples import Sample
from lavakv.eval.store import ResultStore, read_run

KVPRESS = Path(__file__).resolve().parent.parent / "benchmarks" / "kvpress"
STOP = 95


def _engine():
    spec = importlib.util.spec_from_file_location("kvpress_engine", KVPRESS / "engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


engine = _engine()


class WordTokenizer:
    """Ids to words joined by spaces, with a line break among them: enough to check first-line answers."""

    words = {1: "painting", 2: "seagulls", 3: "\n", 4: "watercolors", STOP: "<|im_end|>"}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i == STOP))


def _needle_sample(**overrides) -> Sample:
    fields = dict(
        benchmark="niah",
        dataset="niah",
        sample_id="len100-depth0.50",
        context="1 2 3 4 5 6 7 8",
        question=" 9 10",
        answers=["painting seagulls"],
        max_new_tokens=8,
        metric="needle_recall",
        stop_at_newline=True,
        extra={"depth": 0.5, "length": 100},
    )
    return Sample(**(fields | overrides))


def _generation(tokens, **overrides) -> dict:
    return {
        "tokens": tokens,
        "kv_bytes": 4096,
        "kept_entries": 240,
        "full_entries": 900,
        "window": 64,
        "layer_budgets": [8.0, 7.5],
        "prefill_seconds": 0.25,
        "decode_seconds": 0.5,
    } | overrides


def test_press_pairs_key_rows_as_kvpress_methods_and_agree_with_generate_py():
    pairs = engine.press_pairs(["snapkv", "full", "ada-snapkv", "snapkv"], [64, 128])
    assert [pair.key for pair in pairs] == [
        ("kvpress:snapkv", 64),
        ("kvpress:snapkv", 128),
        ("kvpress:full", 0),
        ("kvpress:ada-snapkv", 64),
        ("kvpress:ada-snapkv", 128),
    ]
    with pytest.raises(ValueError, match="unknown kvpress press 'lava'"):
        engine.press_pairs(["lava"], [64])
    with pytest.raises(ValueError, match="needs at least one budget"):
        engine.press_pairs(["snapkv"], [])
    with pytest.raises(ValueError, match="integers >= 1"):
        engine.press_pairs(["snapkv"], [0])
    tree = ast.parse((KVPRESS / "generate.py").read_text())
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PRESSES"
    }
    assert assigned["PRESSES"] == engine.PRESSES


def test_a_generation_is_decoded_cut_at_its_first_line_and_scored_as_lavakv_eval_does():
    sample = _needle_sample()
    prepared = prepare(TinyTokenizer(), sample, "auto", 100)
    pair = engine.PressPair("snapkv", 128)
    # The stop id is dropped; the answer ends at the line break, as the runner's first_line cuts it.
    row = engine.generation_row(sample, prepared, pair, _generation([1, 2, 3, 4, STOP]), WordTokenizer(), {STOP})
    assert (row.method, row.budget, row.window, row.error) == ("kvpress:snapkv", 128, 64, None)
    assert row.prediction == "painting seagulls "
    assert row.score == 1.0
    assert row.new_tokens == 5 and row.prompt_tokens == len(prepared.prompt) == 10
    assert (row.kept_entries, row.full_entries, row.kv_bytes) == (240, 900, 4096)
    assert (row.prefill_seconds, row.compress_seconds, row.decode_seconds, row.decode_rows) == (0.25, 0.0, 0.5, 1)
    assert row.layer_budgets == [8.0, 7.5] and row.extra == {"depth": 0.5, "length": 100}
    half = engine.generation_row(sample, prepared, pair, _generation([4, 2]), WordTokenizer(), {STOP})
    assert half.prediction == "watercolors seagulls" and half.score == 0.5
    # Without stop_at_newline the whole answer counts.
    whole = _needle_sample(stop_at_newline=False)
    row = engine.generation_row(whole, prepared, pair, _generation([4, 3, 1, 2]), WordTokenizer(), {STOP})
    assert row.prediction == "watercolors \n painting seagulls" and row.score == 1.0


def test_a_generation_error_is_an_error_row_that_keeps_kvpress_message():
    sample = _needle_sample()
    prepared = prepare(TinyTokenizer(), sample, "auto", 100)
    message = "ValueError: budget 128 must be between 0 and the 10 prefilled tokens (raised at generate.py:46 in x)"
    row = engine.generation_row(
        sample, prepared, engine.PressPair("pyramidkv", 128), {"error": message}, WordTokenizer(), {STOP}
    )
    assert row.error == message
    assert (row.method, row.budget, row.score, row.prediction, row.new_tokens) == ("kvpress:pyramidkv", 128, 0.0, "", 0)
    assert row.prompt_tokens == 10 and row.answers == ["painting seagulls"]


def test_requests_feed_the_question_after_compression_only_in_the_query_agnostic_protocol():
    sample = _needle_sample()
    prepared = prepare(TinyTokenizer(), sample, "auto", 100)
    pairs = engine.press_pairs(["full", "snapkv"], [4])
    aware = engine.request_of(prepared, pairs, "query-aware", {STOP, 7})
    assert aware["key"] == ["niah", "niah", "len100-depth0.50"]
    assert aware["prefill_ids"] == list(range(1, 11)) and aware["after_prefill_ids"] == []
    assert aware["stop_ids"] == [7, STOP] and aware["max_new_tokens"] == 8 and aware["stop_at_newline"] is True
    assert aware["pairs"] == [["full", 0], ["snapkv", 4]]
    agnostic = engine.request_of(prepared, pairs, "query-agnostic", {STOP})
    assert agnostic["prefill_ids"] == list(range(1, 9)) and agnostic["after_prefill_ids"] == [9, 10]
    cut = prepare(TinyTokenizer(), sample, "auto", 2)
    assert not cut.question_whole
    with pytest.raises(ValueError, match="reached into the question"):
        engine.request_of(cut, pairs, "query-agnostic", {STOP})


FAKE_GENERATE = textwrap.dedent(
    """
    # Stands in for generate.py: answers each pair, fails on pyramidkv, dies before budget 48.
    import json, sys

    _, model_dir, requests, generations = sys.argv
    with open(generations, "a") as out:
        for line in open(requests):
            request = json.loads(line)
            for press, budget in request["pairs"]:
                if budget == 48:
                    print("Killed: out of memory", file=sys.stderr)
                    sys.exit(3)
                key = {"key": request["key"], "press": press, "budget": budget}
                if press == "pyramidkv":
                    out.write(json.dumps(key | {"error": "RuntimeError: no pyramid here"}) + "\\n")
                    continue
                answer = request["prefill_ids"][5] if press == "snapkv" else 1
                n = len(request["prefill_ids"])
                out.write(json.dumps(key | {
                    "tokens": [answer, request["stop_ids"][0]], "kv_bytes": 8 * budget, "kept_entries": budget,
                    "full_entries": n, "window": 64 if budget else None, "layer_budgets": [float(budget or n)],
                    "prefill_seconds": 0.1, "decode_seconds": 0.2, "model_dir": model_dir,
                }) + "\\n")
                out.flush()
    """
)


def _work(samples, pairs, store):
    return [(sample, pending, 4096) for sample, pending in plan(samples, pairs, store)]


def test_the_engine_stores_rows_as_they_come_error_rows_for_failures_and_resumes(tmp_path):
    script = tmp_path / "fake_generate.py"
    script.write_text(FAKE_GENERATE)
    out = tmp_path / "run"
    samples = tiny_samples(3)
    bad = Sample("tiny", "ids", "unbuildable", "", "", [], 1, "", error="the record has no context")
    pairs = engine.press_pairs(["full", "snapkv", "pyramidkv"], [24])
    identity = run_identity(EvalConfig(benchmarks=(create_benchmark("niah"),), out=str(tmp_path)), 4096)
    with ResultStore(out) as store:
        store.claim_identity(identity)
        work = _work(samples + [bad], pairs, store)
        written = engine.evaluate(
            store, TinyTokenizer(), {STOP}, "MODEL", work, "query-aware", "auto", sys.executable, script, quiet=True
        )
    assert written == 4 * 3
    _, rows = read_run(out)
    by_key = {(row.sample_id, row.method): row for row in rows}
    for sample in samples:
        snap = by_key[(sample.sample_id, "kvpress:snapkv")]
        assert snap.error is None and snap.score == 1.0 and snap.prediction == sample.answers[0]
        assert (snap.budget, snap.window, snap.kept_entries, snap.new_tokens) == (24, 64, 24, 2)
        full = by_key[(sample.sample_id, "kvpress:full")]
        assert full.error is None and full.score == 0.0 and full.prediction == "1" and full.window is None
        assert by_key[(sample.sample_id, "kvpress:pyramidkv")].error == "RuntimeError: no pyramid here"
    for method in ("kvpress:full", "kvpress:snapkv", "kvpress:pyramidkv"):
        assert "the record has no context" in by_key[("unbuildable", method)].error
    requests = [json.loads(line) for line in (out / "kvpress" / "requests.jsonl").read_text().splitlines()]
    assert [request["key"][2] for request in requests] == ["s0", "s1", "s2"]

    # Rerun with one more budget: done rows (error rows included) are skipped; the process dies at
    # budget 48, so every pair it left undone is an error row naming its status and last words.
    more = engine.press_pairs(["full", "snapkv", "pyramidkv"], [24, 48])
    with ResultStore(out) as store:
        store.claim_identity(identity)
        work = _work(samples + [bad], more, store)
        assert [(sample.sample_id, [pair.key for pair in pending]) for sample, pending, _ in work] == [
            (sample.sample_id, [("kvpress:snapkv", 48), ("kvpress:pyramidkv", 48)]) for sample in samples + [bad]
        ]
        written = engine.evaluate(
            store, TinyTokenizer(), {STOP}, "MODEL", work, "query-aware", "auto", sys.executable, script, quiet=True
        )
    assert written == 2 * 4
    _, rows = read_run(out)
    died = [row for row in rows if row.budget == 48 and row.sample_id != "unbuildable"]
    assert len(died) == 6
    assert all(
        row.error == "the kvpress process exited with status 3 before this pair: Killed: out of memory" for row in died
    )
    assert len(rows) == 4 * 3 + 4 * 2
    with ResultStore(out) as store:
        assert plan(samples, more, store) == []
        assert len(plan(samples, more, store, retry_errors=True)) == 3


def test_options_left_out_are_those_recorded_in_the_run_directory(tmp_path):
    args, rest = engine.build_parser().parse_known_args(["--out", str(tmp_path)])
    with pytest.raises(ValueError, match="give --benchmark"):
        engine.engine_config(args, rest)
    args, rest = engine.build_parser().parse_known_args(["--out", str(tmp_path), "--lengths", "1000"])
    with pytest.raises(ValueError, match="--lengths 1000: sample options go with --benchmark"):
        engine.engine_config(args, rest)
    recorded = EvalConfig(benchmarks=(create_benchmark("niah", lengths=[1000], limit=4),), out=str(tmp_path))
    with ResultStore(tmp_path) as store:
        store.claim_identity({"model": "smollm2"})
        store.log_invocation("lavakv eval", logged_config(recorded))
        store.log_invocation("engine.py", {"engine": "kvpress", **logged_config(recorded), "protocol": "x"})
    args, rest = engine.build_parser().parse_known_args(["--out", str(tmp_path), "--protocol", "query-agnostic"])
    config = engine.engine_config(args, rest)
    assert config.benchmarks == recorded.benchmarks and config.protocol == "query-agnostic"
    args, rest = engine.build_parser().parse_known_args(
        ["--out", str(tmp_path), "--benchmark", "niah", "--lengths", "500", "--limit", "1"]
    )
    given = engine.engine_config(args, rest)
    assert given.benchmarks[0].lengths == (500,) and given.benchmarks[0].limit == 1
    assert given.protocol == "query-aware" and given.chat_template == "auto"


def test_the_identity_is_lavakv_evals(tmp_path):
    identity = run_identity(EvalConfig(benchmarks=(create_benchmark("niah"),), out=str(tmp_path)), 8192)
    assert identity == {
        "model": "smollm2",
        "protocol": "query-aware",
        "chat_template": "auto",
        "max_length": 8192,
        "seed": 0,
        "window": "auto: min(32, budget // 2)",
        "scoring": "official",
        "prompt_tokens": "whole",
    }
