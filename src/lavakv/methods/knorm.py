"""Key-norm eviction: keep the entries whose keys have the smallest L2 norm.

Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430): keys of low norm draw high attention, so they are kept. No queries are read,
so the preset runs without an observation window (every prompt entry competes, as in the paper
and in kvpress's ``KnormPress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .registry import LayerInput, Score, register_score


@register_score("knorm")
@dataclass(frozen=True)
class KeyNormScore(Score):
    """Minus the L2 norm of each prefix key (float32), per KV head."""

    rows_independent: ClassVar[bool] = True
    window_queries_only: ClassVar[bool] = True
    needs_window: ClassVar[bool] = False

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        return -torch.linalg.vector_norm(layer.key[:, : layer.prefix_length].float(), dim=-1)


register_preset("knorm", Method(score="knorm", window=0))
