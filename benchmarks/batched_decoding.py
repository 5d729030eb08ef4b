"""Decoding a sample's (method, budget) pairs together: wall time against one pair at a time and --from-scratch.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/batched_decoding.py [--data ../shared/data/longbench]
        [--datasets qasper,hotpotqa,gov_report,trec,passage_retrieval_en,lcc] [--per-dataset 1]
        [--budgets 128,256,512] [--max-length 3500] [--modes batched,one-pair,from-scratch]

Evaluates the same LongBench samples on the embedded SmolLM2 (the full cache and every compressing
preset at every budget, LongBench's prompts, ``--max-length`` cut as ``pred.py`` cuts) three
ways, back to back in one process, each into a fresh run directory:

* ``batched``: one prefill per sample, the pairs of close budgets decoded together (``--decode-batch 32``,
  the default);
* ``one-pair``: one prefill per sample, one pair decoded at a time (``--decode-batch 1``);
* ``from-scratch``: one prefill per pair and one pair decoded at a time (``--from-scratch
  --decode-batch 1``), what evaluating with ``lavakv.generate`` per pair costs.

It reports each wall time, the speed-ups of ``batched`` over the other two, and the share of
predictions that are identical to ``one-pair`` (with the pairs that differ). Writes
``benchmarks/results/batched_decoding.{json,md}`` after every mode.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import lavakv
from lavakv.eval import EvalConfig, evaluate
from lavakv.eval.benchmarks import LongBench

RESULTS = Path(__file__).parent / "results"
MODES = {"batched": (False, 32), "one-pair": (False, 1), "from-scratch": (True, 1)}


def timed_run(model, tokenizer, base: EvalConfig, directory: Path, mode: str) -> tuple[float, dict]:
    from_scratch, decode_batch = MODES[mode]
    config = replace(base, out=str(directory), from_scratch=from_scratch, decode_batch=decode_batch)
    start = time.perf_counter()
    result = evaluate(config, model, tokenizer)
    seconds = time.perf_counter() - start
    return seconds, {"/".join(map(str, row.key)): (row.prediction, row.error) for row in result.rows}


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{result.get('name', 'batched_decoding')}.json").write_text(json.dumps(result, indent=2) + "\n")
    seconds = result["seconds"]
    lines = [
        "# Batched decoding across (method, budget) pairs\n",
        f"LongBench on the embedded SmolLM2, {result['samples']} samples ({', '.join(result['sample_ids'])}), "
        f"`--max-length {result['max_length']}`, {result['pairs_per_sample']} pairs per sample (the full cache and "
        f"{len(result['methods']) - 1} compressing methods at budgets {result['budgets']}), "
        f"{result['threads']} CPU threads, one run per mode, back to back in one process.\n",
        "| mode | wall time (s) | batched is faster by |\n|---|---:|---:|",
    ]
    for mode in MODES:
        if mode in seconds:
            ratio = seconds[mode] / seconds["batched"] if "batched" in seconds else None
            lines.append(f"| {mode} | {seconds[mode]:.1f} | {'' if ratio is None else f'{ratio:.2f}x'} |")
    if "identical_share" in result:
        lines.append(
            f"\nPredictions identical to one pair at a time: {result['identical']} of {result['compared']} "
            f"({100 * result['identical_share']:.1f}%)."
        )
        if result["differing"]:
            lines.append("Pairs whose prediction differs: " + ", ".join(result["differing"]) + ".")
    if "from_scratch_identical" in result:
        lines.append(
            f"Predictions of `--from-scratch` identical to one pair at a time: {result['from_scratch_identical']} of "
            f"{result['compared']}."
        )
    (RESULTS / f"{result.get('name', 'batched_decoding')}.md").write_text("\n".join(lines) + "\n")


def rewrite(path: Path = RESULTS / "batched_decoding.json") -> None:
    """Write the markdown again from the JSON of the last run (after a change to :func:`write`)."""
    write(json.loads(path.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "longbench"))
    parser.add_argument("--datasets", default="qasper,hotpotqa,gov_report,trec,passage_retrieval_en,lcc")
    parser.add_argument("--per-dataset", type=int, default=1)
    parser.add_argument("--budgets", default="128,256,512")
    parser.add_argument("--max-length", type=int, default=3500)
    parser.add_argument("--name", default="batched_decoding", help="results file stem under benchmarks/results")
    parser.add_argument("--max-words", type=int, help="keep samples of at most this many words (short samples)")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; valid: {', '.join(MODES)}")
    budgets = [int(x) for x in args.budgets.split(",")]
    model, tokenizer = lavakv.load_model()
    longbench = LongBench(
        data=args.data, datasets=tuple(args.datasets.split(",")), limit=args.per_dataset, max_words=args.max_words
    )
    samples = longbench.samples(tokenizer)
    base = EvalConfig(
        benchmarks=(longbench,),
        out="",
        methods=tuple(lavakv.METHODS),
        budgets=tuple(budgets),
        max_length=args.max_length,
        progress=False,
    )
    pairs = base.pairs()
    result = {
        "name": args.name,
        "samples": len(samples),
        "sample_ids": [f"{s.dataset}/{s.sample_id}" for s in samples],
        "pairs_per_sample": len(pairs),
        "methods": list(lavakv.METHODS),
        "budgets": budgets,
        "max_length": args.max_length,
        "threads": torch.get_num_threads(),
        "seconds": {},
    }
    predictions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            seconds, predictions[mode] = timed_run(model, tokenizer, base, Path(tmp) / mode, mode)
            result["seconds"][mode] = round(seconds, 1)
            print(f"{mode}: {seconds:.1f} s", flush=True)
            if "batched" in predictions and "one-pair" in predictions:
                keys = sorted(predictions["one-pair"])
                differing = [k for k in keys if predictions["batched"].get(k) != predictions["one-pair"][k]]
                result.update(
                    compared=len(keys),
                    identical=len(keys) - len(differing),
                    identical_share=(len(keys) - len(differing)) / len(keys),
                    differing=differing,
                )
            if "from-scratch" in predictions and "one-pair" in predictions:
                keys = sorted(predictions["one-pair"])
                result["from_scratch_identical"] = sum(
                    predictions["from-scratch"].get(k) == predictions["one-pair"][k] for k in keys
                )
            for other in ("one-pair", "from-scratch"):
                if other in result["seconds"] and "batched" in result["seconds"]:
                    result[f"speedup_over_{other}"] = round(result["seconds"][other] / result["seconds"]["batched"], 2)
            write(result)
    print((RESULTS / f"{result.get('name', 'batched_decoding')}.md").read_text())


if __name__ == "__main__":
    main()
