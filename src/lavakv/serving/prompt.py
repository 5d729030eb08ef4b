"""One request's prompt compressed by lavakv's own selection, layer by layer, as a serving engine's forward passes it.

The engine hands each layer's prompt queries, keys and values (after RoPE, as its attention
receives them); :class:`PromptCompression` runs the same :class:`~lavakv.selection.GroupCompression`
that :class:`~lavakv.CompressedCache` runs in transformers, so a served request keeps the entries
the transformers path keeps.
"""

from __future__ import annotations

import torch

from ..methods import Budget
from ..selection import GroupCompression
from .requests import RequestCompression


class PromptCompression:
    """The kept entries of one prompt of ``prompt_length`` tokens over ``num_layers`` full-attention layers."""

    def __init__(self, compression: RequestCompression, prompt_length: int, num_layers: int):
        method = compression.method
        if not compression.compresses:
            raise ValueError(f"method {compression.spec!r} keeps every entry: there is nothing to compress")
        self.check_servable(compression)
        budget = Budget(tokens=compression.budget)
        tokens = budget.tokens_for(prompt_length)
        window = budget.window_for(method.window, tokens)
        self.num_layers = num_layers
        self.group = GroupCompression(
            method, prompt_length, tokens, [prompt_length] * num_layers, method.progressive, window=window
        )

    @staticmethod
    def check_servable(compression: RequestCompression) -> None:
        """Refuse, naming it, a method whose scores need what an engine's attention does not hand over."""
        method = compression.method
        if method.score.needs_layer_weights or method.needs_scoring_pass:
            raise ValueError(
                f"method {compression.spec!r} reads the layer's weights or a scoring pass, which serving "
                "does not hand over yet; valid: methods scored from queries, keys and values (lava, snapkv, ...)"
            )
        if method.reads_profile:
            raise ValueError(
                f"method {compression.spec!r} reads a per-head profile, which serving does not check against the "
                "served model yet; valid: methods without a profile (lava, snapkv, ...)"
            )

    def add_layer(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
    ) -> None:
        """Score ``layer`` from its prompt ``query [P, H, d]``, ``key`` and ``value`` ``[P, H_kv, d]``."""
        self.group.add_layer(
            layer,
            query.transpose(0, 1)[None],
            key.transpose(0, 1)[None],
            value.transpose(0, 1)[None],
            scaling,
        )

    def is_final(self, layer: int) -> bool:
        """Whether ``layer``'s kept entries are decided (dynamic layer budgets decide after the last layer)."""
        return self.group.is_final(layer)

    def kept(self, layer: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(positions per KV head, keys [N, d], values [N, d])`` of a final layer, heads in order."""
        positions, keys, values, lengths = self.group.release(layer)
        return list(positions.split(lengths[0].tolist())), keys, values
