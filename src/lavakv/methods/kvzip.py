"""KVzip: keep the entries the model needs to reconstruct its context, whatever the question will be.

Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction"
(arXiv 2505.23416). After the prompt is prefilled, the model is asked to repeat it and reads it
again (teacher-forced, one extra forward pass over the prompt's length); an entry's importance is
the largest attention any of those reconstruction queries, or any query head of its group, pays
it, the softmax taken over the prompt's keys and the reconstruction tokens seen so far. Entries
the model consults to reproduce its context are the ones any later question can need, so one
compression serves every question. The first ``n_sink`` positions are always kept.

The ranking is global, as the paper's non-layer-wise KVzip: every (layer, head, entry) competes
(``ada`` heads with ``alpha=0``, ``global`` layers), with no observation window. The pass is
:meth:`lavakv.recording.PrefillRecord.reconstruct`: the prompt is read once more in full where the
authors read it in 2,048-token chunks, each scored over the sinks, its own chunk and its own
repetition; the two are the same for prompts up to 2,048 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .method import Method, register_preset
from .registry import LayerInput, Score, attention_probabilities, register_score

QUERY_CHUNK = 256
"""Reconstruction queries scored at once (their attention rows are ``H x chunk x (n + r)`` floats)."""


@register_score("kvzip")
@dataclass(frozen=True)
class KVzipScore(Score):
    """The largest attention from the reconstruction pass's queries (and the group's heads) to each prefix entry."""

    rows_independent: ClassVar[bool] = True
    needs_window: ClassVar[bool] = False
    scoring_pass: ClassVar[str | None] = "reconstruction"
    n_sink: int = 4

    def __post_init__(self) -> None:
        self.check_int("n_sink", minimum=0)

    def __call__(self, layer: LayerInput) -> torch.Tensor:
        if layer.pass_query is None or layer.pass_key is None:
            raise ValueError("the kvzip score reads a reconstruction pass, and none was handed over")
        keys = torch.cat([layer.key, layer.pass_key.to(layer.key.dtype)], dim=1)
        prefix = None
        for first in range(0, layer.pass_query.shape[1], QUERY_CHUNK):
            queries = layer.pass_query[:, first : first + QUERY_CHUNK]
            attention = attention_probabilities(queries, keys, layer.scaling, first_query_position=layer.length + first)
            chunk = attention[:, :, : layer.prefix_length].amax(dim=1)
            prefix = chunk if prefix is None else torch.maximum(prefix, chunk)
        scores = prefix.view(layer.num_kv_heads, -1, layer.prefix_length).amax(dim=1)
        sinks = max(0, min(layer.prefix_length, self.n_sink - layer.first_position))
        if sinks:
            scores[:, :sinks] = 1.0
        return scores


register_preset("kvzip", Method(score="kvzip", heads="ada", layers="global", alpha=0.0, window=0))
