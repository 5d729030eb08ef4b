"""Head allocations: how a layer's prefix slots are split among its KV heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import HeadAllocation, register_head_allocation, round_to_total, stable_rank


def candidate_counts(scores: torch.Tensor) -> list[int]:
    """Number of real candidates per head (``-inf`` marks a missing one)."""
    return (scores > -torch.inf).sum(dim=-1).tolist()


def batch_candidate_counts(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H_kv]``: real candidates per sequence and head of ``scores [B, H_kv, M]``."""
    return (scores > -torch.inf).sum(dim=-1).cpu()


def batch_flattened_winners(scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
    """``c_h`` of :func:`flattened_winners` for every sequence of ``scores [B, H_kv, M]`` at once (CPU ``[B, H_kv]``).

    Only real candidates win: a budget above a sequence's candidates never counts padding.
    """
    batch, kv_heads, width = scores.shape
    flat = scores.reshape(batch, kv_heads * width)
    order = stable_rank(flat)
    wanted = torch.tensor([kv_heads * slots for slots in slots_per_head], device=flat.device)
    won = torch.arange(kv_heads * width, device=flat.device)[None, :] < wanted[:, None]
    won &= flat.gather(1, order) > -torch.inf
    counts = torch.zeros(batch, kv_heads, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(1, order // width, won.long()).cpu()


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

    def allocate_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        slots = torch.tensor(slots_per_head, dtype=torch.long)[:, None]
        return torch.minimum(batch_candidate_counts(scores), slots)

    def retain_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        return self.allocate_batch(scores, slots_per_head)


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

    def allocate_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        return self._shares(scores, slots_per_head, batch_flattened_winners(scores, slots_per_head))

    def retain_batch(self, scores: torch.Tensor, slots_per_head: list[int]) -> torch.Tensor:
        winners = batch_flattened_winners(scores, slots_per_head)
        return torch.maximum(self._shares(scores, slots_per_head, winners), winners)

    def _shares(self, scores: torch.Tensor, slots_per_head: list[int], winners: torch.Tensor) -> torch.Tensor:
        """Each sequence's floored shares, rounded to its exact total (integer bookkeeping on a few numbers)."""
        kv_heads = scores.shape[1]
        rows = zip(winners.tolist(), slots_per_head, batch_candidate_counts(scores).tolist())
        return torch.tensor(
            [
                round_to_total([(1 - self.alpha) * c + self.alpha * slots for c in won], kv_heads * slots, counts)
                for won, slots, counts in rows
            ],
            dtype=torch.long,
        )
