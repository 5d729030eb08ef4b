"""The GPU sweep's tiny CPU configuration runs end to end, so the script cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sweep.py"


def _sweep_module():
    spec = importlib.util.spec_from_file_location("gpu_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_sweep_measures_every_configuration_and_writes_its_page(tmp_path):
    sweep = _sweep_module()
    out = tmp_path / "sweep.json"
    sweep.main(["--tiny", "--device", "cpu", "--decode-steps", "3", "--cpu-batch", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    single = {(r["prompt_tokens"], r["method"], r["budget"]) for r in rows if "batch_kind" not in r}
    expected = {(n, "full", None) for n in (256, 512)}
    expected |= {(n, m, b) for n in (256, 512) for m in ("snapkv", "ada-snapkv", "lava") for b in (48, 96)}
    assert single == expected
    largest = [r for r in rows if r.get("batch_kind") == "max"]
    assert {r["prompt_tokens"] for r in largest} == {256} and all(r["batch"] == 3 for r in largest)
    assert len(largest) == 7
    by_key = {(r["prompt_tokens"], r["method"], r["budget"]): r for r in rows if "batch_kind" not in r}
    for (length, method, _), row in by_key.items():
        assert row["decode_ms_per_token"] > 0 and row["decode_steps"] == 3
        if method != "full":
            assert 0 < row["kv_bytes"] < by_key[(length, "full", None)]["kv_bytes"]
            assert 0 < row["compression_share"] < 1
            assert row["attention_paths"] == ["packed"]
    page = out.with_suffix(".md").read_text()
    assert "Not measured on a GPU yet" in page and "| 512 | lava | 96 | 1 |" in page
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_rerun_skips_what_is_measured(tmp_path):
    sweep = _sweep_module()
    out = tmp_path / "sweep.json"
    arguments = ["--tiny", "--device", "cpu", "--decode-steps", "2", "--lengths", "256", "--methods", "snapkv"]
    sweep.main([*arguments, "--budgets", "48", "--out", str(out)])
    first = json.loads(out.read_text())["rows"]
    sweep.main([*arguments, "--budgets", "48,96", "--out", str(out)])
    second = json.loads(out.read_text())["rows"]
    assert second[: len(first)] == first
    assert {(r["method"], r["budget"]) for r in second[len(first) :]} == {("snapkv", 96)}
