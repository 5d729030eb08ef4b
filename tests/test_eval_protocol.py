"""The evaluation protocol: pred.py truncation, error rows, batched decoding, shard stores, intervals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TinyTokenizer, random_prompt, tiny_model
from eval_worker import PAIRS, tiny_samples

from lavakv.eval import runner as runner_module
from lavakv.eval.report import load_runs, paired_differences, render
from lavakv.eval.runner import (
    BUDGET_SPREAD,
    decode_groups,
    error_row,
    evaluate_sample,
    make_pairs,
    plan,
    prepare,
    run,
)
from lavakv.eval.samples import Sample, error_sample, interleave_datasets
from lavakv.eval.shards import resolve_shard, shard_from_launcher, shard_members
from lavakv.eval.stats import bootstrap_mean, paired_difference
from lavakv.eval.store import ResultStore, read_run, run_done_keys, store_paths
from lavakv.methods import PRESETS

WORKER = Path(__file__).resolve().parent / "eval_worker.py"
ALL_PAIRS = make_pairs(
    [name for name, method in PRESETS.items() if not method.reads_profile]
    + ["lava:heads=uniform", "ada-snapkv:layers=lava"],
    [24, 48],
)
"""Every preset that runs without a profile file (those are tested with one in test_profiles.py)."""


def _sample(length: int = 150, question: str = " 7 8 9", new_tokens: int = 6, seed: int = 3) -> Sample:
    ids = random_prompt(length, seed=seed)
    return Sample("tiny", "ids", f"s{seed}", " ".join(map(str, ids)), question, ["5"], new_tokens, "string_match_all")


# ------------------------------------------------------------------------------ pred.py truncation


def test_prepare_cuts_the_whole_prompt_in_the_middle_and_keeps_the_question():
    tokenizer = TinyTokenizer()
    sample = _sample(150, question=" 7 8 9")
    prepared = prepare(tokenizer, sample, "auto", 40)
    ids = tokenizer(sample.prompt)["input_ids"]
    # 153 tokens cut to 20 + 20; the join of "... 63" and "77 ..." decodes two numbers as one token.
    head, tail = ids[:20], ids[-20:]
    joined = tokenizer(" ".join(map(str, head)) + " ".join(map(str, tail)))["input_ids"]
    assert prepared.truncated and prepared.context + prepared.question == joined
    assert prepared.question == [7, 8, 9] and prepared.question_whole
    whole = prepare(tokenizer, sample, "auto", 153)
    assert not whole.truncated and whole.context + whole.question == ids


def test_a_question_cut_by_truncation_is_an_error_row_in_the_query_agnostic_protocol(tmp_path):
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    long_question = " " + " ".join(["7"] * 30)
    samples = [_sample(150, question=long_question, seed=1), _sample(150, seed=2)]
    with ResultStore(tmp_path) as store:
        run(model, tokenizer, samples, PAIRS, store, protocol="query-agnostic", max_length=40, progress=False)
    _, rows = read_run(tmp_path)
    failed = [row for row in rows if row.error is not None]
    assert {row.sample_id for row in failed} == {"s1"} and len(failed) == len(PAIRS)
    assert all("reached into the question" in row.error for row in failed)
    assert all(row.error is None and row.new_tokens == 6 for row in rows if row.sample_id == "s2")
    # The query-aware protocol prefills the whole cut prompt and runs it.
    with ResultStore(tmp_path / "aware") as store:
        run(model, tokenizer, samples[:1], PAIRS, store, max_length=40, progress=False)
    assert all(row.error is None for row in read_run(tmp_path / "aware")[1])


# ------------------------------------------------------------------------------------ error rows


def test_one_failing_pair_is_an_error_row_and_the_run_goes_on(tmp_path, monkeypatch):
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    real_build = runner_module._build

    def failing_build(model, tokenizer, pair, record, prefilled):
        if pair.spec == "lava" and pair.tokens == 24:
            raise RuntimeError("out of memory (simulated)")
        return real_build(model, tokenizer, pair, record, prefilled)

    monkeypatch.setattr(runner_module, "_build", failing_build)
    with ResultStore(tmp_path) as store:
        written = run(model, tokenizer, tiny_samples(2), PAIRS, store, progress=False)
    assert written == 2 * len(PAIRS)
    _, rows = read_run(tmp_path)
    errors = [row for row in rows if row.error is not None]
    assert [(r.method, r.budget) for r in errors] == [("lava", 24)] * 2
    assert errors[0].error == "RuntimeError: out of memory (simulated)"
    report = render(load_runs([tmp_path]), "md")
    assert "**Errors**: 2 rows could not be run" in report and "out of memory (simulated)" in report
    records = json.loads(render(load_runs([tmp_path]), "json"))
    failed = [r for r in records if r["method"] == "lava" and r["budget"] == 24 and r["dataset"]]
    # One sample per dataset here: each dataset's record of lava@24 has no score and one error.
    assert [(r["samples"], r["errors"], r["score"]) for r in failed] == [(0, 1, "")] * 2
    assert all(r["errors"] == 0 for r in records if r["dataset"] and r["method"] != "lava")
    # A resume leaves error rows alone; --retry-errors runs them again and the scored rows replace them.
    monkeypatch.setattr(runner_module, "_build", real_build)
    with ResultStore(tmp_path) as store:
        assert run(model, tokenizer, tiny_samples(2), PAIRS, store, progress=False) == 0
        assert run(model, tokenizer, tiny_samples(2), PAIRS, store, progress=False, retry_errors=True) == 2
    _, rows = read_run(tmp_path)
    assert len(rows) == 2 * len(PAIRS) and all(row.error is None for row in rows)


def test_a_sample_that_cannot_be_built_is_an_error_row_per_pair(tmp_path):
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    broken = Sample("tiny", "ids", "empty", "   ", " 7", ["5"], 4, "string_match_all")
    with ResultStore(tmp_path) as store:
        run(model, tokenizer, [broken, *tiny_samples(1)], PAIRS, store, progress=False)
    _, rows = read_run(tmp_path)
    assert sorted(r.sample_id for r in rows if r.error) == ["empty"] * len(PAIRS)
    assert all("the context is empty" in r.error for r in rows if r.error)
    assert sum(r.error is None for r in rows) == len(PAIRS)


def test_a_record_that_could_not_be_read_is_an_error_row_per_pair_with_its_message(tmp_path):
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    bad = error_sample("tiny", "ids", "ids-2", "data.jsonl:2: missing required field 'input'")
    with ResultStore(tmp_path) as store:
        run(model, tokenizer, [bad, *tiny_samples(1)], PAIRS, store, progress=False)
    _, rows = read_run(tmp_path)
    errors = [r for r in rows if r.error]
    assert len(errors) == len(PAIRS) and {r.sample_id for r in errors} == {"ids-2"}
    assert all("data.jsonl:2: missing required field 'input'" in r.error for r in errors)
    assert sum(r.error is None for r in rows) == len(PAIRS)


# ------------------------------------------------------------------------------- batched decoding


def test_decode_groups_batch_close_budgets_and_the_full_cache_alone():
    pairs = ALL_PAIRS + make_pairs(["snapkv", "h2o"], [200])
    for cap in (1, 3, 4, 32):
        groups = decode_groups(pairs, cap)
        assert sorted(p.key for group in groups for p in group) == sorted(p.key for p in pairs)
        assert all(len(group) <= cap for group in groups)
        for group in groups:
            budgets = [p.tokens for p in group]
            assert (0 not in budgets) or set(budgets) == {0}
            assert 0 in budgets or max(budgets) <= BUDGET_SPREAD * min(budgets)
    assert [len(g) for g in decode_groups(pairs, 1)] == [1] * len(pairs)
    together = decode_groups(pairs, 32)
    # 24 and 48 decode together (in batches of 32); 200 is more than 4x 24, so it starts a batch of its own.
    compressing = len(ALL_PAIRS) - 1
    full_batches = [32] * (compressing // 32) + ([compressing % 32] if compressing % 32 else [])
    assert sorted(len(g) for g in together) == sorted([1, 2, *full_batches])
    with pytest.raises(ValueError, match="decode_batch must be an integer >= 1"):
        decode_groups(ALL_PAIRS, 0)


@pytest.mark.parametrize("kind", ["llama", "mistral-sliding"])
@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_batched_decoding_gives_the_predictions_of_one_pair_at_a_time(kind, protocol):
    model, tokenizer = tiny_model(kind), TinyTokenizer()
    prepared = prepare(tokenizer, _sample(170, new_tokens=8), "auto", 4096)
    alone = {r.key: r for r in evaluate_sample(model, tokenizer, prepared, ALL_PAIRS, protocol, decode_batch=1)}
    # Stop on a token some rows produce early, so that rows finish at different steps.
    model.generation_config.eos_token_id = alone[("tiny", "ids", "s3", "lava", 24)].prediction.split()[2]
    model.generation_config.eos_token_id = int(model.generation_config.eos_token_id)
    alone = {r.key: r for r in evaluate_sample(model, tokenizer, prepared, ALL_PAIRS, protocol, decode_batch=1)}
    batched = {r.key: r for r in evaluate_sample(model, tokenizer, prepared, ALL_PAIRS, protocol, decode_batch=16)}
    assert batched.keys() == alone.keys()
    assert len({r.new_tokens for r in alone.values()}) > 1
    for key, row in alone.items():
        other = batched[key]
        assert (other.prediction, other.new_tokens, other.kept_entries, other.kv_bytes) == (
            row.prediction,
            row.new_tokens,
            row.kept_entries,
            row.kv_bytes,
        ), key
        rows_with_it = next(len(g) for g in decode_groups(ALL_PAIRS, 16) if key[3:] in [p.key for p in g])
        assert row.decode_rows == 1 and other.decode_rows == rows_with_it


def test_batched_decoding_from_scratch_equals_the_shared_prefill():
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    prepared = prepare(tokenizer, _sample(140), "auto", 4096)
    shared = {r.key: r.prediction for r in evaluate_sample(model, tokenizer, prepared, ALL_PAIRS, "query-aware")}
    scratch = evaluate_sample(model, tokenizer, prepared, ALL_PAIRS, "query-aware", from_scratch=True)
    assert {r.key: r.prediction for r in scratch} == shared


# ---------------------------------------------------------------------------------------- shards


def test_shard_from_the_launchers_variables():
    assert shard_from_launcher({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    assert shard_from_launcher({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == (2, 3, None)
    with pytest.raises(ValueError, match="none of RANK/WORLD_SIZE, SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"):
        shard_from_launcher({})
    with pytest.raises(ValueError, match=r"RANK=4 must be in \[0, WORLD_SIZE=4\)"):
        shard_from_launcher({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must both be integers"):
        shard_from_launcher({"RANK": "x", "WORLD_SIZE": "2"})
    auto = resolve_shard("auto", None, {"RANK": "0", "WORLD_SIZE": "2"})
    assert (auto.part, auto.store_name) == ((0, 2), "results.shard-0-of-2.sqlite")
    assert resolve_shard("1/2", None, {}).store_name == "results.sqlite"
    assert resolve_shard("1/2", "own", {}).store_name == "results.shard-1-of-2.sqlite"
    with pytest.raises(ValueError, match="--shard-store must be one of shared, own"):
        resolve_shard("1/2", "mine", {})


def _niah_samples(count: int) -> list[Sample]:
    return [
        Sample("niah", "niah", f"len1000-depth{index}", "context", "question?", ["answer"], 8, "substring")
        for index in range(count)
    ]


@pytest.mark.parametrize(("samples", "shards"), [(4, 2), (5, 3), (2, 4), (27, 8), (1, 1)])
def test_shards_are_balanced_to_within_one_sample_and_cover_each_sample_once(samples, shards, tmp_path):
    with ResultStore(tmp_path / "run") as store:
        per_shard = [
            [s.sample_id for s, _ in plan(_niah_samples(samples), PAIRS, store, shard=(index, shards))]
            for index in range(shards)
        ]
    sizes = [len(ids) for ids in per_shard]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(i for ids in per_shard for i in ids) == sorted(s.sample_id for s in _niah_samples(samples))


def test_a_shard_keeps_its_samples_when_rows_are_already_done(tmp_path):
    samples = _niah_samples(6)
    members = shard_members([(s.benchmark, s.dataset, s.sample_id) for s in samples], 2)
    with ResultStore(tmp_path / "run") as store:
        before = [s.sample_id for s, _ in plan(samples, PAIRS, store, shard=(0, 2))]
        finished = samples[min(members[1])]
        for pair in PAIRS:
            store.add(error_row(finished, pair, RuntimeError("stopped")))
        after = [s.sample_id for s, _ in plan(samples, PAIRS, store, shard=(0, 2))]
    assert before == after == [samples[i].sample_id for i in sorted(members[0])]
    with pytest.raises(ValueError, match="shard count must be an integer >= 1, got 0"):
        shard_members([("a",)], 0)


def _reference_rows(tmp_path: Path) -> dict:
    with ResultStore(tmp_path / "reference") as store:
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(), PAIRS, store, progress=False)
    return {row.key: row.prediction for row in read_run(tmp_path / "reference")[1]}


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
    reason="torchrun is not installed",
)
def test_torchrun_shards_write_their_own_stores_and_report_reads_them_as_one_run(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = tmp_path / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [torchrun, "--nproc-per-node", "2", "--master-port", "0", str(WORKER), str(out), "--shard", "auto"]
    subprocess.run(command, check=True, env=environment, timeout=600)
    assert [p.name for p in store_paths(out)] == ["results.shard-0-of-2.sqlite", "results.shard-1-of-2.sqlite"]
    per_file = [len(ResultStore(out, create=False, name=p.name).rows()) for p in store_paths(out)]
    assert all(count > 0 for count in per_file)
    _, rows = read_run(out)
    assert {row.key: row.prediction for row in rows} == _reference_rows(tmp_path)
    assert sum(per_file) == len(rows) == len(tiny_samples()) * len(PAIRS)
    # A resume of either shard finds its work done in the directory.
    with ResultStore(out, name="results.shard-0-of-2.sqlite") as store:
        assert (
            run(tiny_model("llama"), TinyTokenizer(), tiny_samples(), PAIRS, store, shard=(0, 2), progress=False) == 0
        )
    assert "| full cache |" in render(load_runs([out]), "md")


def test_a_shard_store_still_being_created_reads_as_empty(tmp_path):
    # torchrun starts the shards at once: one may read the directory while another's file has no tables yet.
    with ResultStore(tmp_path, name="results.shard-0-of-2.sqlite") as store:
        store.claim_identity({"model": "a"})
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(1), PAIRS[:1], store, progress=False)
    (tmp_path / "results.shard-1-of-2.sqlite").write_bytes(b"")
    identity, rows = read_run(tmp_path)
    assert identity == {"model": "a"} and len(rows) == 1
    assert run_done_keys(tmp_path) == {rows[0].key}
    # Once created, the file holds every table at once and its rows are read.
    with ResultStore(tmp_path, name="results.shard-1-of-2.sqlite") as store:
        store.claim_identity({"model": "a"})
    assert len(read_run(tmp_path)[1]) == 1


def test_a_run_recorded_without_a_setting_is_not_resumed_under_it(tmp_path):
    with ResultStore(tmp_path) as store:
        store.claim_identity({"model": "a"})
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(1), PAIRS[:1], store, progress=False)
    with ResultStore(tmp_path) as store:
        with pytest.raises(ValueError, match="holds a run recorded without prompt_tokens .an earlier lavakv"):
            store.claim_identity({"model": "a", "prompt_tokens": "whole"})
        store.claim_identity({"model": "a"})
    # Without results yet, a directory takes the new settings.
    with ResultStore(tmp_path / "fresh") as store:
        store.claim_identity({"model": "a"})
        store.claim_identity({"model": "a", "prompt_tokens": "whole"})
        assert store.identity() == {"model": "a", "prompt_tokens": "whole"}


def test_store_files_of_different_runs_are_refused(tmp_path):
    with ResultStore(tmp_path, name="results.shard-0-of-2.sqlite") as store:
        store.claim_identity({"model": "a"})
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(1), PAIRS[:1], store, progress=False)
    with ResultStore(tmp_path, name="results.shard-1-of-2.sqlite") as store:
        with pytest.raises(ValueError, match="belong to different runs"):
            store.claim_identity({"model": "b"})


# ------------------------------------------------------------------------------------- intervals


def test_bootstrap_interval_of_two_values_is_their_range():
    # Replicate means of [0, 100] resampled: 0, 50, 100 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles are 0 and 100.
    interval = bootstrap_mean([[0.0, 100.0]], seed=1, resamples=4000)
    assert (interval.mean, interval.low, interval.high) == (50.0, 0.0, 100.0)
    assert bootstrap_mean([[7.0, 7.0, 7.0]], seed=1) == bootstrap_mean([[7.0, 7.0, 7.0]], seed=2)
    constant = bootstrap_mean([[7.0, 7.0, 7.0]], seed=1)
    assert (constant.low, constant.high) == (7.0, 7.0)


def test_bootstrap_is_seeded_and_narrows_with_more_samples():
    values = [float(i % 5) for i in range(20)]
    assert bootstrap_mean([values], seed=3) == bootstrap_mean([values], seed=3)
    few, many = bootstrap_mean([values], seed=3), bootstrap_mean([values * 25], seed=3)
    assert few.low < few.mean < few.high and many.mean == few.mean
    assert many.high - many.low < (few.high - few.low) / 3
    # Stratified: the average of two datasets' means, each resampled on its own.
    both = bootstrap_mean([[0.0] * 10, [100.0] * 2], seed=0)
    assert (both.mean, both.low, both.high) == (50.0, 50.0, 50.0)


def test_paired_difference_counts_wins_ties_losses():
    found = paired_difference([[(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0)]], seed=0)
    assert (found.wins, found.ties, found.losses, found.samples) == (2, 1, 1, 4)
    assert found.interval.mean == pytest.approx(0.25)


def test_report_reference_shows_paired_differences(tmp_path):
    with ResultStore(tmp_path) as store:
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(), PAIRS, store, progress=False)
    runs = load_runs([tmp_path])
    differences = paired_differences(runs[0].rows, "full")
    rows = {r.key: r for r in runs[0].rows}
    key = ("tiny", "ids", "lava", 24)
    mine = [rows[("tiny", "ids", s, "lava", 24)].score for s in ("s1", "s3", "s5")]
    full = [rows[("tiny", "ids", s, "full", 0)].score for s in ("s1", "s3", "s5")]
    assert differences[key].interval.mean == pytest.approx(100 * (sum(mine) - sum(full)) / 3)
    assert differences[key].samples == 3
    assert ("tiny", "", "lava", 24) in differences
    markdown = render(runs, "md", reference="full")
    assert "Paired difference to full cache on the same samples" in markdown
    with pytest.raises(ValueError, match="--reference 'h2o'.*has no results"):
        render(runs, "md", reference="h2o")


def test_interleave_datasets_takes_samples_round_robin_in_each_datasets_order():
    def sample(dataset: str, index: int, benchmark: str = "b") -> Sample:
        return Sample(benchmark, dataset, f"{dataset}{index}", "c", "q", ["a"], 1, "qa_f1")

    samples = [sample("x", 0), sample("x", 1), sample("x", 2), sample("y", 0), sample("z", 0), sample("z", 1)]
    samples.append(sample("x", 0, benchmark="other"))  # same dataset name, other benchmark: its own queue
    ordered = interleave_datasets(samples)
    assert [(s.benchmark, s.sample_id) for s in ordered] == [
        ("b", "x0"),
        ("b", "y0"),
        ("b", "z0"),
        ("other", "x0"),
        ("b", "x1"),
        ("b", "z1"),
        ("b", "x2"),
    ]
    assert interleave_datasets([]) == []
