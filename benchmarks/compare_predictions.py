"""How far two runs of the same samples agree: identical predictions and score differences per (method, budget).

Used to measure what a change of inputs does to an existing store, e.g. the LongBench store
recorded with context and question tokenized apart against a rerun that tokenizes the prompt
whole. Only keys both runs hold (scored, no error) are compared. Writes
``benchmarks/results/<name>.json`` and ``.md`` and prints the table.

    python benchmarks/compare_predictions.py docs/results/longbench runs/lbcheck --name longbench_tokenization
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from lavakv.eval.report import method_label
from lavakv.eval.store import read_run

RESULTS = Path(__file__).resolve().parent / "results"


def compare(first: str, second: str) -> list[dict]:
    """One record per (method, budget) over the keys both runs scored, then one for all pairs together."""
    _, rows_a = read_run(first)
    _, rows_b = read_run(second)
    held = {row.key: row for row in rows_a if row.error is None}
    by_pair: dict[tuple[str, int], list[tuple]] = defaultdict(list)
    for row in rows_b:
        other = held.get(row.key)
        if row.error is None and other is not None:
            by_pair[(row.method, row.budget)].append((other, row))

    def record(label: str, budget: int | str, pairs: list[tuple]) -> dict:
        return {
            "method": label,
            "budget": budget,
            "samples": len(pairs),
            "identical_predictions": sum(a.prediction == b.prediction for a, b in pairs),
            "same_prompt_tokens": sum(a.prompt_tokens == b.prompt_tokens for a, b in pairs),
            "score_first": 100 * mean(a.score for a, _ in pairs),
            "score_second": 100 * mean(b.score for _, b in pairs),
            "mean_abs_score_change": 100 * mean(abs(a.score - b.score) for a, b in pairs),
        }

    records = [
        record(method_label(method) if method != "full" else "full cache", budget, pairs)
        for (method, budget), pairs in sorted(by_pair.items())
    ]
    everything = [pair for pairs in by_pair.values() for pair in pairs]
    if everything:
        records.append(record("all pairs", "", everything))
    return records


def markdown(records: list[dict], first: str, second: str) -> str:
    lines = [
        f"Predictions of `{first}` (first) and `{second}` (second) on the keys both hold; scores are "
        "means over those samples.\n",
        "| method | budget | samples | identical predictions | same prompt length | score first | score second "
        "| mean abs. score change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['method']} | {r['budget']} | {r['samples']} | {r['identical_predictions']} | "
            f"{r['same_prompt_tokens']} | {r['score_first']:.1f} | {r['score_second']:.1f} | "
            f"{r['mean_abs_score_change']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", help="run directory (its store files)")
    parser.add_argument("second", help="run directory compared with the first")
    parser.add_argument("--name", default="compare_predictions", help="results file name, without extension")
    args = parser.parse_args()
    records = compare(args.first, args.second)
    if not records:
        raise SystemExit(f"{args.first} and {args.second} hold no scored key in common")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(records, indent=2) + "\n")
    text = markdown(records, args.first, args.second)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    print(f"wrote {RESULTS / args.name}.json and .md")


if __name__ == "__main__":
    main()
