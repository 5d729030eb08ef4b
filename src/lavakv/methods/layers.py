"""Layer allocations: how the total prefix slots are split among layers (slots per KV head).

``allocate(summaries, caps, slots, total, method)`` returns one slot count per layer, each at most
the layer's cap (its number of prefix entries). Static allocations use every layer's cap and
``slots`` (the average); dynamic ones split ``total`` among the layers whose summaries are given,
which is how progressive compression re-divides the whole budget among the layers seen so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import LayerInput, proportional_shares, register_layer_allocation, round_to_total


@dataclass(frozen=True)
class UniformLayers:
    """Every layer gets the same number of slots per head (SnapKV, Ada-SnapKV, H2O, StreamingLLM)."""

    dynamic: bool = False

    def summarize(self, layer: LayerInput, scores: torch.Tensor, method) -> None:
        return None

    def allocate(self, summaries, caps: list[int], slots: int, total: int, method) -> list[int]:
        return [min(slots, cap) for cap in caps]


@dataclass(frozen=True)
class PyramidLayers:
    """PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
    Funneling"): budgets fall linearly from the first layer to the last; ``beta`` sets the slope."""

    dynamic: bool = False

    def summarize(self, layer: LayerInput, scores: torch.Tensor, method) -> None:
        return None

    def allocate(self, summaries, caps: list[int], slots: int, total: int, method) -> list[int]:
        num_layers = len(caps)
        total = sum(min(slots, cap) for cap in caps)
        if num_layers == 1:
            return [total]
        low = slots // method.beta
        high = 2 * slots - low
        longest = max(caps)
        if high >= longest:
            high = longest
            low = 2 * slots - high
        shares = [float(high - layer * (high - low) // (num_layers - 1)) for layer in range(num_layers)]
        return round_to_total(shares, total, caps)


@dataclass(frozen=True)
class EntropyLayers:
    """LAVa's layer budgets (Shen et al., EMNLP 2025 Findings): proportional to the normalised entropy
    of the layer's flattened scores.

    A flatter score distribution means the information is spread over more entries, so the
    layer needs more of them. A layer whose share exceeds its length is kept whole and the
    slots it cannot use go to the others in proportion to their entropy.
    """

    dynamic: bool = True

    def summarize(self, layer: LayerInput, scores: torch.Tensor, method) -> float:
        flat = scores.reshape(-1).double().clamp_min(0)
        count = flat.numel()
        if count <= 1 or float(flat.sum()) <= 0:
            return 1.0
        probabilities = flat / flat.sum()
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-300))).sum()
        return float(entropy / math.log(count))

    def allocate(self, summaries, caps: list[int], slots: int, total: int, method) -> list[int]:
        return proportional_shares(summaries, caps, total)


@dataclass(frozen=True)
class PreferenceLayers:
    """CAKE's layer budgets (Qin et al., ICLR 2025): proportional to ``H_l^(1/tau1) * V_l^(1/tau2)``,
    the dispersion (entropy) and the shift (variance over window queries) of the layer's window
    attention on prefix keys."""

    dynamic: bool = True

    def summarize(self, layer: LayerInput, scores: torch.Tensor, method) -> float:
        prefix = layer.window_attention[:, :, : layer.prefix_length].float()
        dispersion = float(torch.special.entr(prefix).sum(dtype=torch.float64))
        shift = float(prefix.var(dim=1, unbiased=False).sum(dtype=torch.float64)) if prefix.shape[1] > 1 else 0.0
        return max(dispersion, 0.0) ** (1 / method.tau1) * max(shift, 0.0) ** (1 / method.tau2)

    def allocate(self, summaries, caps: list[int], slots: int, total: int, method) -> list[int]:
        return proportional_shares(summaries, caps, total)


register_layer_allocation("uniform", UniformLayers())
register_layer_allocation("pyramid", PyramidLayers())
register_layer_allocation("lava", EntropyLayers())
register_layer_allocation("cake", PreferenceLayers())
