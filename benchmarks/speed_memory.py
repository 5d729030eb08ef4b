"""Speed and memory sweep: full cache vs snapkv, ada-snapkv, cake and lava, side by side in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_memory.py --model smollm2 \\
        --lengths 1024,2048,4096,8192 --budgets 128,512 --budgets-at 4096=64,128,256,512
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_memory.py --model llama3-layout-400m \\
        --lengths 2048,4096,8192 --budgets 128,512
    .venv/bin/python benchmarks/speed_memory.py --report

Each (model, length) measures the full cache, a full cache of ``B`` tokens per budget (the ideal a
compressed cache of budget ``B`` approaches) and every (method, budget) with its own compressing
prefill (see ``lavakv.bench``). Every measurement is appended to ``--out`` as soon as it exists and
a rerun skips what is there, so an interrupted sweep resumes. ``--report`` writes
``docs/results/speed_memory.md`` with plots from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
import transformers

from lavakv.bench import (
    BENCH_METHODS,
    MIB,
    Measurement,
    bench_prompt,
    compression_overhead,
    load_bench_model,
    parameter_count,
    run_bench,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "speed_memory.json"
PAGE = ROOT / "docs" / "results" / "speed_memory.md"
PLOTS = ROOT / "docs" / "results" / "speed_memory"


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"environment": {}, "models": {}, "measurements": []}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)


def parse_budgets_at(text: str | None) -> dict[int, list[int]]:
    """``"4096=64,128,256,512;8192=128"`` -> {4096: [...], 8192: [...]}."""
    result = {}
    for part in (text or "").split(";"):
        if part.strip():
            length, budgets = part.split("=")
            result[int(length)] = [int(b) for b in budgets.split(",")]
    return result


def sweep(args) -> None:
    data = load(Path(args.out))
    model, tokenizer, name = load_bench_model(args.model)
    data["environment"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    data["models"][name] = {"parameters": parameter_count(model), "config": model.config.to_diff_dict()}
    done = {tuple(m[k] for k in ("model", "prompt_tokens", "method", "budget")) for m in data["measurements"]}
    budgets_at = parse_budgets_at(args.budgets_at)

    def record(result: Measurement) -> None:
        data["measurements"].append(vars(result))
        save(Path(args.out), data)
        print(
            f"{name} {result.prompt_tokens} {result.method} {result.budget}: "
            f"decode {result.decode_ms_per_token:.1f} ms/token",
            flush=True,
        )

    for length in [int(x) for x in args.lengths.split(",")]:
        input_ids = bench_prompt(tokenizer, length, model.config.vocab_size)
        run_bench(
            model,
            input_ids,
            args.methods.split(","),
            budgets_at.get(length, [int(b) for b in args.budgets.split(",")]),
            args.decode_tokens,
            name,
            done=lambda m: m.key in done,
            on_result=record,
        )
        overhead = data.setdefault("overhead", {}).setdefault(name, [])
        if length in budgets_at or length == args.overhead_at:
            if not any(row["prompt_tokens"] == length for row in overhead):
                budgets = budgets_at.get(length, [int(b) for b in args.budgets.split(",")])
                overhead += compression_overhead(model, input_ids, args.methods.split(","), budgets, args.repeats)
                save(Path(args.out), data)
                print(f"{name} {length}: compression overhead measured", flush=True)


def measurements(data: dict) -> list[Measurement]:
    return [Measurement(**m) for m in data["measurements"]]


def by_key(results: list[Measurement]) -> dict[tuple, Measurement]:
    return {m.key: m for m in results}


def plot(results: list[Measurement], model: str, budget: int) -> dict[str, str]:
    """Decode time, cache bytes and compression share against prompt length for one model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    rows = [m for m in results if m.model == model]
    lengths = sorted({m.prompt_tokens for m in rows})
    index = by_key(rows)
    files = {}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = [("full", None), ("reference", budget)] + [(method, budget) for method in BENCH_METHODS]
    for method, b in series:
        points = [(n, index[(model, n, method, b)]) for n in lengths if (model, n, method, b) in index]
        if not points:
            continue
        label = "full cache" if method == "full" else (f"{b}-token full cache" if method == "reference" else method)
        style = "--" if method == "reference" else "-"
        axes[0].plot([n for n, _ in points], [m.decode_ms_per_token for _, m in points], style, marker="o", label=label)
        axes[1].plot([n for n, _ in points], [m.kv_bytes / MIB for _, m in points], style, marker="o", label=label)
        if method not in ("full", "reference"):
            full = [index.get((model, n, "full", None)) for n, _ in points]
            axes[2].plot(
                [n for n, _ in points],
                [100 * m.compress_seconds / f.prefill_seconds for (_, m), f in zip(points, full)],
                marker="o",
                label=label,
            )
    axes[0].set(title=f"decode time per token (B={budget})", xlabel="prompt tokens", ylabel="ms / token")
    axes[1].set(title=f"KV cache after prefill (B={budget})", xlabel="prompt tokens", ylabel="MiB", yscale="log")
    axes[2].set(title="compression time, % of full prefill", xlabel="prompt tokens", ylabel="%")
    axes[2].axhline(10, color="grey", linewidth=0.8, linestyle=":")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.legend(fontsize=8)
    figure.suptitle(model)
    figure.tight_layout()
    path = PLOTS / f"{model}-by-length.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    files["by_length"] = path.relative_to(PAGE.parent).as_posix()
    return files


