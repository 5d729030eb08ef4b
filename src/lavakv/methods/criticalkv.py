"""CriticalKV and CriticalAdaKV: SnapKV's selection refined by how much each entry moves the layer's output.

Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective" (arXiv 2502.03805). Dropping an entry perturbs the attention output by its attention
weight times its value *after* the output projection, so the paper bounds the perturbation by
``a_j * ||W_o v_j||_1`` and selects in two stages: each head first keeps ``first_stage_ratio`` of
its slots by attention alone (the entries that matter whatever their values), then fills the
rest by ``(a_j + epsilon) * ||W_o v_j||_1``. ``a_j`` is SnapKV's pooled window attention
averaged over the GQA group, and ``||W_o v_j||_1`` the L1 norm of the value projected through each
query head's slice of the output projection, averaged over the group.

``criticalkv`` gives every head the same budget; ``critical-adakv`` divides the layer's budget
among heads by Ada-KV's flattened top-k on the attention scores (``alpha`` floor), then runs the
two stages inside each head's share. The first stage keeps ``floor(first_stage_ratio * cap)`` of a
head's ``cap`` slots, as the paper's reference implementation rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .registry import LayerInput, register_score
from .scores import SnapKVScore


def projected_value_norms(layer: LayerInput) -> torch.Tensor:
    """``[H_kv, m]``: the L1 norm of each prefix value through each query head's output projection, group mean.

    ``W_o`` (``[hidden, H * d]``) is read as one ``[d, hidden]`` block per query head; the batch may
    be folded into the head dimension of ``layer`` (every sequence shares the layer's weights).
    """
    output = layer.weights.output
    if output is None:
        raise ValueError("this score needs the layer's output projection (o_proj), which this model's layer lacks")
    rows, prefix, dim = layer.key.shape[0], layer.prefix_length, layer.value.shape[-1]
    group = layer.query.shape[0] // rows
    heads = output.shape[1] // dim
    kv_heads = heads // group
    values = layer.value[:, :prefix].float().view(rows // kv_heads, kv_heads, prefix, dim)
    blocks = output.detach().float().t().reshape(heads, dim, -1)
    norms = torch.empty(rows // kv_heads, heads, prefix, device=values.device)
    for head in range(heads):
        projected = values[:, head // group] @ blocks[head].to(values.device)
        norms[:, head] = projected.abs().sum(dim=-1)
    return norms.view(rows // kv_heads, kv_heads, group, prefix).mean(dim=2).reshape(rows, prefix)


@register_score("criticalkv")
@dataclass(frozen=True)
class CriticalKVScore(SnapKVScore):
    """SnapKV's scores first, then ``(score + epsilon) * ||W_o v||_1`` for the slots the first stage leaves."""

    needs_layer_weights: ClassVar[bool] = True
    two_stage: ClassVar[bool] = True
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_number("first_stage_ratio", low=0.0, high=1.0)
        self.check_number("epsilon", low=0.0)

    def second_stage(self, layer: LayerInput, scores: torch.Tensor) -> torch.Tensor:
        return (scores + self.epsilon) * projected_value_norms(layer)

    def first_stage_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return (slots.double() * self.first_stage_ratio).floor().long()


register_preset("criticalkv", Method(score="criticalkv"))
register_preset("critical-adakv", Method(score="criticalkv", heads="ada"))
