"""The transformers glue: lavakv's attention function, the cache protocol it speaks, and model calls.

This is the one module that knows transformers' attention and calling conventions; it imports no
other lavakv module.

**The attention function.** :func:`prepare_model` registers ``"lavakv"`` in transformers'
attention-function registry (``AttentionInterface``, with the matching mask function in
``AttentionMaskInterface``) and switches the model to it. It wraps the model's own
implementation: ``sdpa`` becomes ``"lavakv"``, ``eager`` becomes ``"lavakv_eager"``. Whenever no
lavakv cache is in use, every call goes straight to that original implementation, with its own
masks: the prepared model computes exactly what it did before. Flash attention cannot be wrapped:
transformers resolves its kernels from the implementation's registered name, so under any other
name than ``flash_attention_*`` it looks for a Hub kernel of that name and fails; a flash model is
refused with a clear error instead of silently becoming something else.

**The cache protocol** (:class:`CompressingCache`). Transformers calls a layer's
``cache.update(key, value, layer_idx)`` and then the attention function with the keys and values
``update`` returned, back to back. A lavakv cache's ``update`` ends with
``return hand_off(self, layer_idx, keys, values)``, which says "the attention call that receives
these keys is mine"; the attention function picks that up from a context variable (matching the
key tensor itself, so a hand-off left over by a failed call can never be taken by another) and then:

1. asks ``cache.is_prefilling(layer_idx)``; if so, it runs the original attention over the full
   prompt (compression never changes the prefill) and hands the layer's queries, keys, values,
   mask and scaling to ``cache.compress_layer(...)``;
2. otherwise (decoding), it returns ``cache.attend(layer_idx, query, scaling, sliding_window)``:
   exact attention over the entries each head kept, computed by the cache.

A cache whose hand-off is never picked up (the model does not use lavakv's attention) gets a
clear error at its next update.

**Inputs.** A cache may also define ``observe_inputs(input_ids, attention_mask, position_ids)``:
:func:`prepare_model` registers a forward pre-hook on the model (torch's own extension point,
on this model only) that calls it before every forward pass given that cache (as ``cache=`` or
the older ``past_key_values=``), so the cache knows the token ids it holds and can refuse inputs
that do not continue them. ``model.generate`` hands the model only the tokens a cache does not
hold yet, so :func:`prepare_model` also wraps this model's ``prepare_inputs_for_generation``
(which sees the whole history) to call the cache's ``check_history(input_ids)`` once per
``generate`` call.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "lavakv"
WRAPPED_ATTENTIONS = ("sdpa", "eager")
"""The implementations lavakv can wrap (see the module docstring for flash attention)."""
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
NOT_PREPARED = (
    "the model's attention does not go through lavakv: call lavakv.prepare_model(model) "
    "(or build the cache from the model, not its config) before generating"
)


@runtime_checkable
class CompressingCache(Protocol):
    """What lavakv's attention function asks of a cache that has called :func:`hand_off`."""

    def is_prefilling(self, layer_idx: int) -> bool:
        """Whether this call is the layer's prefill (then ``compress_layer`` follows), not a decode step."""
        ...

    def compress_layer(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        weights: LayerParts | None = None,
    ) -> None:
        """Take the layer's prefill: ``query [B, H, n, d]``, ``key``/``value [B, H_kv, n, d]`` after RoPE.

        ``weights`` is what scores may read of the layer itself (see :func:`layer_weights`).
        """
        ...

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """Decode-step attention of ``query [B, H, q, d]`` over the layer's cache; returns ``[B, q, H, d]``."""
        ...


_hand_off: ContextVar[tuple[CompressingCache, int, torch.Tensor] | None] = ContextVar("lavakv_hand_off", default=None)


