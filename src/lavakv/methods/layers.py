"""Layer allocations: how the total prefix slots are split among layers (slots per KV head).

``allocate(summaries, caps, slots, total)`` returns one slot count per layer, each at most the
layer's cap (its number of prefix entries). Static allocations use every layer's cap and ``slots``
(the average); dynamic ones split ``total`` among the layers whose summaries are given, which is
how progressive compression re-divides the whole budget among the layers seen so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .registry import LayerAllocation, LayerInput, proportional_shares, register_layer_allocation, round_to_total


@register_layer_allocation("uniform")
@dataclass(frozen=True)
class UniformLayers(LayerAllocation):
    """Every layer gets the same number of slots per head (SnapKV, Ada-SnapKV, H2O, StreamingLLM)."""

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        return [min(slots, cap) for cap in caps]


@register_layer_allocation("pyramid")
@dataclass(frozen=True)
class PyramidLayers(LayerAllocation):
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling"): budgets fall linearly from the first layer to the last; ``beta`` sets the slope."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        self.check_number("beta", low=1.0)

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        num_layers = len(caps)
        total = sum(min(slots, cap) for cap in caps)
        if num_layers == 1:
            return [total]
        low = slots // self.beta
        high = 2 * slots - low
        longest = max(caps)
        if high >= longest:
            high = longest
            low = 2 * slots - high
        shares = [float(high - layer * (high - low) // (num_layers - 1)) for layer in range(num_layers)]
        return round_to_total(shares, total, caps)


@register_layer_allocation("lava")
@dataclass(frozen=True)
class EntropyLayers(LayerAllocation):
    """LAVa's layer budgets (Shen et al., EMNLP 2025 Findings): proportional to the normalised entropy
    of the layer's flattened scores.

    A flatter score distribution means the information is spread over more entries, so the
    layer needs more of them. A layer whose share exceeds its length is kept whole and the
    slots it cannot use go to the others in proportion to their entropy.
    """

    dynamic: ClassVar[bool] = True

    def summarize(self, layer: LayerInput, scores: torch.Tensor) -> float:
        flat = scores.reshape(-1).double().clamp_min(0)
        count = flat.numel()
        if count <= 1 or float(flat.sum()) <= 0:
            return 1.0
        probabilities = flat / flat.sum()
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-300))).sum()
        return float(entropy / math.log(count))

    def summarize_batch(self, layer: LayerInput, scores: torch.Tensor) -> list[float]:
        flat = scores.reshape(scores.shape[0], -1).double().clamp_min(0)
        count = flat.shape[1]
        totals = flat.sum(dim=-1, keepdim=True)
        if count <= 1:
            return [1.0] * scores.shape[0]
        probabilities = flat / totals.clamp_min(1e-300)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-300))).sum(dim=-1) / math.log(count)
        return torch.where(totals[:, 0] > 0, entropy, torch.ones_like(entropy)).tolist()

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        return proportional_shares(summaries, caps, total)


@register_layer_allocation("cake")
@dataclass(frozen=True)
class PreferenceLayers(LayerAllocation):
    """CAKE's layer budgets (Qin et al., ICLR 2025): proportional to ``H_l^(1/tau1) * V_l^(1/tau2)``,
    the dispersion (entropy) and the shift (variance over window queries) of the layer's window
    attention on prefix keys."""

    dynamic: ClassVar[bool] = True
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self) -> None:
        self.check_number("tau1", low=0.0, low_open=True)
        self.check_number("tau2", low=0.0, low_open=True)

    def summarize(self, layer: LayerInput, scores: torch.Tensor) -> float:
        prefix = layer.window_attention[:, :, : layer.prefix_length].float()
        dispersion = float(torch.special.entr(prefix).sum(dtype=torch.float64))
        shift = float(prefix.var(dim=1, unbiased=False).sum(dtype=torch.float64)) if prefix.shape[1] > 1 else 0.0
        return self._preference(dispersion, shift)

    def summarize_batch(self, layer: LayerInput, scores: torch.Tensor) -> list[float]:
        batch = scores.shape[0]
        attention = layer.window_attention
        prefix = (
            attention[:, :, : layer.prefix_length].float().reshape(batch, -1, attention.shape[1], layer.prefix_length)
        )
        dispersions = torch.special.entr(prefix).reshape(batch, -1).sum(dim=-1, dtype=torch.float64).tolist()
        if prefix.shape[2] > 1:
            variance = prefix.var(dim=2, unbiased=False).reshape(batch, -1)
            shifts = variance.sum(dim=-1, dtype=torch.float64).tolist()
        else:
            shifts = [0.0] * batch
        return [self._preference(d, s) for d, s in zip(dispersions, shifts)]

    def _preference(self, dispersion: float, shift: float) -> float:
        return max(dispersion, 0.0) ** (1 / self.tau1) * max(shift, 0.0) ** (1 / self.tau2)

    def allocate(self, summaries, caps: list[int], slots: int, total: int) -> list[int]:
        return proportional_shares(summaries, caps, total)
