"""Prefill once, compress many ways: a recorded full prefill from which compressed caches are derived.

Compression never changes the prefill itself (every layer attends over the full prompt, then the
cache keeps a subset), so the queries, keys and values each layer produces are the same whichever
method runs. :class:`PrefillRecord` runs the prefill once with a recording cache, which speaks
lavakv's cache protocol (:class:`lavakv.attention.CompressingCache`) but stores each layer's
tensors instead of compressing them, and replays them into a fresh
:class:`~lavakv.cache.CompressedCache` for each ``(method, budget)``: the result is the cache that
prefilling with that method would have built, at the cost of the scoring alone.
"""

from __future__ import annotations

import time
import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .attention import hand_off, model_forward, prepare_model
from .cache import CacheConfig, CompressedCache
from .methods import Budget, Method


class _RecordingLayer(CacheLayerMixin):
    """A layer that holds nothing: the prompt passes through to attention, and is recorded there."""

    is_sliding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self) -> int:
        return -1


class _RecordingCache(Cache):
    """A prefill-only cache whose layers' queries, keys and values are recorded by the attention hook."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[_RecordingLayer() for _ in range(num_layers)])
        self.recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        self.prefill_mask: torch.Tensor | None = None
        self._prefilling: int | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if len(self.recorded) != layer_idx:
            raise RuntimeError("a recording cache holds one prefill; record the next prompt with a new PrefillRecord")
        self._prefilling = layer_idx
        return hand_off(self, layer_idx, *self.layers[layer_idx].update(key_states, value_states))

    def is_prefilling(self, layer_idx: int) -> bool:
        return self._prefilling == layer_idx

    def compress_layer(self, layer_idx, query, key, value, attention_mask, scaling, weights=None) -> None:
        self._prefilling = None
        if layer_idx == 0:
            self.prefill_mask = attention_mask
        self.recorded.append((query, key, value, scaling, weights))

    def attend(self, layer_idx, query, scaling, sliding_window) -> torch.Tensor:
        raise RuntimeError("a recording cache only records a prefill; decode through a cache from record.compress()")


RECONSTRUCTION_PROMPT = "\n\nRepeat the previous context exactly.\n"
"""What the model is asked before it reads the prompt again, in a reconstruction pass (KVzip's wording)."""


class _PassCache(DynamicCache):
    """The recorded prompt's keys and values, followed by a scoring pass whose queries and keys are recorded."""

    def __init__(self, layers: list):
        super().__init__()
        for layer_idx, (_, key, value, _, _) in enumerate(layers):
            super().update(key, value, layer_idx)
        self.prompt_length = layers[0][1].shape[2]
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._prefilling: int | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._prefilling = layer_idx
        return hand_off(self, layer_idx, *super().update(key_states, value_states, layer_idx, *args, **kwargs))

    def is_prefilling(self, layer_idx: int) -> bool:
        return self._prefilling == layer_idx

    def compress_layer(self, layer_idx, query, key, value, attention_mask, scaling, weights=None) -> None:
        self._prefilling = None
        self.recorded.append((query, key[:, :, self.prompt_length :]))

    def attend(self, layer_idx, query, scaling, sliding_window) -> torch.Tensor:
        raise RuntimeError("a scoring pass is one forward pass over the recorded prompt")


class PrefillRecord:
    """The full prefill of a batch of prompts, kept so that many compressed caches can come from it.

    >>> record = PrefillRecord(model, input_ids)
    >>> cache = record.compress("lava", budget=128)     # as if prefilled with CompressedCache(model, "lava", 128)

    ``logits`` are the last position's logits (the first generated token is the same for every
    method in the query-aware protocol). Memory: every layer's queries, keys and values of the
    prompt, so this suits evaluation, not serving.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        prepare_model(model)
        self.config = model.config
        num_layers = model.config.get_text_config().num_hidden_layers
        recording = _RecordingCache(num_layers)
        positions = None
        if attention_mask is not None and bool((attention_mask == 0).any()):
            positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model_forward(
                model,
                recording,
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                logits_to_keep=1,
            )
        self.seconds = time.perf_counter() - start
        if len(recording.recorded) != num_layers:
            raise RuntimeError(
                f"recorded {len(recording.recorded)} of {num_layers} layers: the model's attention does not go "
                "through lavakv"
            )
        self.logits = output.logits[:, -1]
        self.layers = recording.recorded
        self.attention_mask = recording.prefill_mask
        self.prompt_length = input_ids.shape[1]
        self.input_ids = input_ids
        self.input_mask = attention_mask
        self._model = weakref.ref(model)
        self.score_memo: dict = {}
        self.scoring_pass: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.scoring_pass_seconds = 0.0

    def reconstruct(self, tokenizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The reconstruction pass (once per record): the model reads the prompt again after being asked to repeat it.

        One forward pass of :data:`RECONSTRUCTION_PROMPT` followed by the prompt's own ids, over the
        recorded keys and values, at the positions after the prompt; each layer's queries and keys
        of those tokens are kept (``[1, H, r, d]``, ``[1, H_kv, r, d]``) for scores that read a
        scoring pass (KVzip). Its time is :attr:`scoring_pass_seconds`.
        """
        if self.scoring_pass is not None:
            return self.scoring_pass
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this record is gone; a reconstruction pass needs it")
        if self.input_ids.shape[0] != 1 or self.input_mask is not None:
            raise ValueError("a reconstruction pass reads one unpadded prompt; record prompts one at a time for it")
        text = model.config.get_text_config()
        if any(kind != "full_attention" for kind in getattr(text, "layer_types", None) or []):
            raise ValueError(
                "a reconstruction pass needs every layer to attend to the whole prompt (no sliding windows)"
            )
        prompt = tokenizer(RECONSTRUCTION_PROMPT, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([list(prompt) + self.input_ids[0].tolist()], device=self.input_ids.device)
        cache = _PassCache(self.layers)
        positions = torch.arange(self.prompt_length, self.prompt_length + ids.shape[1], device=ids.device)[None]
        start = time.perf_counter()
        with torch.inference_mode():
            model_forward(model, cache, input_ids=ids, position_ids=positions, logits_to_keep=1)
        self.scoring_pass_seconds = time.perf_counter() - start
        self.scoring_pass = cache.recorded
        return self.scoring_pass

    def compress(
        self,
        method: str | Method,
        budget: int | Budget | None = None,
        ratio: float | None = None,
        progressive: bool = False,
        reuse_scores: bool = True,
        decode_budget: int | None = None,
        decode_interval: int | None = None,
        attention_path: str = "auto",
        **options,
    ) -> CompressedCache:
        """A new cache holding what ``method`` keeps of the recorded prompt, ready for decoding.

        ``progressive`` replays the layer-by-layer selection a compressing prefill makes (same
        result, more work for dynamic layer budgets); ``reuse_scores=False`` computes every score
        anew, so that the cache's clock shows the full cost of compression. ``decode_budget`` and
        ``decode_interval`` bound the cache while decoding and ``attention_path`` picks its decode
        attention (see :class:`~lavakv.CompressedCache`).
        """
        model = self._model()
        settings = CacheConfig.build(
            method, budget, ratio, progressive, decode_budget, decode_interval, attention_path, **options
        )
        passes = [None] * len(self.layers)
        if settings.method.needs_scoring_pass:
            if self.scoring_pass is None:
                raise ValueError(
                    f"method {settings.method.spec!r} scores from a reconstruction pass: call "
                    "record.reconstruct(tokenizer) before record.compress"
                )
            passes = self.scoring_pass
        memo = self.score_memo if reuse_scores else None
        cache = CompressedCache(self.config if model is None else model, score_memo=memo, settings=settings)
        cache.observe_inputs(self.input_ids, self.input_mask)
        with torch.inference_mode():
            for layer_idx, (query, key, value, scaling, weights) in enumerate(self.layers):
                cache.compress_layer(
                    layer_idx, query, key, value, self.attention_mask, scaling, weights, passes[layer_idx]
                )
        if settings.method.needs_scoring_pass:
            cache.clock.seconds["pass"] = self.scoring_pass_seconds
        return cache
