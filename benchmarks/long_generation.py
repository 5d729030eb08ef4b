"""Decode cost over a long generation: does a step get dearer as the generated tail grows?

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/long_generation.py [--model smollm2]
        [--prompt 2048] [--generate 4096] [--budget 256] [--window 256]

After one ``--prompt``-token prompt, ``--generate`` greedy tokens (stops ignored) are decoded
through transformers' ``DynamicCache`` and through lava at ``--budget``, one step of each in
turn so that the machine's slow spells hit both alike. For each it reports the median ms per
token over the first and the last ``--window`` steps and their ratio; for lavakv also the cache's
own append time per step (``stats().append_seconds``) over the same windows, and the memory its
append buffers hold beyond what they use (``reserved_kv_bytes``). Appends into a geometrically
grown buffer should cost the same at the end as at the start, and lavakv's step should grow no
faster than ``DynamicCache``'s, whose attention also runs over a longer cache. Results are kept
per model in ``benchmarks/results/long_generation.json``; the page
``benchmarks/results/long_generation.md`` is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import lavakv
from lavakv.bench import bench_prompt, load_bench_model
from lavakv.decoding import TokenFeed

RESULTS = Path(__file__).parent / "results"
APPEND_SAMPLE = 64
"""Steps between readings of the cache's append time."""


def measure(model, prompt: torch.Tensor, args) -> dict:
    lava = lavakv.CompressedCache(model, method="lava", budget=args.budget)
    feeds = {
        "DynamicCache": TokenFeed(model, DynamicCache(config=model.config)),
        f"lava {args.budget}": TokenFeed(model, lava),
    }
    tokens = {name: feed.prefill(prompt.tolist(), 0).argmax(-1, keepdim=True) for name, feed in feeds.items()}
    step_ms = {name: [] for name in feeds}
    append_us, appended = [], 0.0
    for step in range(1, args.generate + 1):
        for name, feed in feeds.items():
            start = time.perf_counter()
            tokens[name] = feed.extend(tokens[name]).argmax(-1, keepdim=True)
            step_ms[name].append(1000 * (time.perf_counter() - start))
        if step % APPEND_SAMPLE == 0:
            total = lava.stats(positions=False).append_seconds
            append_us.append(1e6 * (total - appended) / APPEND_SAMPLE)
            appended = total
    window = args.window
    result = {}
    for name, times in step_ms.items():
        first, last = statistics.median(times[:window]), statistics.median(times[-window:])
        result[name] = {"first_ms": first, "last_ms": last, "growth": last / first}
    stats = lava.stats(positions=False)
    share = max(1, window // APPEND_SAMPLE)
    result["append"] = {
        "first_us_per_step": statistics.median(append_us[:share]),
        "last_us_per_step": statistics.median(append_us[-share:]),
        "reserved_mib": stats.reserved_kv_bytes / 2**20,
        "kv_mib": stats.kv_bytes / 2**20,
    }
    return result


def write_page(results: dict) -> str:
    lines = [
        "# Decode cost over a long generation",
        "",
        "`benchmarks/long_generation.py`, 2 CPU cores: greedy tokens after one prompt, transformers' "
        "`DynamicCache` and lava stepped in turn; medians over the first and last window of steps.",
        "",
        "| model | prompt | generated | cache | ms/token, first | last | growth | append µs/step, first | last "
        "| buffer reserved / used MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, entry in results.items():
        s = entry["settings"]
        for name, row in entry["result"].items():
            if name == "append":
                continue
            append = entry["result"]["append"] if name.startswith("lava") else None
            extra = (
                f"{append['first_us_per_step']:.0f} | {append['last_us_per_step']:.0f} | "
                f"{append['reserved_mib']:.1f} / {append['kv_mib']:.1f}"
                if append
                else "| |"
            )
            lines.append(
                f"| {model} | {s['prompt']} | {s['generate']} | {name} | {row['first_ms']:.1f} | {row['last_ms']:.1f} "
                f"| {row['growth']:.2f}x | {extra} |"
            )
    lines += [
        "",
        "Growth is the last window's median over the first one's. The append time is the cache's own "
        "(the phase it spends writing each step's keys and values into its buffers), per step over all layers.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--generate", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    if args.generate < 2 * args.window:
        parser.error("--generate must be at least twice --window")
    torch.set_num_threads(2)
    model, tokenizer, name = load_bench_model(args.model)
    lavakv.prepare_model(model)
    prompt = bench_prompt(tokenizer, args.prompt, model.config.vocab_size)
    result = measure(model, prompt, args)
    path = RESULTS / "long_generation.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = {"settings": vars(args), "result": result}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    page = write_page(results)
    (RESULTS / "long_generation.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
