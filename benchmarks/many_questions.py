"""Compress once, answer many: N questions over one long context, together vs N separate calls.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/many_questions.py [--tokens 4000] [--questions 8]
        [--method lava] [--budget 256] [--max-new-tokens 32]

On SmolLM2, a context of about ``--tokens`` tokens (Paul Graham essays from ``../shared/data``)
is asked ``--questions`` questions two ways, each in its own process so that its peak memory is
its own: ``lavakv.generate(..., questions=[...])`` (one prefill and compression, one copy of the
compressed cache per question, the answers decoded as one batch) and one
``lavakv.generate(..., question=q)`` call per question, alternating, ``--repeats`` times each.
It reports the median wall time of each, their ratio, the peak resident memory above the
loaded model, the KV bytes held at the end, and whether every answer is the same token for
token. Writes
``benchmarks/results/many_questions.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul_graham_essays"
QUESTIONS = [
    "What is the main argument of the text?",
    "Which people are mentioned, and why?",
    "What advice does the author give?",
    "Summarize the first essay in one sentence.",
    "What does the author say about startups?",
    "What mistakes does the author describe?",
    "Which example surprised you most, and why?",
    "What would the author tell a student?",
    "What is said about money?",
    "What is said about time?",
    "Name three topics the text covers.",
    "What is the tone of the writing?",
]


def context_text(tokenizer, tokens: int) -> str:
    """Whole essays, in name order, cut to their first ``tokens`` tokens."""
    text = ""
    for path in sorted(ESSAYS.glob("*.txt")):
        text += path.read_text() + "\n\n"
        if len(tokenizer(text)["input_ids"]) > tokens:
            break
    return tokenizer.decode(tokenizer(text)["input_ids"][:tokens]).strip()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    """One mode in this process: print a JSON line with its timings, memory and answers."""
    import torch

    import lavakv

    torch.set_num_threads(2)
    model, tokenizer = lavakv.load_model()
    context = context_text(tokenizer, args.tokens)
    questions = QUESTIONS[: args.questions]
    settings = dict(method=args.method, budget=args.budget, max_new_tokens=args.max_new_tokens)
    lavakv.generate(model, tokenizer, "Warm up.", **settings)
    before = rss_mib()
    start = time.perf_counter()
    if args.mode == "together":
        outputs = lavakv.generate(model, tokenizer, context, questions=questions, **settings)
        kv_bytes = sum(out.stats.kv_bytes for out in outputs)
    else:
        outputs = [lavakv.generate(model, tokenizer, context, question=q, **settings) for q in questions]
        kv_bytes = max(out.stats.kv_bytes for out in outputs)
    seconds = time.perf_counter() - start
    record = {
        "mode": args.mode,
        "seconds": seconds,
        "peak_rss_above_model_mib": rss_mib() - before,
        "kv_bytes_held": kv_bytes,
        "full_kv_bytes_one_question": outputs[0].stats.full_kv_bytes,
        "context_tokens": outputs[0].stats.prompt_length,
        "answers": [out.token_ids for out in outputs],
        "texts": [out.text for out in outputs],
    }
    print("RESULT " + json.dumps(record))


def run_mode(mode: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", mode] + [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in ("tokens", "questions", "method", "budget", "max_new_tokens")
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _median_run(runs: list[dict]) -> dict:
    """The run of median wall time (its memory figures with it); every run must give the same answers."""
    if any(run["answers"] != runs[0]["answers"] for run in runs):
        raise RuntimeError("repeated runs of one mode gave different answers")
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--method", default="lava")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=["together", "separate"], dest="mode")
    args = parser.parse_args()
    if not 1 <= args.questions <= len(QUESTIONS):
        parser.error(f"--questions must be between 1 and {len(QUESTIONS)}")
    if args.mode:
        worker(args)
        return
    runs = {"together": [], "separate": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(run_mode(mode, args))
    together, separate = (_median_run(runs[mode]) for mode in ("together", "separate"))
    same = [a == b for a, b in zip(together["answers"], separate["answers"])]
    result = {
        "settings": {k: getattr(args, k) for k in ("tokens", "questions", "method", "budget", "max_new_tokens")},
        "context_tokens": together["context_tokens"],
        "together": {k: v for k, v in together.items() if k != "answers"},
        "separate": {k: v for k, v in separate.items() if k != "answers"},
        "speedup": separate["seconds"] / together["seconds"],
        "seconds_each_run": {mode: [run["seconds"] for run in runs[mode]] for mode in runs},
        "identical_answers": sum(same),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many_questions.json").write_text(json.dumps(result, indent=1))
    s = result["settings"]
    lines = [
        "# Compress once, answer many",
        "",
        f"SmolLM2-135M-Instruct on 2 CPU cores, a {result['context_tokens']}-token context, {s['questions']} "
        f"questions, {s['method']} at budget {s['budget']}, {s['max_new_tokens']} new tokens per answer "
        "(`benchmarks/many_questions.py`, each mode in its own process).",
        "",
        f"Median of {len(runs['together'])} runs of each mode, alternating.",
        "",
        "| mode | wall s | peak RSS above the model, MiB | KV held at the end, MiB |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("together", "`questions=[...]`: one prefill, batched answers"),
        ("separate", "one `question=` call per question"),
    ):
        row = result[name]
        lines.append(
            f"| {label} | {row['seconds']:.1f} | {row['peak_rss_above_model_mib']:.0f} | "
            f"{row['kv_bytes_held'] / 2**20:.1f} |"
        )
    lines += [
        "",
        f"Speed-up: **{result['speedup']:.1f}x**; answers identical token for token: "
        f"{result['identical_answers']} of {s['questions']}. One uncompressed cache of the context "
        f"holds {together['full_kv_bytes_one_question'] / 2**20:.1f} MiB.",
        "",
    ]
    (RESULTS / "many_questions.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