def table(results: list[Measurement], model: str, length: int) -> str:
    from lavakv.bench import format_table

    rows = [m for m in results if m.model == model and m.prompt_tokens == length]
    return format_table(rows)


def key_ratios(data: dict, results: list[Measurement], model: str, length: int) -> list[str]:
    """Ratios to the full cache at one length; compression time from the timed-alone replays where present."""
    index = by_key(results)
    full = index.get((model, length, "full", None))
    if full is None:
        return []
    overhead = {
        (row["method"], row["budget"]): row
        for row in data.get("overhead", {}).get(model, [])
        if row["prompt_tokens"] == length
    }
    lines = [
        "| method | budget | decode speed-up | gap to B-token cache | KV bytes vs full | KV / kept "
        "| compression, % of full prefill | of which scoring | of which allocation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        if m.model != model or m.prompt_tokens != length or m.method in ("full", "reference"):
            continue
        reference = index.get((model, length, "reference", m.budget))
        gap = f"{m.decode_ms_per_token / reference.decode_ms_per_token:.2f}x" if reference else "–"
        alone = overhead.get((m.method, m.budget))
        if alone is not None:
            base = alone["full_prefill_seconds"]
            phases = (alone["compress_seconds"], alone["score_seconds"], alone["allocate_seconds"])
        else:
            base = full.prefill_seconds
            phases = (m.compress_seconds, m.score_seconds, m.allocate_seconds)
        shares = " | ".join(f"{100 * seconds / base:.1f}" for seconds in phases)
        lines.append(
            f"| {m.method} | {m.budget} | {full.decode_ms_per_token / m.decode_ms_per_token:.2f}x | {gap} "
            f"| 1/{full.kv_bytes / m.kv_bytes:.1f} | {m.kv_bytes / m.kept_entry_bytes:.3f} | {shares} |"
        )
    return lines


def report(args) -> None:
    data = load(Path(args.out))
    results = measurements(data)
    env = data["environment"]
    intro_file = PAGE.parent / "speed_memory_intro.md"
    intro = intro_file.read_text() if intro_file.is_file() else ""
    lines = [
        "# Speed and memory: compressed caches vs the full cache",
        "",
        f"CPU only: torch {env.get('torch')}, transformers {env.get('transformers')}, {env.get('threads')} threads "
        f"on {env.get('cores')} cores. Written by `benchmarks/speed_memory.py --report` from "
        "`benchmarks/results/speed_memory.json`.",
        "",
        intro,
    ]
    for model, info in data["models"].items():
        lengths = sorted({m.prompt_tokens for m in results if m.model == model})
        if not lengths:
            continue
        budgets = sorted({m.budget for m in results if m.model == model and m.budget is not None})
        plot_budget = 128 if 128 in budgets else budgets[0]
        files = plot(results, model, plot_budget)
        focus = 4096 if 4096 in lengths else lengths[-1]
        lines += [
            f"## {model} ({info['parameters'] / 1e6:.0f}M parameters)",
            "",
            f"### Key ratios at {focus} tokens",
            "",
            *key_ratios(data, results, model, focus),
            "",
            f"![{model}]({files['by_length']})",
            "",
        ]
        for length in lengths:
            lines += [f"### {model}, {length}-token prompt", "", table(results, model, length), ""]
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text("\n".join(lines))
    print(f"wrote {PAGE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--budgets", default="128,512")
    parser.add_argument("--budgets-at", help="per-length budgets, e.g. 4096=64,128,256,512")
    parser.add_argument("--methods", default=",".join(BENCH_METHODS))
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--overhead-at", type=int, default=4096, help="length at which compression is timed alone")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the compression-overhead timing")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--report", action="store_true", help="write the results page from --out and stop")
    args = parser.parse_args()
    if args.report:
        report(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