def hand_off(
    cache: CompressingCache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of a lavakv cache's ``update``: the attention call receiving ``keys`` belongs to ``cache``.

    Returns ``(keys, values)`` for ``update`` to return. An earlier hand-off of the same cache
    that no attention call picked up means the model does not run lavakv's attention: that is an
    error, raised here.
    """
    pending = _hand_off.get()
    if pending is not None and pending[0] is cache:
        _hand_off.set(None)
        raise RuntimeError(NOT_PREPARED)
    _hand_off.set((cache, layer_idx, keys))
    return keys, values


def attention_name(original: str) -> str:
    """The registered name of lavakv's attention over the ``original`` implementation."""
    return ATTENTION_NAME if original == "sdpa" else f"{ATTENTION_NAME}_{original}"


def original_attention(name: str | None) -> str | None:
    """The implementation a lavakv attention name wraps (``None`` if ``name`` is not lavakv's)."""
    for original in WRAPPED_ATTENTIONS:
        if name == attention_name(original):
            return original
    return None


def _original_function(module: torch.nn.Module) -> Callable:
    original = original_attention(module.config._attn_implementation) or "sdpa"
    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def lavakv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's attention: the original implementation, plus compression or ragged decode for lavakv caches."""
    original = _original_function(module)
    pending = _hand_off.get()
    layer_idx = getattr(module, "layer_idx", None)
    if pending is None or pending[1] != layer_idx or pending[2] is not key:
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _hand_off.set(None)
    cache = pending[0]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if cache.is_prefilling(layer_idx):
        output = original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        cache.compress_layer(layer_idx, query, key, value, attention_mask, scaling, layer_weights(module))
        return output
    return cache.attend(layer_idx, query, scaling, kwargs.get("sliding_window")), None


_ROTARY_OF_LAYER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Each prepared attention module's ``positions -> (cos, sin)``, read from its model's rotary embedding."""


LayerParts = tuple[torch.Tensor | None, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None]
"""``(output projection weight [hidden, H * d], positions -> (cos, sin))``, either ``None`` where absent."""


def layer_weights(module: torch.nn.Module) -> LayerParts:
    """The layer's output projection weight and rotary embedding, as a plain tensor and a function."""
    projection = getattr(module, "o_proj", None)
    output = projection.weight if isinstance(getattr(projection, "weight", None), torch.Tensor) else None
    return output, _ROTARY_OF_LAYER.get(module)


def _record_rotary(model) -> None:
    """Map every attention module of ``model`` to its rotary embedding (the layer type's, where it has one)."""
    rotary = next(
        (m.rotary_emb for m in model.modules() if isinstance(getattr(m, "rotary_emb", None), torch.nn.Module)), None
    )
    if rotary is None:
        return
    takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
    layer_types = getattr(model.config.get_text_config(), "layer_types", None)
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None or not hasattr(module, "o_proj"):
            continue
        layer_type = layer_types[layer_idx] if takes_layer_type and layer_types else None
        _ROTARY_OF_LAYER[module] = functools.partial(_cos_sin, rotary, layer_type)


def _cos_sin(
    rotary: torch.nn.Module, layer_type: str | None, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    probe = torch.empty(0, dtype=torch.float32, device=positions.device)
    extra = () if layer_type is None else (layer_type,)
    cos, sin = rotary(probe, positions[None].long(), *extra)
    return cos[0].float(), sin[0].float()


def register_attention() -> None:
    """Register lavakv's attention over every wrappable implementation, with that implementation's masks."""
    for original in WRAPPED_ATTENTIONS:
        name = attention_name(original)
        AttentionInterface.register(name, lavakv_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def check_supported(model_or_config) -> None:
    """Raise a clear error for architectures lavakv's attention has not been validated on."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"lavakv does not support model type {model_type!r}; supported types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"model type {model_type!r} with attention logit soft-capping is not supported by lavakv's attention"
        )


def prepare_model(model):
    """Switch ``model`` to lavakv's attention, which wraps the model's own implementation (see the module docs).

    Idempotent. An implementation lavakv cannot wrap (``flex_attention``, paged attention) is a
    clear error naming the ones it can.
    """
    check_supported(model)
    register_attention()
    current = model.config._attn_implementation
    if original_attention(current) is not None:
        return _observe(model)
    if current not in WRAPPED_ATTENTIONS:
        reason = (
            " (transformers finds flash kernels by the implementation's own name, which a wrapper cannot keep)"
            if "flash" in str(current)
            else ""
        )
        raise NotImplementedError(
            f"lavakv cannot wrap the attention implementation {current!r}{reason}; load the model with "
            f"attn_implementation set to one of: {', '.join(WRAPPED_ATTENTIONS)}"
        )
    model.set_attn_implementation(attention_name(current))
    return _observe(model)


def _observe(model):
    _record_rotary(model)
    if not getattr(model, "_lavakv_observes_inputs", False):
        model.register_forward_pre_hook(_observe_inputs, with_kwargs=True)
        original = getattr(model, "prepare_inputs_for_generation", None)
        if original is not None:
            model.prepare_inputs_for_generation = _checking_history(original)
        model._lavakv_observes_inputs = True
    return model


def _given_cache(kwargs: dict):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _observe_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Show a forward pass's inputs to the cache it is given, when that cache asks for them."""
    observe = getattr(_given_cache(kwargs), "observe_inputs", None)
    if observe is None:
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    observe(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
    return None


def _checking_history(original: Callable) -> Callable:
    """``prepare_inputs_for_generation`` that first shows a cache the whole history of a new ``generate`` call."""

    @functools.wraps(original)
    def prepare_inputs_for_generation(input_ids, *args, **kwargs):
        check = getattr(_given_cache(kwargs), "check_history", None)
        if check is not None and kwargs.get("is_first_iteration") and isinstance(input_ids, torch.Tensor):
            check(input_ids)
        return original(input_ids, *args, **kwargs)

    return prepare_inputs_for_generation


def prompt_lengths(attention_mask: torch.Tensor | None, batch: int, length: int) -> list[int]:
    """Tokens of each left-padded prompt, read from the prefill's attention mask in any wrapped format.

    ``None`` (no padding), or a 4D boolean (sdpa) or additive float (eager) mask whose diagonal
    says which positions are real.
    """
    if attention_mask is None:
        return [length] * batch
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)[:, -length:]
    valid = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
    return valid.sum(dim=-1).tolist()


@functools.cache
def _forward_cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_argument(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)``.

    transformers 5.20 renamed the forward's ``past_key_values`` to ``cache``; the keyword is read from
    the model's own forward signature, so one call works on either side of the rename.
    """
    return {_forward_cache_keyword(type(model).forward): cache}


def model_forward(model, cache, **inputs):
    """``model(**inputs)`` with ``cache`` under the forward's own cache keyword, and ``use_cache=True``."""
    return model(**inputs, **cache_argument(model, cache), use_cache=True)
