"""Decode attention over a :class:`~lavakv.ragged.RaggedKV`: a registry of backends that own their state.

The storage holds the layout only (packed rows, padded views, the tail); a backend turns it into
exact attention of the decode queries over each row's entries plus the appended tail. Each backend
is built for one storage and keeps what it derives from it (a padding bias, a padded copy, block
masks), so that state never outlives the layout it was computed from, and reports its bytes
(:meth:`AttentionBackend.nbytes`) so that a cache can count them.

* ``"gather"``: SDPA over the rows read as a padded view (a view when every row has the same
  length, one ``index_select`` copy per call otherwise) joined with the tail;
* ``"padded"``: SDPA over a padded copy the backend keeps, with room for the tail, so that a
  decode step writes only the new tokens (holds a copy of the rows);
* ``"flex"``: FlexAttention over the packed entries themselves (no padding) with a block mask
  built once, and the tail merged by log-sum-exp.

:func:`resolve_backend` turns ``"auto"`` into one of them for a device. Torch only.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .ragged import MIN_TAIL_SLOTS, RaggedKV

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[AttentionBackend]] = {}
"""Every registered backend by name, in registration order."""

COMPILE_FLEX = True
"""Whether ``"flex"`` compiles FlexAttention (torch.compile); tests switch it off (exact, slow)."""

_compiled_flex: dict[str, Callable] = {}
_flex_probes: dict[str, BaseException | None] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    """Class decorator: make the backend available as ``name`` (to :func:`create_backend`, ``attention_path=``)."""

    def register(backend: type[AttentionBackend]) -> type[AttentionBackend]:
        if name == "auto" or name in BACKENDS:
            raise ValueError(f"attention backend name {name!r} is reserved or already registered")
        backend.name = name
        BACKENDS[name] = backend
        return backend

    return register


def create_backend(name: str, storage: RaggedKV) -> AttentionBackend:
    """The backend ``name`` (a concrete name, see :func:`resolve_backend`) for ``storage``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    return BACKENDS[name](storage)


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The concrete backend ``requested`` names on ``device``: itself, or for ``"auto"`` the one measured fastest.

    On CPU ``"auto"`` is ``"gather"``: compiled FlexAttention there takes 1.5-2.9x as long per call
    at decode shapes (``benchmarks/ragged_attention.py``) and cannot return the log-sum-exp the tail
    merge needs. On accelerators it is ``"flex"``, which reads the packed entries in place, provided
    a tiny FlexAttention call compiles and runs on that device (tried once per device); if it does
    not, a warning gives the cause and ``"gather"`` runs. An explicit ``"flex"`` is never probed:
    its failure is raised where it happens.
    """
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; valid backends: auto, {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cpu":
        return "gather"
    failure = probe_flex(device)
    if failure is None:
        return "flex"
    logger.warning(
        "FlexAttention does not run on %s (%s: %s); decoding there with 'gather'",
        device,
        type(failure).__name__,
        failure,
        exc_info=failure,
    )
    return "gather"


def probe_flex(device: torch.device) -> BaseException | None:
    """Why FlexAttention (with the log-sum-exp the tail merge needs) fails on ``device``, or ``None``; tried once."""
    key = str(device)
    if key not in _flex_probes:
        try:
            query = torch.zeros(1, 1, 128, 16, device=device)
            flex_kernel(device)(query, query, query, return_aux=AuxRequest(lse=True))
            _flex_probes[key] = None
        except Exception as error:  # noqa: BLE001 - the cause is returned and logged by resolve_backend
            _flex_probes[key] = error
    return _flex_probes[key]


def flex_kernel(device: torch.device) -> Callable:
    """FlexAttention for ``device``: compiled once per device type (recompiled by torch as shapes change)
    unless :data:`COMPILE_FLEX` is off, in which case torch's unfused reference implementation runs.
    """
    if not COMPILE_FLEX:
        return _eager_flex
    if device.type not in _compiled_flex:
        _compiled_flex[device.type] = torch.compile(flex_attention)
    return _compiled_flex[device.type]


def _eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


class AttentionBackend(ABC):
    """Exact decode attention over one storage's rows and tail; state derived from the storage is built lazily."""

    name: str = ""

    def __init__(self, storage: RaggedKV):
        self.storage = storage

    @abstractmethod
    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        """Attention of ``query[batch, heads, q, d]`` (the last ``q`` appended tokens) over every row.

        Query heads are grouped over the KV heads (GQA); returns ``[batch, q, heads, d]``.
        """

    def nbytes(self) -> int:
        """Bytes of the state this backend holds on top of the storage."""
        return 0


