"""Head allocations: how a layer's prefix slots are split among its KV heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import HeadAllocation, register_head_allocation, round_to_total, stable_rank


def candidate_counts(scores: torch.Tensor) -> list[int]:
    """Number of real candidates per head (``-inf`` marks a missing one)."""
    return (scores > -torch.inf).sum(dim=-1).tolist()


def flattened_winners(scores: torch.Tensor, slots_per_head: int) -> list[int]:
    """``c_h``: how many of the layer's top ``H_kv * slots_per_head`` scores, taken jointly, each head holds."""
    kv_heads, width = scores.shape
    winners = stable_rank(scores.reshape(-1))[: kv_heads * slots_per_head]
    return torch.bincount(winners // width, minlength=kv_heads).tolist()


@register_head_allocation("uniform")
@dataclass(frozen=True)
class UniformHeads(HeadAllocation):
    """Every KV head of the layer gets the same number of prefix slots (SnapKV, PyramidKV, CAKE)."""

    def allocate(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        return [min(slots_per_head, count) for count in candidate_counts(scores)]


@register_head_allocation("ada")
@dataclass(frozen=True)
class AdaptiveHeads(HeadAllocation):
    """Flattened top-k with a floor (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation for Efficient LLM Inference"), also LAVa's head allocation.

    Heads win slots by competing jointly (``c_h`` winners of the layer-wide top-k), then each head's
    share is ``(1 - alpha) * c_h + alpha * slots_per_head``, rounded so the layer total stays exact.
    """

    alpha: float = 0.2

    def __post_init__(self) -> None:
        self.check_number("alpha", low=0.0, high=1.0)

    def allocate(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        winners = flattened_winners(scores, slots_per_head)
        shares = [(1 - self.alpha) * c + self.alpha * slots_per_head for c in winners]
        return round_to_total(shares, scores.shape[0] * slots_per_head, candidate_counts(scores))

    def retain(self, scores: torch.Tensor, slots_per_head: int) -> list[int]:
        """A head keeps at least what it wins in the joint top-k: a smaller later budget may give it that many."""
        caps = self.allocate(scores, slots_per_head)
        return [max(cap, won) for cap, won in zip(caps, flattened_winners(scores, slots_per_head))]
