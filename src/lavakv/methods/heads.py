"""Head allocations: how a layer's prefix slots are split among its KV heads."""

from __future__ import annotations

import torch

from .registry import register_head_allocation, round_to_total, stable_rank


def candidate_counts(scores: torch.Tensor) -> list[int]:
    """Number of real candidates per head (``-inf`` marks a missing one)."""
    return (scores > -torch.inf).sum(dim=-1).tolist()


@register_head_allocation("uniform")
def uniform_heads(scores: torch.Tensor, slots_per_head: int, method) -> list[int]:
    """Every KV head of the layer gets the same number of prefix slots (SnapKV, PyramidKV, CAKE)."""
    return [min(slots_per_head, count) for count in candidate_counts(scores)]


def flattened_winners(scores: torch.Tensor, slots_per_head: int) -> list[int]:
    """``c_h``: how many of the layer's top ``H_kv * slots_per_head`` scores, taken jointly, each head holds."""
    kv_heads, width = scores.shape
    winners = stable_rank(scores.reshape(-1))[: kv_heads * slots_per_head]
    return torch.bincount(winners // width, minlength=kv_heads).tolist()


@register_head_allocation("ada")
def adaptive_heads(scores: torch.Tensor, slots_per_head: int, method) -> list[int]:
    """Flattened top-k with a floor (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
    Allocation for Efficient LLM Inference"), also LAVa's head allocation.

    Heads win slots by competing jointly (``c_h`` winners of the layer-wide top-k), then each head's
    share is ``(1 - alpha) * c_h + alpha * slots_per_head``, rounded so the layer total stays exact.
    """
    winners = flattened_winners(scores, slots_per_head)
    shares = [(1 - method.alpha) * c + method.alpha * slots_per_head for c in winners]
    return round_to_total(shares, scores.shape[0] * slots_per_head, candidate_counts(scores))
