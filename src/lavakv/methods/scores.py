"""Scores: one importance number per prefix entry and KV head (``[H_kv, m]``, higher is kept first)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .registry import LayerInput, Score, attention_probabilities, register_score

H2O_QUERY_CHUNK = 256
POOLINGS = ("max", "avg", "none")


def pool(scores: torch.Tensor, kind: str, kernel: int) -> torch.Tensor:
    """Smooth ``scores[..., m]`` along positions with a stride-1 pool of odd ``kernel`` (SnapKV's clustering)."""
    if kernel == 1 or kind == "none":
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    if kind == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif kind == "avg":
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {kind!r}; valid: {', '.join(POOLINGS)}")
    return pooled.reshape(scores.shape)


def reduce_group(scores: torch.Tensor, num_kv_heads: int, how: str) -> torch.Tensor:
    """Reduce query-head scores ``[H, m]`` to KV-head scores ``[H_kv, m]`` over each GQA group."""
    grouped = scores.reshape(num_kv_heads, -1, scores.shape[-1])
    return grouped.max(dim=1).values if how == "max" else grouped.mean(dim=1)


@dataclass(frozen=True)
class PooledScore(Score):
    """A score smoothed along positions: ``pooling`` (max, avg or none) over an odd ``kernel``."""

    rows_independent: ClassVar[bool] = True
    window_queries_only: ClassVar[bool] = True
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        self.check_int("kernel", minimum=1, odd=True)
        self.check_choice("pooling", POOLINGS)

    def pooled_window_attention(self, layer: LayerInput) -> torch.Tensor:
        """``p[h, i]``: window attention averaged over the observed queries, prefix keys only, pooled."""
        prefix = layer.window_attention[:, :, : layer.prefix_length]
        return pool(prefix.mean(dim=1), self.pooling, self.kernel)


@register_score("snapkv")
@dataclass(frozen=True)
class SnapKVScore(PooledScore):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

    Pooled window attention, averaged over the query heads of each GQA group.
    """

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        return reduce_group(self.pooled_window_attention(layer), layer.num_kv_heads, "mean")


@register_score("lava")
@dataclass(frozen=True)
class LavaScore(PooledScore):
    """LAVa (Shen et al., EMNLP 2025 Findings, "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget Allocation").

    Pooled window attention times ``Vmax``, the largest L1 norm of a prefix value vector of the
    KV head, then the max over the GQA group. The factor comes from the paper's bound on the L1
    error of the layer output when entries are dropped, and makes scores comparable across heads.
    """

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        pooled = self.pooled_window_attention(layer)
        value_norm_max = layer.value[:, : layer.prefix_length].float().abs().sum(dim=-1).amax(dim=-1)
        weighted = pooled * value_norm_max.repeat_interleave(layer.group_size)[:, None]
        return reduce_group(weighted, layer.num_kv_heads, "max")


@register_score("cake")
@dataclass(frozen=True)
class CakeScore(PooledScore):
    """CAKE (Qin et al., ICLR 2025, "CAKE: Cascading and Adaptive KV cache Eviction with Layer Preferences").

    Mean plus ``gamma`` times the variance of the window attention over the observed queries,
    pooled (average pooling with kernel 5, as CAKE does), averaged over each GQA group.
    """

    kernel: int = 5
    pooling: str = "avg"
    gamma: float = 200.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_number("gamma", low=0.0)

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        prefix = layer.window_attention[:, :, : layer.prefix_length]
        indicator = prefix.mean(dim=1) + self.gamma * prefix.var(dim=1, unbiased=False)
        return reduce_group(pool(indicator, self.pooling, self.kernel), layer.num_kv_heads, "mean")


@register_score("h2o")
@dataclass(frozen=True)
class H2OScore(Score):
    """H2O (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

    Attention received from every query given (the whole prompt at prefill, the latest generated
    tokens while decoding), accumulated, averaged over each GQA group.
    Computed in chunks of queries so that the full ``n x n`` matrix never exists at once; a chunk
    attends only to the keys its last query can see, so the causal half is never computed.
    """

    rows_independent: ClassVar[bool] = True

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        heads, length, queries = layer.query.shape[0], layer.length, layer.query.shape[1]
        first = length - queries
        total = torch.zeros(heads, length, dtype=torch.float32, device=layer.key.device)
        for start in range(0, queries, H2O_QUERY_CHUNK):
            chunk = layer.query[:, start : start + H2O_QUERY_CHUNK]
            visible = first + start + chunk.shape[1]
            probabilities = attention_probabilities(
                chunk, layer.key[:, :visible], layer.scaling, first_query_position=first + start
            )
            total[:, :visible] += probabilities.sum(dim=1)
        return reduce_group(total[:, : layer.prefix_length], layer.num_kv_heads, "mean")


@register_score("streamingllm")
@dataclass(frozen=True)
class StreamingScore(Score):
    """StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks").

    The first ``sink`` tokens rank above everything, then recency: later tokens rank higher.
    The window (the most recent tokens) is kept besides, so the sink and the window share the
    budget: ``sink + window <= budget``, or the sink would silently shrink to what is left.
    """

    rows_independent: ClassVar[bool] = True
    window_queries_only: ClassVar[bool] = True
    sink: int = 4

    def __post_init__(self) -> None:
        self.check_int("sink", minimum=0)

    def check_slots(self, slots: int, budget: int, window: int) -> None:
        if self.sink > slots:
            self.fail(
                f"sink {self.sink} does not fit in budget {budget}: the budget holds the sink and the "
                f"{window}-token window (sink + window <= budget), so sink must be <= {slots}; give a "
                f"smaller sink, a budget >= {self.sink + window} or a smaller window"
            )

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        positions = torch.arange(layer.prefix_length, dtype=torch.float32, device=layer.key.device)
        scores = positions.masked_fill(positions < self.sink, math.inf)
        return scores.expand(layer.num_kv_heads, -1).clone()
