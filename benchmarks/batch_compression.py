"""Compression time of a batch: 8 prompts compressed together vs the same 8 one at a time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/batch_compression.py [--model smollm2]
        [--length 4096] [--batch 8] [--budgets 128,512] [--repeats 3]
    .venv/bin/python benchmarks/batch_compression.py --report

One recorded prefill of ``--batch`` different prompts of ``--length`` tokens is replayed into
fresh caches exactly as a compressing prefill runs (progressive where the method is, every score
computed anew; see ``lavakv.recording.PrefillRecord``): once as the whole batch in one cache, and
once per prompt as a batch of one, alternating, median of ``--repeats`` rounds. The figure is the
cache's own compression clock (``stats().compression_seconds["total"]``: scoring, allocation,
selection, packing), free of the model's time. *batch / one* is the whole batch's time over one
prompt's, which is ``--batch`` when nothing is shared; the kept positions of every prompt are
checked equal between the two. Results per model in ``benchmarks/results/batch_compression.json``,
the page ``benchmarks/results/batch_compression.md``. ``--code LABEL`` files the rows under another
label, so that an earlier lavakv (put first on ``PYTHONPATH``) can be measured beside this one:

    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/batch_compression.py --code "per-sample (b186fad)"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from lavakv.bench import bench_prompt, load_bench_model
from lavakv.methods.method import parse_spec
from lavakv.recording import PrefillRecord

RESULTS = Path(__file__).parent / "results" / "batch_compression.json"
PAGE = RESULTS.with_suffix(".md")
METHODS = ("snapkv", "pyramidkv", "ada-snapkv", "cake", "lava")
CODE = "this version"


def compress_row(record: PrefillRecord, row: int, method: str, budget: int):
    """Row ``row`` of the record replayed alone (a batch of one), from exactly the batch's tensors."""
    from lavakv import CompressedCache

    cache = CompressedCache(record.config, method=method, budget=budget, progressive=parse_spec(method).progressive)
    cache.observe_inputs(record.input_ids[row : row + 1])
    with torch.inference_mode():
        for layer, (query, key, value, scaling, weights) in enumerate(record.layers):
            cache.compress_layer(
                layer, query[row : row + 1], key[row : row + 1], value[row : row + 1], None, scaling, weights
            )
    return cache


def measure(model, tokenizer, name: str, args) -> list[dict]:
    prompts = [bench_prompt(tokenizer, args.length, model.config.vocab_size, seed=seed) for seed in range(args.batch)]
    record = PrefillRecord(model, torch.cat(prompts))
    rows = []
    for method in args.methods.split(","):
        for budget in [int(b) for b in args.budgets.split(",")]:
            batched, one = [], []
            progressive = parse_spec(method).progressive
            for _ in range(args.repeats):
                cache = record.compress(method, budget, progressive=progressive, reuse_scores=False)
                batched.append(cache.stats(positions=False).compression_seconds["total"])
                alone = [compress_row(record, row, method, budget) for row in range(args.batch)]
                one.append(statistics.mean(c.stats(positions=False).compression_seconds["total"] for c in alone))
            kept = cache.stats().sequences
            same = all(
                s.kept_positions == c.stats().sequences[0].kept_positions for s, c in zip(kept, alone, strict=True)
            )
            row = {
                "model": name,
                "code": args.code,
                "prompt_tokens": args.length,
                "batch": args.batch,
                "method": method,
                "budget": budget,
                "repeats": args.repeats,
                "batch_seconds": statistics.median(batched),
                "one_seconds": statistics.median(one),
                "identical_kept_positions": same,
            }
            row["batch_over_one"] = row["batch_seconds"] / row["one_seconds"]
            rows.append(row)
            print(
                f"{name} {method} {budget}: batch {row['batch_seconds']:.3f} s, one {row['one_seconds']:.3f} s, "
                f"batch/one {row['batch_over_one']:.2f} (identical: {same})",
                flush=True,
            )
    return rows


def report(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# Compressing a batch: one pass of tensor operations vs one prompt at a time",
        "",
        f"`benchmarks/batch_compression.py`, {env['threads']} threads on {env['cores']} CPU cores, torch "
        f"{env['torch']}, float32. Each model's batch is {', '.join(str(r) for r in data['batches'])} different "
        "prompts; one recorded prefill is replayed into fresh caches as a compressing prefill runs (progressive "
        "for LAVa and CAKE, every score computed anew), the whole batch in one cache and each prompt alone, "
        "alternating; seconds are the cache's compression clock (scoring, allocation, selection, packing), medians "
        "of the rounds. *batch / one* would be the batch size if nothing were shared.",
        "",
        "| code | model | prompt tokens | batch | method | budget | one prompt s | whole batch s | batch / one | "
        "same kept positions |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r.get('code', CODE)} | {r['model']} | {r['prompt_tokens']} | {r['batch']} | {r['method']} | "
            f"{r['budget']} | "
            f"{r['one_seconds']:.3f} | {r['batch_seconds']:.3f} | {r['batch_over_one']:.2f} | "
            f"{'yes' if r['identical_kept_positions'] else 'NO'} |"
        )
    for model in sorted({r["model"] for r in data["rows"]}):
        current = [r for r in data["rows"] if r["model"] == model and r.get("code", CODE) == CODE]
        if not current:
            continue
        ratios = [r["batch_over_one"] for r in current]
        lines += [
            "",
            f"**{model}**: compressing the batch of {current[0]['batch']} together costs "
            f"{min(ratios):.2f}-{max(ratios):.2f}x one prompt's time (the batch size if nothing were shared).",
        ]
        others = {
            (r["method"], r["budget"]): r for r in data["rows"] if r["model"] == model and r.get("code", CODE) != CODE
        }
        gains = [
            others[(r["method"], r["budget"])]["batch_seconds"] / r["batch_seconds"]
            for r in current
            if (r["method"], r["budget"]) in others
        ]
        if gains:
            label = next(iter(others.values()))["code"]
            lines.append(
                f"Against {label} on the same tensors, the whole batch compresses {min(gains):.1f}-{max(gains):.1f}x "
                "faster."
            )
    lines += [
        "",
        "What the batch shares is the Python work around the tensors (allocation, selection and packing run once over "
        "all (sequence, head) rows, and a progressive method re-selects its earlier layers once per layer for the "
        "whole batch instead of once per sequence), which is why LAVa gains most. The scoring itself, the window's "
        "queries against every key of the prompt and the softmax over them, is memory-bound arithmetic whose cost "
        "on a CPU grows with the batch: larger intermediates fall out of the cache, so on a CPU the group is "
        "scored in parts of at most 8 MiB of window attention (`CPU_SCORE_PART_BYTES`). On an accelerator the "
        "whole group is scored in one call, where the fixed cost per call is what a batch saves; that has not "
        "been measured here.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="128,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--code", default=CODE, help="label of the lavakv measured (see the docstring)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--report", action="store_true", help="rewrite the page from --out and stop")
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    if not args.report:
        model, tokenizer, name = load_bench_model(args.model)
        rows = measure(model, tokenizer, name, args)
        data["rows"] = [r for r in data["rows"] if (r["model"], r.get("code", CODE)) != (name, args.code)] + rows
        data["environment"] = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
        }
        out.write_text(json.dumps(data, indent=1))
    data["batches"] = sorted({r["batch"] for r in data["rows"]})
    out.with_suffix(".md").write_text(report(data))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
