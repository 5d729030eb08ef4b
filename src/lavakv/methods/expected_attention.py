"""Expected Attention: score entries by the attention that *future* queries are expected to pay them.

Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution" (arXiv 2510.00636). The prompt's queries before RoPE are modelled as
a Gaussian ``N(mu, Sigma)`` per query head (the first ``n_sink`` positions left out as outliers).
A query ``t`` positions ahead is rotated by RoPE's ``R_t``; averaging ``R_t`` over the next
``n_future_positions`` positions gives ``R``, and the expected logit of key ``k`` is
``(R mu) . k * s + k^T (R Sigma R^T) k * s^2 / 2`` (``s`` the attention scaling; the second term
from the Gaussian's moment generating function, dropped with ``use_covariance=false``). A softmax
over the scored keys turns logits into expected attention, averaged over the GQA group and, with
``use_vnorm``, scaled by ``||v||_2`` after adding ``epsilon``. The first ``n_sink`` positions are
always kept (they score as the head's best entry).

It reads no window queries, so the preset runs without an observation window (``window=0``):
every prompt entry competes for the budget. The queries before RoPE are recovered from the
attention's queries by inverting the rotation the model's rotary embedding applied (exact for
RoPE's rotate-half layout), so the statistics include any query bias and query norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .registry import LayerInput, Score, register_score


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotate-half map: ``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def unrotate(rotated: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vectors before RoPE, given ``rotated = x * cos + rotate_half(x) * sin`` (cos, sin ``[n, d]``)."""
    return (rotated * cos - rotate_half(rotated) * sin) / (cos * cos + sin * sin)


@register_score("expected-attention")
@dataclass(frozen=True)
class ExpectedAttentionScore(Score):
    """The softmax of the expected logits of future queries, group mean, times ``||v||_2`` (module docstring)."""

    needs_window: ClassVar[bool] = False
    needs_layer_weights: ClassVar[bool] = True
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        self.check_int("n_future_positions", minimum=1)
        self.check_int("n_sink", minimum=0)
        self.check_bool("use_covariance")
        self.check_bool("use_vnorm")
        self.check_number("epsilon", low=0.0)

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        rotary = layer.weights.rotary
        if rotary is None:
            raise ValueError("the expected-attention score needs the model's rotary embedding (RoPE), which it lacks")
        kv_heads, length, dim = layer.key.shape
        heads = layer.query.shape[0]
        group = heads // kv_heads
        device = layer.key.device
        sinks = min(length, max(0, self.n_sink - layer.first_position))
        positions = torch.arange(layer.first_position, layer.first_position + length, device=device)
        cos, sin = rotary(positions)
        queries = unrotate(layer.query.float(), cos.to(device), sin.to(device))[:, sinks:]
        if queries.shape[1] == 0:
            raise ValueError(f"expected-attention needs queries after the n_sink={self.n_sink} first positions")
        mean = queries.mean(dim=1)
        future = torch.arange(length, length + self.n_future_positions, device=device) + layer.first_position
        future_cos, future_sin = (t.to(device).mean(dim=0) for t in rotary(future))
        rotation = torch.diag(future_cos) + torch.diag(future_sin) @ _rotate_half_matrix(dim, device)
        keys = layer.key[:, sinks:].float().repeat_interleave(group, dim=0)
        logits = keys @ (mean @ rotation.T)[:, :, None] * layer.scaling
        logits = logits[..., 0]
        if self.use_covariance:
            centred = queries - mean[:, None]
            covariance = centred.transpose(1, 2) @ centred / queries.shape[1]
            covariance = rotation @ covariance @ rotation.T
            logits = logits + ((keys @ covariance) * keys).sum(dim=-1) * layer.scaling**2 / 2
        expected = logits.softmax(dim=-1).view(kv_heads, group, -1).mean(dim=1)
        if self.use_vnorm:
            expected = (expected + self.epsilon) * torch.linalg.vector_norm(layer.value[:, sinks:].float(), dim=-1)
        scores = torch.cat([expected.new_empty(kv_heads, sinks), expected], dim=1)
        if sinks:
            scores[:, :sinks] = expected.max(dim=1, keepdim=True).values
        return scores[:, : layer.prefix_length]


def _rotate_half_matrix(dim: int, device: torch.device) -> torch.Tensor:
    """``P`` with ``P @ x == rotate_half(x)``."""
    return rotate_half(torch.eye(dim, device=device)).T


register_preset("expected-attention", Method(score="expected-attention", window=0))