class _PaddedSDPA(AttentionBackend):
    """SDPA over ``[batch, kv_heads, longest + steps, d]`` padded rows with the padding masked out."""

    def __init__(self, storage: RaggedKV):
        super().__init__(storage)
        self._padding_bias: torch.Tensor | None = None

    @abstractmethod
    def padded_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, kv_heads, longest + steps, d]``: the rows, padded, then the tail."""

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        storage = self.storage
        batch, heads, q_len, dim = query.shape
        group = heads // storage.kv_heads
        keys, values = self.padded_rows()
        mask = self.mask(q_len, group, sliding_window)
        grouped = query.reshape(batch, storage.kv_heads, group * q_len, dim)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def mask(self, q_len: int, group: int, sliding_window: int | None) -> torch.Tensor | None:
        """Visibility for the grouped query ``[batch, kv_heads, group * q, entries]``; ``None`` when all is visible.

        A single decode token gets an additive mask (0 or -inf, in the keys' dtype, built once),
        which SDPA on CPU runs faster than a boolean one; otherwise a boolean mask.
        """
        storage = self.storage
        steps, batch, kv_heads = storage.steps, storage.batch, storage.kv_heads
        if q_len == 1 and not sliding_window:
            if storage.valid is None:
                return None
            if self._padding_bias is None:
                bias = torch.zeros(storage.valid.shape, dtype=storage.keys.dtype, device=storage.valid.device)
                self._padding_bias = bias.masked_fill(~storage.valid, float("-inf"))
            appended = self._padding_bias.new_zeros(batch, kv_heads, 1, steps)
            return torch.cat([self._padding_bias, appended], dim=-1)
        device = storage.keys.device
        prefix = torch.ones(batch, kv_heads, q_len, storage.longest, dtype=torch.bool, device=device)
        if storage.valid is not None:
            prefix &= storage.valid
        step_index = torch.arange(steps, device=device)
        query_step = torch.arange(steps - q_len, steps, device=device)
        appended = (step_index[None, :] <= query_step[:, None]).expand(batch, kv_heads, -1, -1)
        if sliding_window:
            if storage.slot_positions is None:
                raise RuntimeError("a sliding-window mask needs storage packed with track_positions=True")
            query_position = storage.append_start + query_step
            distance = query_position[None, None, :, None] - storage.slot_positions[:, :, None, :].long()
            prefix &= distance < sliding_window
            appended = appended & ((query_step[:, None] - step_index[None, :]) < sliding_window)
        mask = torch.cat([prefix, appended], dim=-1)
        return mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * q_len, -1)

    def nbytes(self) -> int:
        return 0 if self._padding_bias is None else self._padding_bias.nbytes


@register_backend("gather")
class GatherBackend(_PaddedSDPA):
    """The rows as a padded view (no copy when they are equal in length, one gather otherwise), then the tail."""

    def padded_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        storage = self.storage
        keys, values = storage.padded(storage.keys), storage.padded(storage.values)
        if storage.appended_keys is not None:
            keys = torch.cat([keys, storage.appended_keys], dim=2)
            values = torch.cat([values, storage.appended_values], dim=2)
        return keys, values


@register_backend("padded")
class PaddedBackend(_PaddedSDPA):
    """A padded copy of the rows kept between steps, with room for the tail: a step writes only new tokens.

    Faster than ``"gather"`` for uneven rows (no per-step copy of the rows) at the cost of holding
    the copy, which :meth:`nbytes` counts.
    """

    def __init__(self, storage: RaggedKV):
        super().__init__(storage)
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._written_steps = 0

    def padded_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        storage = self.storage
        steps, longest = storage.steps, storage.longest
        width = longest + steps
        rows = self._rows
        stale = rows is not None and rows[0].is_inference() and not torch.is_inference_mode_enabled()
        if rows is None or rows[0].shape[2] < width or stale:
            room = max(steps, MIN_TAIL_SLOTS, storage.tail_capacity)
            shape = (storage.batch, storage.kv_heads, longest + room, storage.keys.shape[-1])
            rows = (storage.keys.new_empty(shape), storage.values.new_empty(shape))
            rows[0][:, :, :longest] = storage.padded(storage.keys)
            rows[1][:, :, :longest] = storage.padded(storage.values)
            self._rows, self._written_steps = rows, 0
        if self._written_steps < steps:
            done = self._written_steps
            rows[0][:, :, longest + done : width] = storage.appended_keys[:, :, done:]
            rows[1][:, :, longest + done : width] = storage.appended_values[:, :, done:]
            self._written_steps = steps
        return rows[0][:, :, :width], rows[1][:, :, :width]

    def nbytes(self) -> int:
        kept = 0 if self._rows is None else self._rows[0].nbytes + self._rows[1].nbytes
        return super().nbytes() + kept


@register_backend("flex")
class FlexBackend(AttentionBackend):
    """FlexAttention over the packed entries (one block mask per query shape), the tail merged by log-sum-exp."""

    def __init__(self, storage: RaggedKV):
        super().__init__(storage)
        self._block_masks: dict[tuple[int, int], object] = {}

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        storage = self.storage
        batch, heads, q_len, dim = query.shape
        group = heads // storage.kv_heads
        packed_query = query.reshape(1, 1, batch * heads * q_len, dim)
        block_mask = self._block_mask(q_len, group, sliding_window, query.device)
        request = AuxRequest(lse=True) if storage.steps else None
        output = flex_kernel(query.device)(
            packed_query,
            storage.keys[None, None],
            storage.values[None, None],
            block_mask=block_mask,
            scale=scaling,
            return_aux=request,
        )
        if request is not None:
            output, aux = output
        output = output.view(batch, storage.kv_heads, group * q_len, dim)
        if storage.steps:
            lse = aux.lse.view(batch, storage.kv_heads, group * q_len, 1)
            output = self._merge_tail(query, output, lse.float(), scaling, sliding_window)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def _block_mask(self, q_len: int, group: int, sliding_window: int | None, device: torch.device):
        """The block mask pairing each packed query with its own row's entries (and a sliding window's reach).

        Built once per query shape; a sliding window moves with every step, so its mask is rebuilt.
        """
        storage = self.storage
        key = (q_len, group)
        if key in self._block_masks and not sliding_window:
            return self._block_masks[key]
        per_row = group * q_len
        rows = storage.batch * storage.kv_heads
        query_row = torch.arange(rows * per_row, device=device) // per_row
        row_lengths = storage.indptr.diff().to(device)
        entry_row = torch.repeat_interleave(torch.arange(rows, device=device), row_lengths)
        total = storage.keys.shape[0]
        if sliding_window:
            first_query = storage.append_start + storage.steps - q_len
            query_position = first_query + torch.arange(rows * per_row, device=device) % q_len
            entry_position = storage.positions.to(device).long()

            def visible(b, h, q_index, kv_index):
                same_row = query_row[q_index] == entry_row[kv_index]
                return same_row & (query_position[q_index] - entry_position[kv_index] < sliding_window)
        else:

            def visible(b, h, q_index, kv_index):
                return query_row[q_index] == entry_row[kv_index]

        block_mask = create_block_mask(visible, 1, 1, rows * per_row, total, device=device)
        if not sliding_window:
            self._block_masks[key] = block_mask
        return block_mask

    def _merge_tail(
        self, query: torch.Tensor, prefix: torch.Tensor, prefix_lse: torch.Tensor, scaling: float, window: int | None
    ) -> torch.Tensor:
        """Combine attention over the packed rows (``prefix``, its log-sum-exp) with attention over the tail."""
        storage = self.storage
        batch, heads, q_len, dim = query.shape
        group = heads // storage.kv_heads
        grouped = query.reshape(batch, storage.kv_heads, group * q_len, dim).float()
        scores = grouped @ storage.appended_keys.float().transpose(-1, -2) * scaling
        steps = storage.steps
        step_index = torch.arange(steps, device=query.device)
        query_step = torch.arange(steps - q_len, steps, device=query.device)
        visible = step_index[None, :] <= query_step[:, None]
        if window:
            visible = visible & ((query_step[:, None] - step_index[None, :]) < window)
        visible = visible[None, :, :].expand(group, -1, -1).reshape(group * q_len, steps)
        scores = scores.masked_fill(~visible, float("-inf"))
        tail_lse = scores.logsumexp(dim=-1, keepdim=True)
        tail = torch.softmax(scores, dim=-1) @ storage.appended_values.float()
        top = torch.maximum(prefix_lse, tail_lse)
        prefix_weight, tail_weight = (prefix_lse - top).exp(), (tail_lse - top).exp()
        merged = (prefix.float() * prefix_weight + tail * tail_weight) / (prefix_weight + tail_weight)
        return merged.to(query.dtype)

    def nbytes(self) -> int:
        return sum(
            tensor.nbytes
            for mask in self._block_masks.values()
            for tensor in mask.as_tuple()[2:]
            if isinstance(tensor, torch.Tensor)
        )
