"""One layer's decode attention over ragged rows: each path against uniform rows of the same budget.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ragged_attention.py [--steps 200] [--tail 32]

For a layer's storage of ``B`` entries per KV head on average, appended ``--tail`` tokens and one
decode query, it times ``RaggedKV.attend`` (median microseconds over ``--steps`` calls, the paths
alternating call by call so that slow spells hit all alike):

* **uniform**: every head holds exactly ``B`` entries (SnapKV's layout; read as a view, no mask);
* **gather**: heads hold different counts (per-head budgets: Ada-SnapKV, LAVa) spread from
  ``B/4`` to ``7B/4`` around the same mean, read as a padded copy with an additive padding mask;
* **flex**: the same ragged rows through compiled FlexAttention over the packed entries (block
  mask built once). On CPU, torch 2.13's compiled FlexAttention returns no log-sum-exp (so the
  appended tail cannot be merged: ``--tail`` defaults to 0) and its dynamic-shape code does not
  build, so each shape is compiled statically, once (``torch._dynamo.reset()`` between shapes);
* **flex, uncompiled**: torch's reference implementation of FlexAttention (a few calls only).

Shapes: SmolLM2 (3 KV heads of 3 query heads, head dim 64) and Llama 3 (8 KV heads of 4, head dim
128), budgets 128, 512 and 1024, float32 on CPU. Results go to
``benchmarks/results/ragged_attention.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from lavakv import backends
from lavakv.backends import create_backend
from lavakv.ragged import RaggedKV

RESULTS = Path(__file__).parent / "results"
SHAPES = {"smollm2": (3, 3, 64), "llama3": (8, 4, 128)}
"""KV heads, query heads per KV head, head dim."""


def storage_for(kv_heads: int, dim: int, budget: int, ragged_rows: bool, tail: int, seed: int) -> RaggedKV:
    generator = torch.Generator().manual_seed(seed)
    if ragged_rows:
        spread = torch.linspace(0.25, 1.75, kv_heads)[torch.randperm(kv_heads, generator=generator)]
        counts = (spread * budget).round().long()
        counts[0] += budget * kv_heads - int(counts.sum())
    else:
        counts = torch.full((kv_heads,), budget)
    rows = [
        [
            (torch.arange(int(n)), torch.randn(int(n), dim, generator=generator), torch.randn(int(n), dim))
            for n in counts
        ]
    ]
    storage = RaggedKV.pack(rows, [0], append_start=4 * budget)
    storage.append(torch.randn(1, kv_heads, tail, dim), torch.randn(1, kv_heads, tail, dim))
    return storage


def measure(args) -> list[dict]:
    results = []
    for shape, (kv_heads, group, dim) in SHAPES.items():
        for budget in (128, 512, 1024):
            query = torch.randn(1, kv_heads * group, 1, dim)
            uniform = storage_for(kv_heads, dim, budget, False, args.tail, 0)
            rows = storage_for(kv_heads, dim, budget, True, args.tail, 0)
            scaling = dim**-0.5
            calls = {
                "uniform": functools.partial(create_backend("gather", uniform).attend, query, scaling),
                "gather": functools.partial(create_backend("gather", rows).attend, query, scaling),
                "flex": functools.partial(create_backend("flex", rows).attend, query, scaling),
            }
            expected = calls["gather"]()
            torch._dynamo.reset()
            start = time.perf_counter()
            got = calls["flex"]()
            first_flex = time.perf_counter() - start
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            for call in calls.values():
                for _ in range(5):
                    call()
            times = {name: [] for name in calls}
            for _ in range(args.steps):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(1e6 * (time.perf_counter() - start))
            backends.COMPILE_FLEX = False
            eager = []
            for _ in range(5):
                start = time.perf_counter()
                calls["flex"]()
                eager.append(1e6 * (time.perf_counter() - start))
            backends.COMPILE_FLEX = True
            row = {"shape": shape, "budget": budget, "tail": args.tail, "first_flex_call_s": first_flex}
            row.update({f"{name}_us": statistics.median(values) for name, values in times.items()})
            row["flex_eager_us"] = statistics.median(eager)
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def write_page(results: list[dict]) -> str:
    lines = [
        "# Ragged decode attention: one layer, one decode token",
        "",
        "`benchmarks/ragged_attention.py`, 2 CPU cores, float32, torch "
        f"{torch.__version__}: median µs per `RaggedKV.attend` call, paths alternating call by call; "
        f"{results[0]['tail']} appended tokens. *uniform* = every head holds the budget (SnapKV); the other "
        "columns hold per-head budgets spread from B/4 to 7B/4 around the same mean (Ada-SnapKV, LAVa). "
        "*first flex call* includes compiling FlexAttention for that shape (on CPU each shape compiles "
        "statically: dynamic shapes do not build; after the first shape torch's compile cache serves most of it).",
        "",
        "| shape | budget | uniform µs | gather µs | flex µs (compiled) | flex µs (uncompiled) | gather / uniform "
        "| flex / gather | first flex call s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['budget']} | {r['uniform_us']:.0f} | {r['gather_us']:.0f} | {r['flex_us']:.0f} "
            f"| {r['flex_eager_us']:.0f} | {r['gather_us'] / r['uniform_us']:.2f} "
            f"| {r['flex_us'] / r['gather_us']:.2f} "
            f"| {r['first_flex_call_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tail", type=int, default=0, help="appended tokens (compiled flex on CPU needs 0)")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = measure(args)
    (RESULTS / "ragged_attention.json").write_text(json.dumps(results, indent=1) + "\n")
    page = write_page(results)
    (RESULTS / "ragged_attention.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
