"""Which samples each process of a sharded run evaluates, and into which store file.

Shards come from ``--shard i/N`` or from the launcher (torchrun, ``accelerate launch``, a Slurm
array); every process computes the same split from the same samples, balanced to within one.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from .store import STORE_NAME, shard_store_name

LAUNCHER_VARIABLES = (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"))
"""Where ``--shard auto`` reads the shard: torchrun / ``accelerate launch``, then a Slurm array."""


def shard_from_launcher(environ: Mapping[str, str]) -> tuple[int, int, int | None]:
    """``(index, count, local_rank)`` of this process as its launcher set them (``--shard auto``).

    torchrun and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE`` (and ``LOCAL_RANK``, the
    process's GPU on its node); a Slurm array sets ``SLURM_ARRAY_TASK_ID`` and
    ``SLURM_ARRAY_TASK_COUNT`` (array indices must run from 0, as ``--array=0-N`` gives). A
    launcher variable that is set but not a valid number is an error, as is none being set.
    """
    for index_name, count_name in LAUNCHER_VARIABLES:
        if index_name not in environ and count_name not in environ:
            continue
        try:
            index, count = int(environ[index_name]), int(environ[count_name])
        except (KeyError, ValueError):
            raise ValueError(
                f"--shard auto: {index_name}={environ.get(index_name)!r} and {count_name}={environ.get(count_name)!r} "
                "must both be integers"
            ) from None
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard auto: {index_name}={index} must be in [0, {count_name}={count})")
        local = environ.get("LOCAL_RANK") if index_name == "RANK" else None
        if local is not None and not (local.isdigit() and local.isascii()):
            raise ValueError(f"--shard auto: LOCAL_RANK={local!r} must be an integer >= 0 (the process's GPU)")
        return index, count, None if local is None else int(local)
    names = ", ".join(f"{a}/{b}" for a, b in LAUNCHER_VARIABLES)
    raise ValueError(
        f"--shard auto takes the shard from a launcher, but none of {names} is set; start the processes with "
        "torchrun, accelerate launch or a Slurm array (sbatch --array=0-N), or give --shard i/N"
    )


SHARD_STORES = ("shared", "own")


@dataclass(frozen=True)
class Shard:
    """Which samples this process evaluates, and into which store file of the run directory.

    ``local_rank`` is the launcher's GPU index on this node (``None`` without one).
    """

    index: int
    count: int
    store_name: str
    local_rank: int | None = None

    @property
    def part(self) -> tuple[int, int]:
        return self.index, self.count


def resolve_shard(text: str | None, shard_store: str | None, environ: Mapping[str, str]) -> Shard:
    """``--shard`` (``i/N``, ``auto`` or none) and ``--shard-store`` as one :class:`Shard`.

    ``shared`` writes ``results.sqlite`` (several processes of one machine may share it); ``own``
    writes a file of this shard's own (nodes that share no database). The default is ``own``
    with ``auto``, whose processes may run on several nodes, and ``shared`` otherwise.
    """
    if shard_store is not None and shard_store not in SHARD_STORES:
        raise ValueError(f"--shard-store must be one of {', '.join(SHARD_STORES)}, got {shard_store!r}")
    local_rank = None
    if text == "auto":
        index, count, local_rank = shard_from_launcher(environ)
    else:
        index, count = parse_shard(text)
    own = (shard_store or ("own" if text == "auto" else "shared")) == "own"
    name = shard_store_name(index, count) if own and count > 1 else STORE_NAME
    return Shard(index, count, name, local_rank)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/N (for example 0/2), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard i/N needs N >= 1 and 0 <= i < N, got {text!r}")
    return index, count


def shard_members(keys: list[tuple[str, ...]], count: int) -> list[set[int]]:
    """Per shard, the positions in ``keys`` it evaluates: every shard within one sample of the others.

    Samples are ranked by a hash of their key (ties broken by the key) and dealt out in turn, so
    every process of a run, given the same samples, computes the same split, and each shard gets
    a mix of datasets and lengths rather than a contiguous block.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the shard count must be an integer >= 1, got {count!r}")
    ranked = sorted(range(len(keys)), key=lambda i: (zlib.crc32("/".join(keys[i]).encode()), keys[i]))
    members: list[set[int]] = [set() for _ in range(count)]
    for rank, position in enumerate(ranked):
        members[rank % count].add(position)
    return members
