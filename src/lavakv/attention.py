"""The ``lavakv`` attention function, registered in transformers' attention-function registry.

A model whose attention implementation is ``"lavakv"`` behaves exactly like ``"sdpa"`` unless a
:class:`~lavakv.cache.CompressedCache` is in use. With one, the prefill runs ordinary attention over
the full prompt and then hands the layer's queries, keys and values to the cache, which compresses
them; decode steps attend exactly over the entries each head kept.

The cache tells this function which layer it just updated through a context variable set in
``CompressedCache.update``: transformers calls ``update`` and then the attention function, back to
back, for the same layer.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

if TYPE_CHECKING:
    from .cache import CompressedCache

ATTENTION_NAME = "lavakv"

active_update: ContextVar[tuple[CompressedCache, int] | None] = ContextVar("lavakv_active_update", default=None)


def lavakv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for one layer: ``sdpa`` for plain caches, prefill + compression or ragged decode for lavakv's."""
    update = active_update.get()
    layer_idx = getattr(module, "layer_idx", None)
    if update is None or update[1] != layer_idx:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    active_update.set(None)
    cache = update[0]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if cache.is_prefilling(layer_idx):
        output = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        cache.compress_layer(layer_idx, query, key, value, attention_mask, scaling)
        return output
    return cache.attend(layer_idx, query, scaling, kwargs.get("sliding_window")), None


def register_attention() -> None:
    """Register ``"lavakv"`` with transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, lavakv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prepare_model(model):
    """Switch ``model`` to lavakv's attention function (exactly ``sdpa`` unless a lavakv cache is used)."""
    from .models import check_supported

    check_supported(model)
    register_attention()
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return model
