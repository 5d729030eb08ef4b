"""DefensiveKV and Layer-DefensiveKV: guard against the entries whose importance the window underrates.

Feng et al., 2025, "Taming the Fragility of KV Cache Eviction in LLM Inference" (arXiv
2510.13334). Mean-aggregated scores assume an entry's importance stays put; when it does not,
eviction fails badly. DefensiveKV aggregates defensively instead:

1. each window query's attention over the prefix is smoothed with an average pool of width
   ``kernel`` and rescaled to the row's original mass;
2. an entry scores the *maximum* over the window queries and the query heads of its group, and
   no less than the head's mean score (the lower clamp);
3. as in CriticalKV, the score is weighted by how far the entry's value moves the layer's output:
   ``||W_o v||_1`` (group mean), normalized over the layer's KV heads at each position;
4. each head first protects its most attended entries (window attention averaged over the group
   and the window, normalized per head) until their cumulative share reaches ``mass`` minus the
   share the window itself receives; protected entries score the layer's highest score.

Heads share the layer's budget by a flattened top-k (Ada-KV with no floor, ``alpha=0``).
``layer-defensivekv`` ranks every (layer, head, entry) together: the ``global`` layer allocation
gives each layer as many slots as it has among the top ``H_kv * total`` scores of all layers.

Differences from the authors' code, on purpose: the window's share in step 4 is the window
queries' mean attention to the window's own keys (their code takes the last ``window`` prefix
columns instead); protection is budget independent (their code caps a head's protected entries
at its average slots; here a head whose protected entries exceed its share keeps the earliest of
them), so that progressive compression can shrink layers with the same ranking; ties go to the
earlier position; the window is always kept, outside the global ranking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .criticalkv import projected_value_norms
from .method import Method, register_preset
from .registry import LayerAllocation, LayerInput, Score, register_layer_allocation, register_score, round_to_total


@register_score("defensivekv")
@dataclass(frozen=True)
class DefensiveKVScore(Score):
    """Max-aggregated, mean-clamped pooled window attention times normalized ``||W_o v||_1``, with protection."""

    window_queries_only: ClassVar[bool] = True
    needs_layer_weights: ClassVar[bool] = True
    kernel: int = 5
    mass: float = 0.9

    def __post_init__(self) -> None:
        self.check_int("kernel", minimum=1, odd=True)
        self.check_number("mass", low=0.0, high=1.0)

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        kv_heads, prefix = layer.num_kv_heads, layer.prefix_length
        attention = layer.window_attention
        rows = attention[:, :, :prefix]
        pooled = rows
        if self.kernel > 1:
            flat = rows.reshape(-1, 1, prefix)
            pooled = F.avg_pool1d(flat, self.kernel, stride=1, padding=self.kernel // 2).view(rows.shape)
            pooled = pooled * (rows.sum(dim=-1, keepdim=True) / pooled.sum(dim=-1, keepdim=True).clamp_min(1e-30))
        grouped = pooled.reshape(kv_heads, -1, prefix)
        defensive = grouped.max(dim=1).values
        defensive = torch.maximum(defensive, defensive.mean(dim=-1, keepdim=True))
        norms = projected_value_norms(layer)
        scores = defensive * norms / norms.sum(dim=0, keepdim=True).clamp_min(1e-30)
        window_share = float(attention[:, :, prefix:].sum(dim=-1).mean()) if attention.shape[-1] > prefix else 0.0
        protected = self._protected(rows.reshape(kv_heads, -1, prefix).mean(dim=1), self.mass - window_share)
        return torch.where(protected, scores.max(), scores)

    @staticmethod
    def _protected(attention: torch.Tensor, threshold: float) -> torch.Tensor:
        """``[H_kv, m]``: each head's most attended entries before their cumulative share reaches ``threshold``."""
        shares = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        ordered, order = torch.sort(shares, dim=-1, descending=True, stable=True)
        before = ordered.cumsum(dim=-1) < threshold
        protected = torch.zeros_like(before)
        return protected.scatter_(-1, order, before)


@register_layer_allocation("global")
@dataclass(frozen=True)
class GlobalLayers(LayerAllocation):
    """Each layer's slots are its share of the top ``H_kv * total`` scores of every layer ranked together.

    Needs scores on one scale across layers (DefensiveKV's are: attention times a normalized
    norm). The summary is the layer's scores sorted, so re-allocating among the layers seen so
    far only ever shrinks a layer, which progressive compression relies on.
    """

    dynamic: ClassVar[bool] = True

    def summarize(self, layer: LayerInput, scores: torch.Tensor) -> torch.Tensor:
        return torch.sort(scores.reshape(-1).float().cpu(), descending=True).values

    def summarize_batch(self, layer: LayerInput, scores: torch.Tensor) -> list[torch.Tensor]:
        flat = scores.reshape(scores.shape[0], -1).float().cpu()
        return list(torch.sort(flat, dim=-1, descending=True).values)

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        sizes = [0 if s is None else len(s) for s in summaries]
        kv_heads = next((size // cap for size, cap in zip(sizes, caps) if cap > 0 and size), 1)
        target = min(total, sum(caps)) * kv_heads
        pooled = torch.cat([s for s in summaries if s is not None]) if any(sizes) else torch.empty(0)
        winners = torch.zeros(len(pooled), dtype=torch.bool)
        winners[torch.sort(pooled, descending=True, stable=True).indices[:target]] = True
        counts = [int(part.sum()) for part in torch.split(winners, [size for size in sizes if size])]
        counts_iter = iter(counts)
        shares = [next(counts_iter) / kv_heads if size else 0.0 for size in sizes]
        return round_to_total(shares, min(total, sum(caps)), caps)


register_preset("defensivekv", Method(score="defensivekv", heads="ada", alpha=0.0))
register_preset("layer-defensivekv", Method(score="defensivekv", heads="ada", layers="global", alpha=0.0))
