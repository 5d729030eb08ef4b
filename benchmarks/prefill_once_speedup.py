"""What prefilling each sample once saves: the same evaluation run twice, shared prefill vs one prefill per pair.

    .venv/bin/python benchmarks/prefill_once_speedup.py [--lengths 1000] [--depths 0.25,0.75]
                                                          [--budgets 64,128] [--repeats 1]

Runs ``lavakv eval --benchmark niah`` over every method (each at every budget, plus the full cache)
into two fresh run directories, one with ``--from-scratch`` (each (method, budget) prefilled with
its own compressing cache, as ``lavakv.generate`` does) and one with the shared prefill, back to
back in one process, alternating the order when repeated. It reports both wall times, their
ratio, and checks that both produced the same predictions and kept-entry counts. Writes
``benchmarks/results/prefill_once_speedup.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import lavakv
from lavakv.eval import EvalConfig, evaluate
from lavakv.eval.benchmarks import Niah

RESULTS = Path(__file__).parent / "results"


def timed_run(model, tokenizer, config: EvalConfig) -> tuple[float, dict]:
    start = time.perf_counter()
    result = evaluate(config, model, tokenizer)
    seconds = time.perf_counter() - start
    return seconds, {row.key: (row.prediction, row.kept_entries) for row in result.rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000")
    parser.add_argument("--depths", default="0.25,0.75")
    parser.add_argument("--budgets", default="64,128")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]

    model, tokenizer = lavakv.load_model()
    niah = Niah(lengths=tuple(lengths), depths=tuple(depths))
    samples = niah.samples(tokenizer)
    base = EvalConfig(benchmarks=(niah,), out="", methods=tuple(lavakv.METHODS), budgets=tuple(budgets), progress=False)
    pairs = len(base.pairs())
    timings: dict[str, list[float]] = {"from_scratch": [], "prefill_once": []}
    identical = True
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ["from_scratch", "prefill_once"] if repeat % 2 == 0 else ["prefill_once", "from_scratch"]
            rows = {}
            for mode in order:
                config = replace(base, out=str(Path(tmp) / f"{mode}-{repeat}"), from_scratch=mode == "from_scratch")
                seconds, rows[mode] = timed_run(model, tokenizer, config)
                timings[mode].append(seconds)
                print(f"repeat {repeat}: {mode} {seconds:.1f} s", flush=True)
            identical &= rows["from_scratch"] == rows["prefill_once"]

    scratch, once = median(timings["from_scratch"]), median(timings["prefill_once"])
    result = {
        "samples": len(samples),
        "pairs_per_sample": pairs,
        "lengths": lengths,
        "depths": depths,
        "budgets": budgets,
        "methods": list(lavakv.METHODS),
        "seconds": timings,
        "median_from_scratch_s": round(scratch, 2),
        "median_prefill_once_s": round(once, 2),
        "speedup": round(scratch / once, 2),
        "identical_predictions": identical,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prefill_once_speedup.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        "# Prefill once, compress many: speed-up\n\n"
        f"NIAH on the embedded SmolLM2, {len(samples)} samples (lengths {lengths}, depths {depths}), "
        f"{pairs} (method, budget) pairs per sample (every method at budgets {budgets}, plus the full "
        f"cache), {args.repeats} repeat(s), medians.\n\n"
        "| mode | wall time (s) |\n|---|---:|\n"
        f"| one prefill per pair (`--from-scratch`) | {scratch:.1f} |\n"
        f"| one prefill per sample (default) | {once:.1f} |\n\n"
        f"Speed-up: **{scratch / once:.2f}x**. Same predictions and kept entries in both modes: {identical}.\n"
    )
    (RESULTS / "prefill_once_speedup.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
