"""A decode-time budget: memory over a long generation, and summary quality with and without it.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_budget.py [--generate 4096] [--prompt 2048]
        [--samples 4] [--budget 256] [--decode-budget 256] [--interval 32]

Two parts, on SmolLM2, each configuration side by side in one process:

* **memory**: after a ``--prompt``-token prompt (Paul Graham essays), ``--generate`` greedy tokens
  with stops ignored, through lava at ``--budget`` without and with ``decode_budget``; every 256
  steps it records the entries and KV bytes the cache holds and the ms per token of the last
  256 steps.
* **quality**: the LongBench summarization samples (gov_report, qmsum, multi_news and
  multi_news from LongBench-E, the English summarization files shared here; the first
  ``--samples`` of each), query-aware, truncated in the middle to
  ``--max-length`` tokens, their own generation lengths; one prefill per sample, then lava at
  ``--budget`` without and with the decode budget. Scored with lavakv's ROUGE-L
  (``lavakv.eval.metrics``); the per-sample difference is reported with a seeded bootstrap
  interval.

Writes ``benchmarks/results/decode_budget.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import lavakv
from lavakv.decoding import TokenFeed
from lavakv.eval.benchmarks import build_samples
from lavakv.eval.metrics import score
from lavakv.eval.runner import prepare
from lavakv.prompting import stop_token_ids
from lavakv.recording import PrefillRecord

RESULTS = Path(__file__).parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SUMMARIES = ["gov_report", "qmsum", "multi_news", "multi_news_e"]
EVERY = 256


def essay_ids(tokenizer, tokens: int) -> list[int]:
    text = ""
    for path in sorted((SHARED / "paul_graham_essays").glob("*.txt")):
        text += path.read_text() + "\n\n"
        if len(tokenizer(text)["input_ids"]) > tokens:
            break
    return tokenizer(text)["input_ids"][:tokens]


def memory_part(model, tokenizer, args) -> dict:
    prompt = essay_ids(tokenizer, args.prompt)
    record = PrefillRecord(model, torch.tensor([prompt]))
    heads = model.config.num_hidden_layers * model.config.num_key_value_heads
    runs = {}
    for label, decode_budget in (("without", None), ("with", args.decode_budget)):
        cache = record.compress("lava", budget=args.budget, decode_budget=decode_budget, decode_interval=args.interval)
        feed = TokenFeed(model, cache, lengths=[len(prompt)])
        token = record.logits.argmax(-1, keepdim=True)
        points, start = [], time.perf_counter()
        for step in range(1, args.generate + 1):
            token = feed.extend(token).argmax(-1, keepdim=True)
            if step % EVERY == 0:
                now = time.perf_counter()
                stats = cache.stats(positions=False)
                points.append(
                    {
                        "step": step,
                        "entries_per_head": stats.held_entries / heads,
                        "kv_mib": stats.kv_bytes / 2**20,
                        "full_kv_mib": stats.full_kv_bytes / 2**20,
                        "ms_per_token": 1000 * (now - start) / EVERY,
                    }
                )
                start = time.perf_counter()
        runs[label] = {"points": points, "evictions": cache.stats(positions=False).decode_evictions}
    return {"prompt_tokens": len(prompt), "runs": runs}


def bootstrap(differences: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    generator = random.Random(seed)
    means = sorted(statistics.fmean(generator.choices(differences, k=len(differences))) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def quality_part(model, tokenizer, args) -> dict:
    samples = build_samples(
        "longbench", tokenizer, data=str(SHARED / "longbench"), datasets=SUMMARIES, limit=args.samples
    )
    stops = stop_token_ids(model, tokenizer)
    rows = []
    for sample in samples:
        prepared = prepare(tokenizer, sample, "auto", args.max_length)
        ids = prepared.context + prepared.question
        record = PrefillRecord(model, torch.tensor([ids]))
        row = {"dataset": sample.dataset, "id": sample.sample_id, "prompt_tokens": len(ids)}
        for label, decode_budget in (("without", None), ("with", args.decode_budget)):
            cache = record.compress(
                "lava", budget=args.budget, decode_budget=decode_budget, decode_interval=args.interval
            )
            feed = TokenFeed(model, cache, lengths=[len(ids)])
            tokens = feed.greedy(record.logits, sample.max_new_tokens, stops)[0]
            text = tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True)
            stats = cache.stats(positions=False)
            row[label] = {
                "score": 100 * float(score(sample, text)),
                "new_tokens": len(tokens),
                "entries_per_head": stats.held_entries
                / (model.config.num_hidden_layers * model.config.num_key_value_heads),
            }
        rows.append(row)
        print(
            f"{sample.dataset}/{sample.sample_id}: {row['without']['score']:.1f} vs {row['with']['score']:.1f}",
            flush=True,
        )
    differences = [row["with"]["score"] - row["without"]["score"] for row in rows]
    low, high = bootstrap(differences)
    return {
        "rows": rows,
        "mean_without": statistics.fmean(r["without"]["score"] for r in rows),
        "mean_with": statistics.fmean(r["with"]["score"] for r in rows),
        "mean_difference": statistics.fmean(differences),
        "difference_interval": [low, high],
        "same_text": sum(r["with"]["score"] == r["without"]["score"] for r in rows),
    }


def write_page(result: dict) -> str:
    s = result["settings"]
    memory, quality = result["memory"], result["quality"]
    lines = [
        "# Decode-time budget",
        "",
        f"SmolLM2-135M-Instruct on 2 CPU cores; lava at budget {s['budget']}, `decode_budget={s['decode_budget']}`, "
        f"`decode_interval={s['interval']}` (`benchmarks/decode_budget.py`).",
        "",
        f"## Memory over a {s['generate']}-token generation after a {memory['prompt_tokens']}-token prompt",
        "",
        "| step | entries/head without | with | KV MiB without | with | full cache MiB | ms/token without | with |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(memory["runs"]["without"]["points"], memory["runs"]["with"]["points"]):
        lines.append(
            f"| {a['step']} | {a['entries_per_head']:.0f} | {b['entries_per_head']:.0f} | {a['kv_mib']:.1f} | "
            f"{b['kv_mib']:.1f} | {a['full_kv_mib']:.1f} | {a['ms_per_token']:.1f} | {b['ms_per_token']:.1f} |"
        )
    largest = max(point["entries_per_head"] for point in memory["runs"]["with"]["points"])
    lines += [
        "",
        f"With the decode budget the cache held at most {largest:.0f} entries per head on average at these "
        f"readings, within `decode_budget + decode_interval` = {s['decode_budget'] + s['interval']} (a bound the "
        f"tests check at every step), after {memory['runs']['with']['evictions']} layer evictions.",
        "",
        f"## Summaries: {len(quality['rows'])} LongBench samples (gov_report, qmsum, multi_news; "
        f"LongBench and LongBench-E), max length {s['max_length']}",
        "",
        "| dataset | sample | prompt tokens | ROUGE-L without | with | new tokens without / with "
        "| entries/head at end without | with |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in quality["rows"]:
        a, b = row["without"], row["with"]
        lines.append(
            f"| {row['dataset']} | {row['id']} | {row['prompt_tokens']} | {a['score']:.1f} | {b['score']:.1f} | "
            f"{a['new_tokens']} / {b['new_tokens']} | {a['entries_per_head']:.0f} | {b['entries_per_head']:.0f} |"
        )
    low, high = quality["difference_interval"]
    lines += [
        "",
        f"Mean ROUGE-L {quality['mean_without']:.2f} without and {quality['mean_with']:.2f} with the decode budget; "
        f"difference {quality['mean_difference']:+.2f} (95% bootstrap interval over samples {low:+.2f} to "
        f"{high:+.2f}); {quality['same_text']} of {len(quality['rows'])} samples scored the same.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generate", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=3, help="per summarization file")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--decode-budget", type=int, default=256)
    parser.add_argument("--interval", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=3500)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--report", action="store_true", help="only rewrite the page from the JSON results")
    args = parser.parse_args()
    if args.report:
        page = write_page(json.loads((RESULTS / "decode_budget.json").read_text()))
        (RESULTS / "decode_budget.md").write_text(page)
        print(page)
        return
    torch.set_num_threads(2)
    model, tokenizer = lavakv.load_model()
    settings = {
        k: getattr(args, k)
        for k in ("generate", "prompt", "samples", "budget", "decode_budget", "interval", "max_length")
    }
    path = RESULTS / "decode_budget.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    memory = previous.get("memory") if args.skip_memory else memory_part(model, tokenizer, args)
    result = {"settings": settings, "memory": memory, "quality": quality_part(model, tokenizer, args)}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    page = write_page(result)
    (RESULTS / "decode_budget.md").write_text(page)
    print(page)


if __name__ == "__main__":
    main()
