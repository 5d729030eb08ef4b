"""Where a decode step's time goes: torch.profiler over greedy steps, grouped by kind of operator.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_profile.py [--length 4096] [--budget 128]
        [--steps 16] [--label after] [--out benchmarks/results/decode_profile.json]

On SmolLM2 with one prompt of ``--length`` tokens it times (round-robin) and then profiles
``--steps`` decode steps for the full cache, a full cache of ``--budget`` tokens (the ideal),
and snapkv, ada-snapkv and lava at ``--budget``. Operators are grouped into matmul (the
model's projections), attention (sdpa kernels), cache reads and writes (gathers,
concatenations, masks) and the rest (norms, RoPE, activations, views). Each run is stored
under ``--label`` in the JSON file, so that a run on an older checkout
(``PYTHONPATH=<old checkout>/src``) and one on the current code sit side by side; the
markdown page is rewritten from all labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

import lavakv
from lavakv.attention import model_forward
from lavakv.bench import bench_prompt

RESULTS = Path(__file__).parent / "results"
GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "cache": ("aten::index", "aten::index_select", "aten::cat", "aten::where", "aten::ones", "aten::arange"),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other"


def wall_times(model, prepared: dict, steps: int) -> dict[str, float]:
    """Median wall ms per step for each cache, steps taken round-robin so that slow spells hit all alike."""
    times = {name: [] for name in prepared}
    with torch.inference_mode():
        for _ in range(steps):
            for name, (cache, token) in prepared.items():
                start = time.perf_counter()
                token = model_forward(model, cache, input_ids=token).logits[:, -1:].argmax(-1)
                times[name].append(time.perf_counter() - start)
                prepared[name] = (cache, token)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def profile_steps(model, cache, token: torch.Tensor, steps: int) -> dict:
    """Profiled self-CPU ms per step by operator group, and the top operators."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = model_forward(model, cache, input_ids=token).logits[:, -1:].argmax(-1)
    groups = dict.fromkeys([*GROUPS, "other"], 0.0)
    operators = {}
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1000 / steps
        groups[group_of(event.key)] += self_ms
        operators[event.key] = (self_ms, event.count // steps)
    top = sorted(operators.items(), key=lambda item: -item[1][0])[:8]
    return {
        "self_cpu_ms_per_step": groups,
        "top_operators": [{"name": name, "ms": ms, "calls": calls} for name, (ms, calls) in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", default=str(RESULTS / "decode_profile.json"))
    args = parser.parse_args()

    model, tokenizer = lavakv.load_model()
    input_ids = bench_prompt(tokenizer, args.length, model.config.vocab_size)
    configs = [("full", None), ("reference", args.budget)]
    configs += [(method, args.budget) for method in ("snapkv", "ada-snapkv", "lava")]
    prepared = {}
    for method, budget in configs:
        if method == "full":
            cache, prompt = DynamicCache(), input_ids
        elif method == "reference":
            cache, prompt = DynamicCache(), input_ids[:, :budget]
        else:
            cache, prompt = lavakv.CompressedCache(model, method=method, budget=budget), input_ids
        with torch.inference_mode():
            logits = model_forward(model, cache, input_ids=prompt, logits_to_keep=1).logits
        prepared[method if budget is None else f"{method} B={budget}"] = (cache, logits[:, -1:].argmax(-1))
    walls = wall_times(model, prepared, args.steps)
    runs = {}
    for name, (cache, token) in prepared.items():
        runs[name] = {"wall_ms_per_step": walls[name], **profile_steps(model, cache, token, args.steps)}
        print(name, f"{walls[name]:.1f} ms/step", flush=True)

    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.is_file() else {}
    stored[args.label] = {"length": args.length, "budget": args.budget, "steps": args.steps, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stored, indent=1))
    out.with_suffix(".md").write_text(render(stored))
    print(render(stored))


def render(stored: dict) -> str:
    lines = [
        "# Decode step profile (SmolLM2, CPU)",
        "",
        "Written by `benchmarks/decode_profile.py`. Wall time is the median of unprofiled steps taken",
        "round-robin over the caches; the group columns are torch.profiler self-CPU time per step",
        "(summed over threads, so they can exceed wall time).",
        "",
    ]
    for label, run in stored.items():
        lines += [
            f"## {label}: {run['length']}-token prompt, {run['steps']} steps",
            "",
            "| cache | wall ms/step | matmul | attention | cache reads/writes | other |",
            "|---|---|---|---|---|---|",
        ]
        for name, result in run["runs"].items():
            groups = result["self_cpu_ms_per_step"]
            lines.append(
                f"| {name} | {result['wall_ms_per_step']:.1f} | {groups['matmul']:.1f} | {groups['attention']:.1f} "
                f"| {groups['cache']:.1f} | {groups['other']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
