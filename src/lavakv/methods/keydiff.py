"""KeyDiff: keep the entries whose keys differ most from the layer head's average key direction.

Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference
in Resource-Constrained Environments" (arXiv 2504.15364). The anchor is the mean of the head's
unit-normalised keys over the whole prompt; an entry's score is minus its key's cosine
similarity to the anchor. Query-free, so the preset has no observation window. The paper evicts
block by block as the prompt streams in; this is its one-shot form (kvpress's ``KeyDiffPress``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .method import Method, register_preset
from .registry import LayerInput, Score, register_score


@register_score("keydiff")
@dataclass(frozen=True)
class KeyDiffScore(Score):
    """Minus the cosine similarity of each prefix key to the mean unit key of its KV head."""

    rows_independent: ClassVar[bool] = True
    window_queries_only: ClassVar[bool] = True
    needs_window: ClassVar[bool] = False

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        keys = layer.key.float()
        anchor = F.normalize(keys, dim=-1).mean(dim=1, keepdim=True)
        return -F.cosine_similarity(keys[:, : layer.prefix_length], anchor, dim=-1)


register_preset("keydiff", Method(score="keydiff", window=0))
