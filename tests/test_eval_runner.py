"""The evaluation runner, the results store (resume, crashes, shards) and reports, on tiny models."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyTokenizer, random_prompt, tiny_model
from eval_worker import PAIRS, tiny_samples

import lavakv
from lavakv.eval.plots import write_plots
from lavakv.eval.report import load_runs, render
from lavakv.eval.runner import Pair, evaluate_sample, make_pairs, prepare, run
from lavakv.eval.samples import Sample
from lavakv.eval.shards import parse_shard
from lavakv.eval.store import ResultStore
from lavakv.prompting import truncate_middle
from lavakv.recording import PrefillRecord

WORKER = Path(__file__).resolve().parent / "eval_worker.py"
METHODS = ["full", "snapkv", "pyramidkv", "ada-snapkv", "cake", "lava", "h2o", "streamingllm"]


def _key(row):
    return row.key


def _predictions(store_dir) -> dict:
    with ResultStore(store_dir, create=False) as store:
        return {row.key: (row.prediction, row.kept_entries) for row in store.rows()}


def _complete_run(directory: Path) -> dict:
    with ResultStore(directory) as store:
        run(tiny_model("llama"), TinyTokenizer(), tiny_samples(), PAIRS, store, progress=False)
    return _predictions(directory)


@pytest.mark.parametrize("kind", ["llama", "mistral-sliding", "gemma3"])
@pytest.mark.parametrize("protocol", ["query-aware", "query-agnostic"])
def test_prefill_once_gives_the_predictions_of_separate_prefills(kind, protocol):
    model, tokenizer = tiny_model(kind), TinyTokenizer()
    sample = tiny_samples(1)[0]
    pairs = make_pairs(METHODS, [24, 40])
    prepared = prepare(tokenizer, sample, "auto", 2048)
    shared = list(evaluate_sample(model, tokenizer, prepared, pairs, protocol))
    separate = list(evaluate_sample(model, tokenizer, prepared, pairs, protocol, from_scratch=True))
    assert [r.prediction for r in shared] == [r.prediction for r in separate]
    assert [r.kept_entries for r in shared] == [r.kept_entries for r in separate]
    assert {r.method for r in shared} == set(METHODS)
    question = " 7 8 9" if protocol == "query-agnostic" else None
    context = sample.context if question else sample.prompt
    for row in shared:
        budget = row.budget or None
        out = (
            lavakv.generate(
                model,
                tokenizer,
                context,
                method=row.method,
                budget=budget,
                max_new_tokens=5,
                question=question,
                window=row.window,
            )
            if row.method != "full"
            else lavakv.generate(model, tokenizer, context, method="full", max_new_tokens=5, question=question)
        )
        assert row.prediction == out.text, (row.method, row.budget)


def test_rows_record_budgets_and_bytes():
    model, tokenizer = tiny_model("llama"), TinyTokenizer()
    sample = tiny_samples(1)[0]
    rows = list(evaluate_sample(model, tokenizer, prepare(tokenizer, sample, "auto", 2048), PAIRS, "query-aware"))
    layers, kv_heads, dim = 4, 2, 16
    length = rows[0].prompt_tokens
    for row in rows:
        kept = min(row.budget or length, length) * kv_heads * layers
        assert row.kept_entries == kept
        assert row.full_entries == length * kv_heads * layers
        # The compressed prompt's bytes, whatever the answer's length.
        assert row.kv_bytes == kept * 2 * dim * 4
        assert abs(sum(row.layer_budgets) / layers - kept / kv_heads / layers) < 1e-6
        assert 0.0 <= row.score <= 1.0


def test_record_replay_matches_a_compressing_prefill():
    model = tiny_model("qwen3")
    ids = torch.tensor([random_prompt(200, seed=4)])
    record = PrefillRecord(model, ids)
    for method in ("lava", "cake", "ada-pyramidkv"):
        replayed = record.compress(method, budget=40)
        direct = lavakv.CompressedCache(model, method=method, budget=40)
        with torch.inference_mode():
            model(input_ids=ids, **lavakv.cache_argument(model, direct), use_cache=True)
        for layer in range(model.config.num_hidden_layers):
            for (pa, ka, va), (pb, kb, vb) in zip(replayed.kept_kv(layer), direct.kept_kv(layer)):
                assert torch.equal(pa, pb) and torch.equal(ka, kb) and torch.equal(va, vb)


def test_rerun_skips_finished_rows(tmp_path):
    first = _complete_run(tmp_path / "run")
    assert len(first) == len(tiny_samples()) * len(PAIRS)
    with ResultStore(tmp_path / "run") as store:
        written = run(tiny_model("llama"), TinyTokenizer(), tiny_samples(), PAIRS, store, progress=False)
    assert written == 0
    assert _predictions(tmp_path / "run") == first


def test_killed_run_resumes_without_losing_or_duplicating(tmp_path):
    reference = _complete_run(tmp_path / "reference")
    crashed = tmp_path / "crashed"
    for die_after in (3, 7):
        result = subprocess.run([sys.executable, str(WORKER), str(crashed), "--die-after", str(die_after)])
        assert result.returncode == -9
    assert 0 < len(_predictions(crashed)) < len(reference)
    subprocess.run([sys.executable, str(WORKER), str(crashed)], check=True)
    assert _predictions(crashed) == reference


def test_two_shards_write_one_store(tmp_path):
    reference = _complete_run(tmp_path / "reference")
    shared = tmp_path / "shared"
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(shared), "--shard", f"{i}/2"]) for i in range(2)]
    assert [w.wait() for w in workers] == [0, 0]
    assert _predictions(shared) == reference


def test_store_refuses_a_rerun_with_other_settings(tmp_path):
    with ResultStore(tmp_path) as store:
        store.claim_identity({"model": "a", "protocol": "query-aware"})
        store.claim_identity({"model": "a", "protocol": "query-agnostic"})
        assert store.identity()["protocol"] == "query-agnostic", "a store without results takes new settings"
        store.add(_fake_row("s1", "full", 0, 1.0, {}))
        store.claim_identity({"model": "a", "protocol": "query-agnostic"})
        with pytest.raises(ValueError, match="protocol='query-agnostic'.*query-aware"):
            store.claim_identity({"model": "a", "protocol": "query-aware"})


def test_report_tables_and_plots(tmp_path):
    _complete_run(tmp_path / "run")
    runs = load_runs([tmp_path / "run"])
    rows = runs[0].rows
    expected = {}
    for row in rows:
        expected.setdefault((row.dataset, row.method, row.budget), []).append(row.score)
    records = json.loads(render(runs, "json"))
    assert {r["scoring"] for r in records} == {runs[0].identity.get("scoring", "")}
    cells = [r for r in records if r["dataset"]]
    assert len(cells) == len(expected)
    for record in cells:
        scores = expected[(record["dataset"], record["method"], record["budget"])]
        assert record["score"] == pytest.approx(100 * sum(scores) / len(scores))
        assert record["score_low"] <= record["score"] <= record["score_high"]
        assert record["samples"] == 3
    # One average per (method, budget): the mean of its datasets' means.
    averages = [r for r in records if not r["dataset"]]
    assert len(averages) == len({(m, b) for _, m, b in expected})
    for record in averages:
        means = [
            100 * sum(v) / len(v) for (d, m, b), v in expected.items() if (m, b) == (record["method"], record["budget"])
        ]
        assert record["score"] == pytest.approx(sum(means) / len(means))
    csv_text = render(runs, "csv")
    assert csv_text.splitlines()[0].startswith("run,benchmark,dataset,method,budget,samples,score,score_low,score_high")
    assert len(csv_text.splitlines()) == len(records) + 1
    markdown = render(runs, "md")
    assert "| full cache |" in markdown and "| lava |" in markdown and "B=24" in markdown
    plots = write_plots(runs[0], tmp_path / "plots")
    names = {p.name for p in plots}
    assert {"tiny_score_vs_budget.png", "tiny_layer_budgets.png"} <= names
    assert all(p.stat().st_size > 1000 for p in plots)


def test_report_compares_runs(tmp_path):
    _complete_run(tmp_path / "a")
    _complete_run(tmp_path / "b")
    markdown = render(load_runs([tmp_path / "a", tmp_path / "b"]), "md")
    assert "Comparison of runs" in markdown and "| a: lava |" in markdown and "| b: lava |" in markdown
    comparison = markdown[markdown.index("Comparison of runs") :]
    lava_line = next(line for line in comparison.splitlines() if line.startswith("| a: lava |"))
    assert re.search(r"\d+\.\d \[\d+\.\d, \d+\.\d\]", lava_line)  # the average with its interval


def test_report_of_a_directory_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results store"):
        load_runs([tmp_path])


def test_needle_heat_maps(tmp_path):
    sample_rows = []
    with ResultStore(tmp_path / "niah") as store:
        for depth in (0.0, 0.5, 1.0):
            for length in (100, 200):
                for method, budget, score in (("full", 0, 1.0), ("lava", 32, depth)):
                    row = _fake_row(
                        f"len{length}-depth{depth}", method, budget, score, {"depth": depth, "length": length}
                    )
                    store.add(row)
                    sample_rows.append(row)
    plots = write_plots(load_runs([tmp_path / "niah"])[0], tmp_path / "niah")
    assert (tmp_path / "niah" / "niah_heatmap_b32.png") in plots


def _fake_row(sample_id, method, budget, score, extra):
    from lavakv.eval.store import ResultRow

    return ResultRow(
        "niah",
        "niah",
        sample_id,
        method,
        budget,
        None,
        "x",
        score,
        ["x"],
        10,
        False,
        5,
        10,
        100,
        1,
        0.1,
        0.0,
        0.1,
        [1.0, 2.0],
        extra,
    )


def test_pairs_and_shards_are_validated():
    pairs = make_pairs(["full", "lava"], [32, 64])
    assert [(p.key, p.window) for p in pairs] == [(("full", 0), None), (("lava", 32), 16), (("lava", 64), 32)]
    assert all(isinstance(p, Pair) for p in pairs)
    with pytest.raises(ValueError, match="unknown method 'lavva'"):
        make_pairs(["lavva"], [64])
    with pytest.raises(ValueError, match="needs at least one budget"):
        make_pairs(["lava"], [])
    with pytest.raises(ValueError, match=r"greater than the window \(64\).*got 64"):
        make_pairs(["lava"], [64], window=64)
    fixed = make_pairs(["lava", "snapkv:heads=ada"], [64], window=16)
    assert [(p.key, p.window) for p in fixed] == [(("lava", 64), 16), (("ada-snapkv", 64), 16)]
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_middle_truncation_keeps_both_halves_as_pred_py():
    tokenizer = TinyTokenizer()
    text = " ".join(str(i) for i in range(1, 41))
    # 40 tokens cut to 11: int(11 / 2) = 5 from each end, decoded and joined with no separator.
    cut, truncated = truncate_middle(tokenizer, text, 11)
    assert truncated and cut == "1 2 3 4 5" + "36 37 38 39 40"
    assert truncate_middle(tokenizer, text, 40) == (text, False)
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        truncate_middle(tokenizer, text, 1)


def test_chat_template_split_keeps_question_separate(smollm2):
    model, tokenizer = smollm2
    sample = Sample(
        "t",
        "d",
        "1",
        "Some document text.\n\n",
        "Question: what is it?\nAnswer:",
        ["x"],
        4,
        "qa_f1",
        chat_template=True,
    )
    prepared = prepare(tokenizer, sample, "auto", 8192)
    context, question = tokenizer.decode(prepared.context), tokenizer.decode(prepared.question)
    assert "Some document text." in context and "what is it" not in context
    assert question.startswith("Question: what is it?") and "assistant" in question
    plain = prepare(tokenizer, sample, "off", 8192)
    assert tokenizer.decode(plain.context + plain.question) == sample.prompt


def test_the_query_aware_prompt_is_tokenized_whole_as_pred_py_does(smollm2):
    model, tokenizer = smollm2
    # The context ends in a newline and the question starts with two: tokenized apart, that run
    # of three newlines becomes two tokens, where pred.py, tokenizing the whole prompt, gets one.
    sample = Sample("t", "d", "1", "Some document text.\n", "\n\nQuestion: what is it?", ["x"], 4, "qa_f1")
    for mode in ("off", "on"):
        prepared = prepare(tokenizer, sample, mode, 8192)
        if mode == "off":
            official = tokenizer(sample.prompt)["input_ids"]
        else:
            messages = [{"role": "user", "content": sample.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            official = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert prepared.prompt == official
        assert prepared.context + prepared.question != official
        assert tokenizer.decode(prepared.prompt) == tokenizer.decode(prepared.context + prepared.question)


def test_report_of_only_the_full_cache_and_missing_datasets(tmp_path):
    from lavakv.eval.store import ResultRow

    with ResultStore(tmp_path / "x" / "run") as store:
        for dataset, score in (("a", 1.0), ("b", 0.5)):
            store.add(
                ResultRow(
                    "bench",
                    dataset,
                    "s",
                    "full",
                    0,
                    None,
                    "p",
                    score,
                    ["p"],
                    9,
                    False,
                    9,
                    9,
                    9,
                    2,
                    0.1,
                    0.0,
                    0.1,
                    [1.0],
                    {},
                )
            )
        store.add(
            ResultRow(
                "bench", "a", "s", "lava", 64, 32, "p", 1.0, ["p"], 9, False, 4, 9, 9, 2, 0.1, 0.0, 0.1, [1.0], {}
            )
        )
    with ResultStore(tmp_path / "y" / "run") as store:
        store.add(_fake_row("s", "full", 0, 1.0, {"depth": 0.5, "length": 10}))
    markdown = render(load_runs([tmp_path / "x" / "run"]), "md")
    assert "| full cache | 75.0 [75.0, 75.0] |" in markdown
    assert "No average (results missing on some datasets) for: lava@64" in markdown
    runs = load_runs([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert len({run.name for run in runs}) == 2
    assert "| score |" in render(load_runs([tmp_path / "y" / "run"]), "md")


def test_report_compares_methods_on_the_samples_every_pair_has_reached(tmp_path):
    with ResultStore(tmp_path) as store:
        store.claim_identity({"model": "a", "protocol": "query-aware"})
        for method, budget in [("full", 0), ("lava", 32), ("snapkv", 32)]:
            store.add(_fake_row("done", method, budget, 1.0, {}))
        # A sample still running: only its full cache row is in.
        store.add(_fake_row("running", "full", 0, 0.0, {}))
    (run,) = load_runs([tmp_path])
    assert {row.sample_id for row in run.rows} == {"done"} and run.incomplete_samples == 1
    markdown = render([run], "md")
    assert "1 sample(s) without a row for every (method, budget) of their dataset yet are left out" in markdown
    # The full cache's mean is over the finished sample only, as every method's is.
    assert "| full cache | 100.0 [100.0, 100.0] |" in markdown


def test_longbench_report_adds_its_task_categories(tmp_path):
    from dataclasses import replace

    from lavakv.eval.longbench import longbench_category

    assert longbench_category("qasper_e") == "single-doc QA" and longbench_category("repobench-p") == "code"
    assert longbench_category("computation") is None
    with ResultStore(tmp_path) as store:
        for dataset, sample_id, lava_score in [("qasper", "q1", 0.5), ("qasper", "q2", 1.0), ("lcc_e", "c1", 0.0)]:
            for method, budget, score in [("full", 0, 1.0), ("lava", 32, lava_score)]:
                row = _fake_row(sample_id, method, budget, score, {})
                store.add(replace(row, benchmark="longbench", dataset=dataset))
    markdown = render(load_runs([tmp_path]), "md", reference="lava")
    section = markdown[markdown.index("longbench: by category") :]
    assert "single-doc QA (qasper)" in section and "code (lcc_e)" in section
    # single-doc QA: lava's mean over qasper's two samples; the full cache scores 100 there.
    assert "| lava | 75.0 [50.0, 100.0] |" in section
    assert "| full cache | 100.0 [100.0, 100.0] |" in section
    # CSV and JSON carry the same category averages, told apart from the benchmark's by `category`.
    records = json.loads(render(load_runs([tmp_path]), "json", reference="lava"))
    by_key = {(r["dataset"], r["category"], r["method"], r["budget"]): r for r in records}
    assert by_key[("qasper", "single-doc QA", "lava", 32)]["score"] == pytest.approx(75.0)
    single_doc = by_key[("", "single-doc QA", "lava", 32)]
    assert single_doc["score"] == pytest.approx(75.0) and single_doc["samples"] == ""
    assert by_key[("", "code", "lava", 32)]["score"] == pytest.approx(0.0)
    against_full = json.loads(render(load_runs([tmp_path]), "json", reference="full"))
    (single_doc_diff,) = [
        r for r in against_full if r["category"] == "single-doc QA" and not r["dataset"] and r["method"] == "lava"
    ]
    assert single_doc_diff["diff"] == pytest.approx(-25.0) and single_doc_diff["losses"] == 1
    # The benchmark average: mean of the two datasets' means.
    assert by_key[("", "", "lava", 32)]["score"] == pytest.approx(37.5)
    header = render(load_runs([tmp_path]), "csv").splitlines()[0].split(",")
    assert header[-2:] == ["category", "scoring"]


def test_generated_benchmarks_report_each_prompt_length_and_file_benchmarks_do_not(tmp_path):
    from dataclasses import replace

    with ResultStore(tmp_path) as store:
        for sample_id, length, lava_score in [("a", 1000, 1.0), ("b", 1000, 0.0), ("c", 4000, 0.0)]:
            for method, budget, score in [("full", 0, 1.0), ("lava", 32, lava_score), ("snapkv", 32, 0.0)]:
                store.add(replace(_fake_row(sample_id, method, budget, score, {"length": length}), benchmark="niah"))
                row = _fake_row(sample_id, method, budget, score, {"length": length * 3})
                store.add(replace(row, benchmark="longbench", dataset="qasper"))
    markdown = render(load_runs([tmp_path]), "md", reference="lava")
    section = markdown[markdown.index("niah: by prompt length") :]
    at_1000 = section[section.index("1000 tokens") : section.index("4000 tokens")]
    assert "| lava | 50.0 [0.0, 100.0] |" in at_1000 and "| full cache | 100.0 [100.0, 100.0] |" in at_1000
    assert "| snapkv | -50.0 [-100.0, +0.0] 0/1/1 |" in at_1000
    at_4000 = section[section.index("4000 tokens") :]
    assert "| lava | 0.0 [0.0, 0.0] |" in at_4000
    # LongBench's `length` is a record's word count, not a length the run was built to.
    assert "longbench: by prompt length" not in markdown


def test_report_labels_another_engines_methods_and_takes_them_as_reference(tmp_path):
    from lavakv.eval.report import check_reference, foreign_method, method_label, method_rank

    assert foreign_method("kvpress:snapkv") == ("kvpress", "snapkv")
    assert foreign_method("lava:heads=uniform") is None and foreign_method("snapkv") is None
    assert method_label("kvpress:ada-snapkv") == "kvpress ada-snapkv"
    assert sorted(["kvpress:snapkv", "pyramidkv", "snapkv:window=8", "snapkv"], key=method_rank) == [
        "snapkv",
        "snapkv:window=8",
        "kvpress:snapkv",
        "pyramidkv",
    ]
    with ResultStore(tmp_path) as store:
        for index in range(4):
            store.add(_fake_row(f"s{index}", "snapkv", 32, 1.0, {}))
            store.add(_fake_row(f"s{index}", "kvpress:snapkv", 32, float(index % 2), {}))
    runs = load_runs([tmp_path])
    assert check_reference(runs, "kvpress:snapkv") == "kvpress:snapkv"
    with pytest.raises(ValueError, match="kvpress:pyramidkv.*no results.*methods held: snapkv, kvpress:snapkv"):
        check_reference(runs, "kvpress:pyramidkv")
    markdown = render(runs, "md", reference="snapkv")
    assert "| kvpress snapkv | 50.0 [" in markdown
    assert "| kvpress snapkv | -50.0 [" in markdown and "0/2/2 |" in markdown


def test_another_engines_full_cache_is_shown_and_compared_at_every_budget_like_lavakvs(tmp_path):
    from lavakv.eval.report import keeps_all

    assert keeps_all("full") and keeps_all("kvpress:full")
    assert not keeps_all("kvpress:snapkv") and not keeps_all("snapkv")
    with ResultStore(tmp_path) as store:
        for index in range(4):
            store.add(_fake_row(f"s{index}", "full", 0, 1.0, {}))
            store.add(_fake_row(f"s{index}", "kvpress:full", 0, float(index != 0), {}))
            for budget in (32, 64):
                store.add(_fake_row(f"s{index}", "kvpress:snapkv", budget, float(index % 2), {}))
    runs = load_runs([tmp_path])
    markdown = render(runs, "md")
    # No budget-0 "score" column: both full caches fill every budget's column.
    assert "| method | B=32 | B=64 |" in markdown and "| score |" not in markdown
    assert "| full cache | 100.0 [100.0, 100.0] | 100.0 [100.0, 100.0] |" in markdown
    assert "| kvpress full | 75.0 [" in markdown and "B=0" not in markdown
    against_kvpress_full = render(runs, "md", reference="kvpress:full")
    assert "Paired difference to kvpress full" in against_kvpress_full
    assert "| full cache | +25.0 [" in against_kvpress_full and "1/3/0 |" in against_kvpress_full
    # kvpress snapkv against kvpress's full cache, at each budget: s2 loses, the others tie.
    assert against_kvpress_full.count("-25.0 [") == 2
