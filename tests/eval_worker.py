"""A separate process for the store tests: evaluates tiny samples into a run directory.

``python tests/eval_worker.py OUT [--shard i/N|auto] [--shard-store shared|own] [--die-after K]``:
the shard is resolved as ``lavakv eval`` resolves it (``auto`` from torchrun's or Slurm's
variables); with ``--die-after`` the process kills itself with SIGKILL right after its K-th
committed row, as ``kill -9`` would.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TinyTokenizer, random_prompt, tiny_model  # noqa: E402

from lavakv.eval.runner import make_pairs, run  # noqa: E402
from lavakv.eval.samples import Sample  # noqa: E402
from lavakv.eval.shards import resolve_shard  # noqa: E402
from lavakv.eval.store import ResultStore  # noqa: E402

PAIRS = make_pairs(["full", "snapkv", "lava"], [24, 48])


def tiny_samples(count: int = 6) -> list[Sample]:
    """Prompts of token ids written as text (TinyTokenizer's format), answers that can be scored."""
    samples = []
    for index in range(count):
        ids = random_prompt(120 + 17 * index, seed=index)
        samples.append(
            Sample(
                benchmark="tiny",
                dataset="ids" if index % 2 else "more-ids",
                sample_id=f"s{index}",
                context=" ".join(map(str, ids)),
                question=" 7 8 9",
                answers=[str(ids[5])],
                max_new_tokens=5,
                metric="string_match_all",
            )
        )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shard")
    parser.add_argument("--shard-store")
    parser.add_argument("--die-after", type=int)
    args = parser.parse_args()
    written = []

    def on_row(row) -> None:
        written.append(row)
        if args.die_after is not None and len(written) >= args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    shard = resolve_shard(args.shard, args.shard_store, os.environ)
    with ResultStore(args.out, name=shard.store_name) as store:
        run(
            tiny_model("llama"),
            TinyTokenizer(),
            tiny_samples(),
            PAIRS,
            store,
            shard=shard.part,
            progress=False,
            on_row=on_row,
        )


if __name__ == "__main__":
    main()
