"""TOVA: keep the entries the last prompt token attends to most, averaged over the layer's heads.

Oren et al., 2024, "Transformers are Multi-State RNNs" (arXiv 2401.06104): Token Omission Via
Attention. The score of an entry is the last query's softmax attention to it, averaged over all
query heads of the layer, so every KV head keeps the same positions; the last token is the
observation window (``window=1``) and is always kept. The paper applies the rule token by token
while decoding; at prefill it is this one-shot selection (as kvpress's ``TOVAPress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .registry import LayerInput, Score, register_score


@register_score("tova")
@dataclass(frozen=True)
class TovaScore(Score):
    """The window queries' attention over the prefix, averaged over queries and over every head of the layer."""

    window_queries_only: ClassVar[bool] = True

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        attention = layer.window_attention[:, :, : layer.prefix_length]
        return attention.mean(dim=(0, 1)).expand(layer.num_kv_heads, -1).clone()


register_preset("tova", Method(score="tova", window=1))
