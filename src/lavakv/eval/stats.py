"""Bootstrap confidence intervals over samples, seeded, for scores and paired differences.

A score's interval resamples the samples of its cell with replacement (percentile bootstrap,
Efron & Tibshirani 1993). A benchmark average, the mean over datasets of each dataset's mean,
resamples within each dataset, so every replicate keeps the datasets' weights. A paired
difference resamples the per-sample differences between a method and the reference on the
samples both have. Each interval draws from its own generator, seeded by the run's seed and the
interval's key, so it does not change when other cells are added.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval ``[low, high]``, in the units of the values."""

    mean: float
    low: float
    high: float


def key_seed(seed: int, key: object) -> int:
    """A generator seed for one interval: the run's ``seed`` mixed with a hash of the interval's key."""
    return (zlib.crc32(repr(key).encode()) ^ (seed * 0x9E3779B1)) & 0xFFFFFFFF


def bootstrap_mean(
    groups: list[list[float]],
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
) -> Interval:
    """The mean over ``groups`` of each group's mean, with a percentile bootstrap interval.

    Each replicate resamples every group's values with replacement, within the group. One
    group is a plain mean over samples; a group of one value has an interval of zero width.
    """
    if not groups or any(len(group) == 0 for group in groups):
        raise ValueError("bootstrap_mean needs at least one group and no empty group")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    generator = np.random.default_rng(seed)
    arrays = [np.asarray(group, dtype=np.float64) for group in groups]
    replicates = np.zeros(resamples)
    for values in arrays:
        picks = generator.integers(0, len(values), size=(resamples, len(values)))
        replicates += values[picks].mean(axis=1)
    replicates /= len(arrays)
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    center = float(np.mean([values.mean() for values in arrays]))
    return Interval(center, float(low), float(high))


@dataclass(frozen=True)
class PairedDifference:
    """A method's score minus the reference's on the same samples: mean, interval, wins/ties/losses."""

    interval: Interval
    wins: int
    ties: int
    losses: int
    samples: int


def paired_difference(
    groups: list[list[tuple[float, float]]],
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
) -> PairedDifference:
    """``(score, reference score)`` pairs per group (dataset) -> the difference's mean over groups and interval."""
    differences = [[score - reference for score, reference in group] for group in groups]
    flat = [d for group in differences for d in group]
    return PairedDifference(
        interval=bootstrap_mean(differences, seed, resamples, level),
        wins=sum(d > 0 for d in flat),
        ties=sum(d == 0 for d in flat),
        losses=sum(d < 0 for d in flat),
        samples=len(flat),
    )
