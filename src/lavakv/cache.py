"""The compressed KV cache: per layer and KV head, only the kept entries, really stored.

Storage per layer: the kept prompt entries of every (sample, KV head) packed back to back in one
``[entries, head_dim]`` tensor for keys and one for values (no padding, so the bytes held are the
bytes kept), plus the tokens appended while decoding, which every head receives, in a dense
``[batch, kv_heads, steps, head_dim]`` tensor. A decode step gathers each head's entries into a
temporary padded view and attends exactly over them, with padding masked out.

The cache reports the original sequence length to transformers, so RoPE positions and masks
continue from the uncompressed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .attention import active_update, prepare_model
from .compression import PhaseClock, SequenceCompression, resolve_budget
from .methods import Method, resolve_method

NOT_SUPPORTED = "lavakv's CompressedCache does not support {what}; use greedy or sampling with one sequence per prompt"


class CompressedLayer(CacheLayerMixin):
    """One layer of a :class:`CompressedCache`: packed kept prompt entries plus appended decode tokens."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: CompressedCache, layer_idx: int, sliding_window: int | None):
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.reset()

    def reset(self) -> None:
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self.prefix_positions: torch.Tensor | None = None
        self.gather_index: torch.Tensor | None = None
        self.prefix_mask: torch.Tensor | None = None
        self.gather_positions: torch.Tensor | None = None
        self.longest = 0
        self.appended_keys: torch.Tensor | None = None
        self.appended_values: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.prompt_length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.prefix_keys is None:
            return key_states, value_states
        if self.appended_keys is None:
            self.appended_keys, self.appended_values = key_states, value_states
        else:
            self.appended_keys = torch.cat([self.appended_keys, key_states], dim=-2)
            self.appended_values = torch.cat([self.appended_values, value_states], dim=-2)
        return key_states, value_states

    @property
    def appended(self) -> int:
        return 0 if self.appended_keys is None else self.appended_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prompt_length + self.appended

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def pack(self, per_sample: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]], padding: list[int]) -> None:
        """Store each (sample, head)'s kept ``(positions, keys, values)`` packed, and how to read them back.

        When every head kept the same number of entries the packed tensors already are a dense
        ``[B, H_kv, n, d]`` layout and decode reads them as a view; otherwise a flat gather index
        and a validity mask give each head a padded row.
        """
        batch, kv_heads = len(per_sample), len(per_sample[0])
        counts = torch.tensor([[len(p) for p, _, _ in heads] for heads in per_sample], dtype=torch.long)
        self.prefix_positions = torch.cat([p + pad for heads, pad in zip(per_sample, padding) for p, _, _ in heads]).to(
            torch.int32
        )
        self.prefix_keys = torch.cat([k for heads in per_sample for _, k, _ in heads])
        self.prefix_values = torch.cat([v for heads in per_sample for _, _, v in heads])
        device = self.prefix_keys.device
        self.counts = counts
        self.longest = int(counts.max())
        if bool((counts == self.longest).all()):
            self.gather_index = self.prefix_mask = None
            slot_positions = self.prefix_positions.view(batch, kv_heads, self.longest)
        else:
            starts = (counts.reshape(-1).cumsum(0) - counts.reshape(-1)).reshape(batch, kv_heads)
            offsets = torch.arange(self.longest)
            valid = offsets[None, None, :] < counts[:, :, None]
            index = torch.where(valid, starts[:, :, None] + offsets, torch.zeros((), dtype=torch.long))
            self.gather_index = index.reshape(-1).to(device)
            self.prefix_mask = valid[:, :, None, :].to(device)
            slot_positions = self.prefix_positions[self.gather_index].view(batch, kv_heads, self.longest)
        self.gather_positions = slot_positions if self.sliding_window else None
        self.prompt_length = self.owner.prompt_length

    def _padded(self, packed: torch.Tensor) -> torch.Tensor:
        """``[B, H_kv, longest, d]`` rows of the packed prefix (a view when no head is padded)."""
        batch, kv_heads = self.counts.shape
        if self.gather_index is not None:
            packed = packed.index_select(0, self.gather_index)
        return packed.view(batch, kv_heads, self.longest, packed.shape[-1])

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        """Exact attention of ``query[B, H, q, d]`` over each head's kept entries; returns ``[B, q, H, d]``."""
        batch, heads, q_len, dim = query.shape
        kv_heads = self.counts.shape[1]
        group = heads // kv_heads
        keys, values = self._padded(self.prefix_keys), self._padded(self.prefix_values)
        if self.appended_keys is not None:
            keys = torch.cat([keys, self.appended_keys], dim=2)
            values = torch.cat([values, self.appended_values], dim=2)
        mask = self._mask(q_len, group, sliding_window)
        grouped = query.reshape(batch, kv_heads, group * q_len, dim)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def _mask(self, q_len: int, group: int, sliding_window: int | None) -> torch.Tensor | None:
        """Visibility for the grouped query ``[B, H_kv, group * q, entries]`` (or broadcastable), ``None`` if all."""
        steps = self.appended
        batch, kv_heads = self.counts.shape
        if q_len == 1 and not sliding_window:
            if self.prefix_mask is None:
                return None
            appended = self.prefix_mask.new_ones(batch, kv_heads, 1, steps)
            return torch.cat([self.prefix_mask, appended], dim=-1)
        device = self.prefix_keys.device
        prefix = torch.ones(batch, kv_heads, q_len, self.longest, dtype=torch.bool, device=device)
        if self.prefix_mask is not None:
            prefix &= self.prefix_mask
        step_index = torch.arange(steps, device=device)
        query_step = torch.arange(steps - q_len, steps, device=device)
        appended = (step_index[None, :] <= query_step[:, None]).expand(batch, kv_heads, -1, -1)
        if sliding_window:
            query_position = self.prompt_length + query_step
            distance = query_position[None, None, :, None] - self.gather_positions[:, :, None, :].long()
            prefix &= distance < sliding_window
            appended = appended & ((query_step[:, None] - step_index[None, :]) < sliding_window)
        mask = torch.cat([prefix, appended], dim=-1)
        return mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * q_len, -1)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the key/value tensors held, bytes of the index tensors held)."""
        kv = sum(
            t.nbytes
            for t in (self.prefix_keys, self.prefix_values, self.appended_keys, self.appended_values)
            if t is not None
        )
        index = sum(
            t.nbytes for t in (self.prefix_positions, self.gather_index, self.prefix_mask, self.counts) if t is not None
        )
        if self.gather_index is not None and self.gather_positions is not None:
            index += self.gather_positions.nbytes
        return kv, index

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="beam search"))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="cropping (assisted or speculative decoding)"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError(NOT_SUPPORTED.format(what="num_return_sequences > 1 or beam search"))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError(NOT_SUPPORTED.format(what="batch selection (contrastive search)"))


@dataclass
class SequenceStats:
    """What compression did to one sequence of the batch."""

    prompt_length: int
    budget: int
    window: int
    kept_positions: list[list[list[int]]]
    head_budgets: list[list[int]]
    layer_budgets: list[float]
    kept_entries: int
    full_entries: int


class CompressedCache(Cache):
    """A transformers ``Cache`` that compresses the prompt during prefill with a lavakv method.

    >>> cache = CompressedCache(model, method="lava", budget=128)
    >>> model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

    ``budget`` is the average number of prompt tokens kept per KV head per layer, window
    included; ``ratio`` gives it as a fraction of each prompt instead. Passing a model (not
    only its config) switches it to lavakv's attention function, which is plain ``sdpa``
    whenever no lavakv cache is in use. ``progressive`` (default: on for dynamic layer budgets)
    compresses layer by layer during the prefill so that peak memory stays bounded.
    ``score_memo`` (a dict shared by caches derived from one :class:`~lavakv.recording.PrefillRecord`)
    lets them compute each layer's scores once per score configuration.
    """

    def __init__(
        self,
        model_or_config,
        method: str | Method = "lava",
        budget: int | None = None,
        ratio: float | None = None,
        progressive: bool | None = None,
        score_memo: dict | None = None,
        **options,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        if hasattr(model_or_config, "config"):
            prepare_model(model_or_config)
        config = config.get_text_config()
        self.method = resolve_method(method, **options)
        self.budget, self.ratio = check_budget(self.method, budget, ratio)
        self.progressive = self.method.progressive if progressive is None else bool(progressive)
        self.num_layers = config.num_hidden_layers
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        self.sliding_windows = [kwargs.get("sliding_window") for kwargs in layer_kwargs]
        super().__init__(
            layers=[CompressedLayer(self, index, window) for index, window in enumerate(self.sliding_windows)]
        )
        self.sequences: list[SequenceCompression] | None = None
        self.padding: list[int] = []
        self.prompt_length = 0
        self.peak_prefill_bytes = 0
        self.score_memo = score_memo
        self.clock = PhaseClock()
        self._prefilling: int | None = None

    # transformers' side

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        active = active_update.get()
        if (active is not None and active[0] is self) or self._prefilling is not None:
            active_update.set(None)
            self._prefilling = None
            raise RuntimeError(
                "the model's attention does not go through lavakv: call lavakv.prepare_model(model) "
                "(or build the cache from the model, not its config) before generating"
            )
        layer = self.layers[layer_idx]
        if layer.prefix_keys is None:
            if layer_idx == 0 and self.sequences is not None:
                raise RuntimeError("this CompressedCache already holds a prompt being compressed; use a new cache")
            self._prefilling = layer_idx
        active_update.set((self, layer_idx))
        return layer.update(key_states, value_states)

    @property
    def batch_size(self) -> int:
        layer = self.layers[0]
        return -1 if layer.counts is None else layer.counts.shape[0]

    # lavakv's side, called by the attention function

    def is_prefilling(self, layer_idx: int) -> bool:
        return self._prefilling == layer_idx

    def compress_layer(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Hand one layer's prefill to each sequence's compression and store what is final."""
        self._prefilling = None
        with self.clock.phase("total"):
            self._compress_layer(layer_idx, query, key, value, attention_mask, scaling)

    def _compress_layer(self, layer_idx, query, key, value, attention_mask, scaling) -> None:
        batch, _, length, _ = key.shape
        if layer_idx == 0:
            self._start(batch, length, attention_mask)
        window = self.sliding_windows[layer_idx]
        visible_from = max(0, length - window) if window else 0
        for sample, sequence in enumerate(self.sequences):
            start = max(self.padding[sample], visible_from)
            sequence.add_layer(
                layer_idx, query[sample, :, start:], key[sample, :, start:], value[sample, :, start:], scaling
            )
        held = self.kv_bytes() + sum(s.nbytes for s in self.sequences) + key.nbytes + value.nbytes
        self.peak_prefill_bytes = max(self.peak_prefill_bytes, held)
        for index in range(layer_idx + 1):
            if self.layers[index].prefix_keys is None and all(s.is_final(index) for s in self.sequences):
                self._pack(index)

    def _start(self, batch: int, length: int, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is None:
            lengths = [length] * batch
        else:
            valid = (
                attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
                if attention_mask.dtype == torch.bool
                else (attention_mask[:, 0].diagonal(dim1=-2, dim2=-1) > torch.finfo(attention_mask.dtype).min / 2)
            )
            lengths = valid.sum(dim=-1).tolist()
        self.prompt_length = length
        self.padding = [length - n for n in lengths]
        self.sequences = []
        for n in lengths:
            if n < 1:
                raise ValueError("a prompt of the batch has no tokens")
            visible = [min(n, window) if window else n for window in self.sliding_windows]
            self.sequences.append(
                SequenceCompression(
                    self.method,
                    n,
                    resolve_budget(n, self.budget, self.ratio),
                    visible,
                    self.progressive,
                    None if self.score_memo is None else self.score_memo.setdefault(len(self.sequences), {}),
                    self.clock,
                )
            )

    def _pack(self, layer_idx: int) -> None:
        per_sample = [sequence.release(layer_idx) for sequence in self.sequences]
        self.layers[layer_idx].pack(per_sample, self.padding)

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        layer = self.layers[layer_idx]
        if layer.prefix_keys is None:
            raise RuntimeError(f"layer {layer_idx} has no compressed prompt; the prefill did not reach it")
        return layer.attend(query, scaling, sliding_window)

    # reporting

    def kv_bytes(self) -> int:
        """Bytes of the key and value tensors the cache holds now."""
        return sum(layer.nbytes()[0] for layer in self.layers)

    def index_bytes(self) -> int:
        """Bytes of the bookkeeping tensors (positions, gather index) the cache holds now."""
        return sum(layer.nbytes()[1] for layer in self.layers)

    def kept_entries(self) -> int:
        """Prompt entries kept, summed over layers, KV heads and samples."""
        return sum(int(layer.counts.sum()) for layer in self.layers if layer.counts is not None)

    def full_entries(self) -> int:
        """Prompt entries an uncompressed cache would hold (a sliding-window layer holds only its window)."""
        if self.sequences is None:
            raise RuntimeError("nothing has been prefilled into this cache yet")
        kv_heads = self.layers[0].counts.shape[1]
        return sum(sum(sequence.visible_lengths) for sequence in self.sequences) * kv_heads

    def sequence_stats(self) -> list[SequenceStats]:
        """Per sample: kept positions per layer and head, head and layer budgets, entry counts."""
        if self.sequences is None:
            raise RuntimeError("nothing has been prefilled into this cache yet")
        stats = []
        for sample, sequence in enumerate(self.sequences):
            kept, head_budgets = [], []
            for layer in self.layers:
                start = int(layer.counts[:sample].sum())
                positions = []
                for count in layer.counts[sample].tolist():
                    chunk = layer.prefix_positions[start : start + count] - self.padding[sample]
                    positions.append(chunk.tolist())
                    start += count
                kept.append(positions)
                head_budgets.append(layer.counts[sample].tolist())
            kept_entries = sum(sum(heads) for heads in head_budgets)
            kv_heads = len(head_budgets[0])
            stats.append(
                SequenceStats(
                    prompt_length=sequence.length,
                    budget=min(sequence.budget, sequence.length),
                    window=sequence.window,
                    kept_positions=kept,
                    head_budgets=head_budgets,
                    layer_budgets=[sum(heads) / kv_heads for heads in head_budgets],
                    kept_entries=kept_entries,
                    full_entries=sum(sequence.visible_lengths) * kv_heads,
                )
            )
        return stats


def check_budget(method: Method, budget: int | None, ratio: float | None) -> tuple[int | None, float | None]:
    """Validate ``budget`` / ``ratio`` for ``method``; exactly one is needed unless the method is ``full``."""
    if not method.compresses:
        return budget, ratio
    if budget is not None and ratio is not None:
        raise ValueError(f"give either budget or ratio, not both (got budget={budget}, ratio={ratio})")
    if budget is None and ratio is None:
        raise ValueError(f"method {method.name!r} needs a budget (tokens per KV head per layer) or a ratio in (0, 1]")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise ValueError(f"budget must be an integer number of tokens per KV head per layer, got {budget!r}")
        if budget <= 0 or budget <= method.window:
            raise ValueError(
                f"budget must be greater than the window ({method.window}) and than 0, got {budget}; "
                f"the budget counts the window's tokens too"
            )
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return budget, ratio
