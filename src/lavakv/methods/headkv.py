"""HeadKV: per-head budgets from each head's measured importance, shared across all layers and heads.

Fu et al., ICLR 2025, "Not All Heads Matter: A Head-Level KV Cache Compression Method with
Integrated Retrieval and Reasoning" (arXiv 2410.19258). Heads differ in how much they retrieve
and reason over the context, so the budget goes where that happens. With ``b`` prefix slots per
head on average, every head keeps ``b - b // beta`` and the rest, ``b // beta`` per head over all
``L x H`` heads, is a shared pool split in proportion to the heads' importance ``s`` (normalized
to sum 1, raised to ``temp`` and normalized again): head ``(l, h)`` gets
``s_lh * pool + b - b // beta``. Inside its budget a head keeps its best entries by SnapKV's score.

The importance comes from the ``headkv`` table of a profile that ``lavakv calibrate`` measured on
the model (``profile=PATH``). Layer totals are the sums of their heads' shares, rounded to whole
slots per head so that the total stays exact; heads share their layer's total in proportion to
the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .profiles import load_profile
from .registry import (
    HeadAllocation,
    LayerAllocation,
    register_head_allocation,
    register_layer_allocation,
    round_to_total,
)


@dataclass(frozen=True)
class _HeadKVShares:
    """The options HeadKV's head and layer allocations share, and the per-head shares they give."""

    reads_profile: ClassVar[bool] = True
    profile: str = ""
    beta: float = 1.01
    temp: float = 1.0

    def _check_options(self) -> None:
        if not isinstance(self.profile, str):
            self.fail(f"profile must be a path, got {self.profile!r}")
        self.check_number("beta", low=1.0)
        self.check_number("temp", low=0.0, low_open=True)

    def check_model(self, identity: dict) -> None:
        load_profile(self.profile).check_model(identity)

    def shares(self, slots: int, num_layers: int, kv_heads: int) -> torch.Tensor:
        """``[L, H_kv]``: each head's prefix slots before rounding, for ``slots`` per head on average."""
        importance = load_profile(self.profile).table("headkv")
        if tuple(importance.shape) != (num_layers, kv_heads):
            raise ValueError(
                f"profile {self.profile} is {tuple(importance.shape)} (layers x KV heads), but this model has "
                f"{num_layers} x {kv_heads}; run lavakv calibrate on this model"
            )
        weights = importance / importance.sum() if float(importance.sum()) > 0 else torch.ones_like(importance)
        weights = weights / weights.sum()
        weights = weights**self.temp
        weights = weights / weights.sum()
        pooled = slots // self.beta
        return weights * pooled * num_layers * kv_heads + (slots - pooled)


@register_layer_allocation("headkv")
@dataclass(frozen=True)
class HeadKVLayers(_HeadKVShares, LayerAllocation):
    """Each layer's slots per head: the mean of its heads' HeadKV shares (static: read from the profile)."""

    def __post_init__(self) -> None:
        self._check_options()

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        kv_heads = len(load_profile(self.profile).table("headkv")[0])
        per_layer = self.shares(slots, len(caps), kv_heads).mean(dim=1).tolist()
        return round_to_total(per_layer, sum(min(slots, cap) for cap in caps), caps)


@register_head_allocation("headkv")
@dataclass(frozen=True)
class HeadKVHeads(_HeadKVShares, HeadAllocation):
    """A layer's slots split among its KV heads in proportion to their HeadKV shares (profile row ``layer``)."""

    def __post_init__(self) -> None:
        self._check_options()

    def at_layer(self, layer: int, num_layers: int, slots: int) -> HeadAllocation:
        return _LayerHeads(self, layer, num_layers, slots)

    def allocate(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        raise ValueError("the headkv head allocation splits a layer by its profile row; it needs the layer index")


@dataclass(frozen=True)
class _LayerHeads:
    """HeadKV's split of one layer, as :meth:`HeadAllocation.allocate` and its relatives expect."""

    heads: HeadKVHeads
    layer: int
    num_layers: int
    slots: int

    def _split(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        kv_heads = scores.shape[0]
        row = self.heads.shares(self.slots, self.num_layers, kv_heads)[self.layer]
        total = kv_heads * slots_per_head
        caps = [int(c) for c in torch.isfinite(scores).sum(dim=-1)]
        return round_to_total((row / row.sum() * total).tolist(), total, caps)

    def allocate(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        return self._split(scores, slots_per_head)

    retain = allocate

    def allocate_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        return torch.tensor([self._split(row, slots) for row, slots in zip(scores, slots_per_head)], dtype=torch.long)

    retain_batch = allocate_batch


register_preset("headkv", Method(score="snapkv", heads="headkv", layers="headkv"))
