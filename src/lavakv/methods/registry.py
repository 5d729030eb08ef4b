"""Registries of the three composable parts of a method, and the per-layer input they read.

A method is a *score* (one number per prefix entry and KV head), a *head allocation* (how a
layer's prefix slots are split among its KV heads) and a *layer allocation* (how the total is
split among layers). Each part is registered by name; :class:`lavakv.Method` composes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from .config import Method

SCORES: dict[str, Callable[[LayerInput, Method], torch.Tensor]] = {}
HEAD_ALLOCATIONS: dict[str, Callable[[torch.Tensor, int, Method], list[int]]] = {}
LAYER_ALLOCATIONS: dict[str, LayerAllocation] = {}


def register_score(name: str):
    """Register ``fn(layer_input, method) -> scores[H_kv, m]`` under ``name``."""

    def wrap(fn):
        SCORES[name] = fn
        return fn

    return wrap


def register_head_allocation(name: str):
    """Register ``fn(scores[H_kv, M], slots_per_head, method) -> slots for each head`` under ``name``.

    ``scores`` may hold ``-inf`` for candidates a head does not have; the slots of a layer always
    sum to ``H_kv * slots_per_head``.
    """

    def wrap(fn):
        HEAD_ALLOCATIONS[name] = fn
        return fn

    return wrap


class LayerAllocation(Protocol):
    """Splits prefix slots per head among layers, each at most its cap (see ``layers.py``).

    ``dynamic`` allocations read one summary number per layer (``summarize``), so their budgets
    are only final once every layer has been seen; static ones know them up front.
    """

    dynamic: bool

    def summarize(self, layer: LayerInput, scores: torch.Tensor, method: Method) -> float | None: ...

    def allocate(
        self, summaries: list[float | None], caps: list[int], slots: int, total: int, method: Method
    ) -> list[int]: ...


def register_layer_allocation(name: str, allocation: LayerAllocation) -> LayerAllocation:
    LAYER_ALLOCATIONS[name] = allocation
    return allocation


@dataclass
class LayerInput:
    """One sequence's prefill tensors for one layer, with the window attention computed once, lazily.

    ``query`` is ``[H, n, d]``, ``key`` and ``value`` are ``[H_kv, n, d]`` (keys after RoPE);
    ``observed`` is the number of last queries that score the prefix, ``prefix_length`` the
    number ``m`` of leading entries that compete for slots (the rest is the kept window).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    observed: int
    prefix_length: int
    _window_attention: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_kv_heads(self) -> int:
        return self.key.shape[0]

    @property
    def group_size(self) -> int:
        return self.query.shape[0] // self.key.shape[0]

    @property
    def window_attention(self) -> torch.Tensor:
        """``A[h, j, i]``: softmax attention (float32, causal) of the last ``observed`` queries over all keys."""
        if self._window_attention is None:
            self._window_attention = attention_probabilities(
                self.query[:, -self.observed :],
                self.key,
                self.scaling,
                first_query_position=self.length - self.observed,
            )
        return self._window_attention

    @property
    def length(self) -> int:
        return self.key.shape[1]


def attention_probabilities(
    query: torch.Tensor, key: torch.Tensor, scaling: float, first_query_position: int
) -> torch.Tensor:
    """Causal softmax attention ``[H, q, n]`` in float32 of ``query[H, q, d]`` over ``key[H_kv, n, d]``."""
    heads, q_len, _ = query.shape
    kv_heads, n, _ = key.shape
    grouped = query.float().reshape(kv_heads, heads // kv_heads * q_len, -1)
    logits = (grouped @ key.float().transpose(1, 2)).reshape(heads, q_len, n) * scaling
    query_positions = torch.arange(first_query_position, first_query_position + q_len, device=key.device)
    future = torch.arange(n, device=key.device)[None, :] > query_positions[:, None]
    logits.masked_fill_(future, -math.inf)
    return torch.softmax(logits, dim=-1)


def stable_rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` descending along the last dim; ties go to the lower index.

    Max-pooling produces plateaus of equal scores, so every selection uses this order to stay
    deterministic (progressive and one-shot compression must agree entry for entry).
    """
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def round_to_total(shares: list[float], total: int, caps: list[int]) -> list[int]:
    """Round non-negative real ``shares`` to integers summing to ``min(total, sum(caps))``, each <= its cap.

    Floors first, then hands the remainder out by largest fractional part (ties to the lower
    index), then to any entry with room left, so no slot is ever lost or exceeded.
    """
    target = min(total, sum(caps))
    result = [min(cap, max(0, math.floor(share + 1e-9))) for share, cap in zip(shares, caps)]
    remainder = target - sum(result)
    if remainder < 0:
        for index in sorted(range(len(result)), key=lambda i: (shares[i] - result[i], -shares[i], i)):
            while remainder < 0 and result[index] > 0:
                result[index] -= 1
                remainder += 1
        return result
    order = sorted(range(len(result)), key=lambda i: (-(shares[i] - math.floor(shares[i] + 1e-9)), i))
    for index in order:
        if remainder == 0:
            break
        if result[index] < caps[index] and shares[index] > result[index]:
            result[index] += 1
            remainder -= 1
    for index in range(len(result)):
        room = min(remainder, caps[index] - result[index])
        result[index] += room
        remainder -= room
    return result


def proportional_shares(weights: list[float], caps: list[int], total: int) -> list[int]:
    """Split ``total`` in proportion to ``weights``, each share at most its cap (water-filling).

    Shares that hit their cap are fixed and the rest is re-split among the others, so a layer
    that is kept whole gives its unused slots to the remaining ones.
    """
    weights = [max(0.0, float(w)) if math.isfinite(w) else 0.0 for w in weights]
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    shares = [0.0] * len(weights)
    active = [i for i in range(len(weights)) if caps[i] > 0]
    remaining = float(min(total, sum(caps)))
    while active:
        weight_sum = sum(weights[i] for i in active)
        if weight_sum <= 0:
            for i in active:
                shares[i] = remaining / len(active)
            break
        scale = remaining / weight_sum
        capped = [i for i in active if weights[i] * scale >= caps[i]]
        if not capped:
            for i in active:
                shares[i] = weights[i] * scale
            break
        for i in capped:
            shares[i] = float(caps[i])
            remaining -= caps[i]
        active = [i for i in active if i not in capped]
    return round_to_total(shares, total, caps)
