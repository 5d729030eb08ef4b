"""DuoAttention: retrieval heads keep the whole context, streaming heads only the sinks and recent tokens.

Xiao et al., ICLR 2025, "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads" (arXiv 2410.10819). Only some heads retrieve from far back; the others attend to
the first tokens (attention sinks) and the recent ones, so they can keep just those. The paper
learns a gate per head; heads whose gate is above a threshold are retrieval heads.

Here the budget decides how many heads retrieve: with ``B`` tokens per KV head per layer on
average, every head keeps its ``sink`` first tokens and the window (the recent tokens), and the
remaining slots of the whole model go to heads in descending order of their gate, each head
filled completely (a retrieval head) before the next starts; the last head reached keeps its
most recent entries only. The gates are the ``duo`` table of a profile that ``lavakv calibrate``
measured on the model (``profile=PATH``). The selection is expressed as a score (sinks first, then
by gate, then by recency) that the flattened top-k over heads (``ada`` heads with ``alpha=0``) and
over layers (``global`` layers) turns into exactly this split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .profiles import load_profile
from .registry import LayerInput, Score, register_score


@register_score("duo-attention")
@dataclass(frozen=True)
class DuoAttentionScore(Score):
    """``3`` for sinks; ``1 + p`` plus a recency term under ``1 / (L * H_kv)`` for the rest, ``p`` the gate's rank."""

    rows_independent: ClassVar[bool] = True
    window_queries_only: ClassVar[bool] = True
    reads_profile: ClassVar[bool] = True
    profile: str = ""
    sink: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.profile, str):
            self.fail(f"profile must be a path, got {self.profile!r}")
        self.check_int("sink", minimum=0)

    def check_model(self, identity: dict) -> None:
        load_profile(self.profile).check_model(identity)

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        gates = load_profile(self.profile).table("duo").float()
        num_layers, kv_heads = gates.shape
        if layer.layer_index >= num_layers or layer.num_kv_heads % kv_heads:
            raise ValueError(
                f"profile {self.profile} covers {num_layers} layers x {kv_heads} KV heads, not layer "
                f"{layer.layer_index} with {layer.num_kv_heads} rows"
            )
        heads = num_layers * kv_heads
        order = torch.sort(gates.reshape(-1), stable=True).indices
        rank = torch.empty(heads)
        rank[order] = torch.arange(heads, dtype=torch.float32) / heads
        priority = rank.view(num_layers, kv_heads)[layer.layer_index].to(layer.key.device)
        prefix = layer.prefix_length
        positions = torch.arange(prefix, device=layer.key.device) + layer.first_position
        recency = (positions + 1).float() / (positions[-1] + 2).float() / (heads + 1) if prefix else positions.float()
        rows = layer.num_kv_heads
        scores = 1 + priority.repeat(rows // kv_heads)[:, None] + recency[None, :]
        return torch.where(positions[None, :] < self.sink, torch.full_like(scores, 3.0), scores)


register_preset("duo-attention", Method(score="duo-attention", heads="ada", layers="global", alpha=0.0))
