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
  built once, and the tail merged by log-sum-exp;
* ``"bucketed"``: like ``"padded"``, but rows of similar length are padded together, one SDPA
  call per group, so that short rows do not pay for the longest (batches of mixed budgets).

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

    On CPU ``"auto"`` is ``"packed"`` (``"gather"`` wherever it does not apply): compiled
    FlexAttention there takes 1.5-2.9x as long per call at decode shapes
    (``benchmarks/ragged_attention.py``) and cannot return the log-sum-exp the tail merge needs.
    On accelerators it is ``"flex"``, which reads the packed entries in place, provided a tiny
    FlexAttention call compiles and runs on that device (tried once per device); if it does
    not, a warning gives the cause and ``"gather"`` runs. An explicit ``"flex"`` is never probed:
    its failure is raised where it happens.
    """
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; valid backends: auto, {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cpu":
        return "packed"
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


@register_backend("packed")
class PackedBackend(GatherBackend):
    """One sequence's uneven rows read in place: each query head scores every packed entry, other heads' masked.

    Per-head budgets make rows uneven, and padding them costs a copy of every entry per step
    (``"gather"``) or a padded copy held between steps (``"padded"``). For a single decode query
    of one sequence it is cheaper to let every query head score all ``N`` packed entries (``H x N``
    dot products, ``kv_heads`` times those of reading each row alone, all in one matrix product on
    the storage itself) and mask out the other heads' entries with an additive bias built once. The
    tail of generated tokens is scored per KV head and joins the same softmax. Anything else (equal
    rows, several sequences, several query tokens, a sliding window) goes the ``"gather"`` way.
    """

    def __init__(self, storage: RaggedKV):
        super().__init__(storage)
        self._head_bias: torch.Tensor | None = None

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        storage = self.storage
        if storage.valid is None or storage.batch != 1 or query.shape[2] != 1 or sliding_window:
            return super().attend(query, scaling, sliding_window)
        _, heads, _, dim = query.shape
        kv_heads = storage.kv_heads
        group = heads // kv_heads
        flat = query.reshape(heads, dim)
        scores = (flat @ storage.keys.T).float() * scaling + self._bias(group)
        entries = scores.shape[1]
        tail_keys = storage.appended_keys
        if tail_keys is not None:
            tail = flat.view(kv_heads, group, dim) @ tail_keys[0].transpose(1, 2)
            scores = torch.cat([scores, tail.float().reshape(heads, -1) * scaling], dim=1)
        weights = scores.softmax(dim=-1).to(storage.values.dtype)
        output = weights[:, :entries] @ storage.values
        if tail_keys is not None:
            tail_weights = weights[:, entries:].reshape(kv_heads, group, -1)
            output = output + (tail_weights @ storage.appended_values[0]).reshape(heads, dim)
        return output.view(1, 1, heads, dim)

    def _bias(self, group: int) -> torch.Tensor:
        """``[H, N]``: 0 where the entry belongs to the query head's KV head, ``-inf`` elsewhere (built once)."""
        if self._head_bias is None:
            storage = self.storage
            lengths = storage.lengths.reshape(-1).to(storage.keys.device)
            head_of_entry = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
            kv_head_of_query = torch.arange(len(lengths) * group, device=lengths.device) // group
            other = kv_head_of_query[:, None] != head_of_entry[None, :]
            self._head_bias = torch.zeros(other.shape, device=lengths.device).masked_fill(other, float("-inf"))
        return self._head_bias

    def nbytes(self) -> int:
        return super().nbytes() + (0 if self._head_bias is None else self._head_bias.nbytes)


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


BUCKET_CALL_ENTRIES = 2048
"""What one more attention call costs, in row entries attended: the saving a width bucket must buy."""


def width_buckets(lengths: list[int], call_entries: int | None = None) -> list[list[int]]:
    """Rows (indices into ``lengths``) in groups of similar length, shortest first, for padded attention.

    A group costs ``len(group) * longest + call_entries``: every row pays for the longest one and
    each group is one more call. The grouping minimises the total over contiguous runs of the
    rows sorted by length (dynamic programming, exact for that cost); each group lists its rows
    in index order. ``call_entries`` defaults to :data:`BUCKET_CALL_ENTRIES`.
    """
    call_entries = BUCKET_CALL_ENTRIES if call_entries is None else call_entries
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        widest = lengths[order[end - 1]]
        for start in range(end):
            cost = best[start] + (end - start) * widest + call_entries
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(sorted(order[cut[end] : end]))
        end = cut[end]
    return groups[::-1]


class _WidthBucket:
    """Some rows of a storage padded to their own longest row, with room for the tail, and the padding's bias."""

    def __init__(self, storage: RaggedKV, units: list[int]):
        lengths = storage.lengths.reshape(-1)[units]
        self.width = int(lengths.max())
        self.count = len(units)
        device = storage.keys.device
        self.units = torch.tensor(units, dtype=torch.long, device=device)
        self.in_order = units == list(range(storage.batch * storage.kv_heads))
        slots = torch.arange(self.width)
        valid = slots[None, :] < lengths[:, None]
        starts = torch.tensor([storage._offsets[u] for u in units], dtype=torch.long)
        self._gather = torch.where(valid, starts[:, None] + slots, torch.zeros((), dtype=torch.long)).reshape(-1)
        self._gather = self._gather.to(device)
        self._valid = valid.to(device)
        self.keys = self.values = self.bias = None
        self.written = 0

    def rows(self, storage: RaggedKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[count, 1, width + steps, d]`` and bias ``[count, 1, 1, width + steps]``, tail written."""
        steps, width = storage.steps, self.width
        stale = self.keys is not None and self.keys.is_inference() and not torch.is_inference_mode_enabled()
        if self.keys is None or self.keys.shape[2] < width + steps or stale:
            room = max(steps, MIN_TAIL_SLOTS, storage.tail_capacity)
            dim = storage.keys.shape[-1]
            self.keys = storage.keys.new_empty(self.count, 1, width + room, dim)
            self.values = storage.values.new_empty(self.count, 1, width + room, dim)
            self.keys[:, 0, :width] = storage.keys.index_select(0, self._gather).view(self.count, width, dim)
            self.values[:, 0, :width] = storage.values.index_select(0, self._gather).view(self.count, width, dim)
            bias = torch.zeros(self.count, 1, 1, width + room, dtype=storage.keys.dtype, device=storage.keys.device)
            bias[:, 0, 0, :width].masked_fill_(~self._valid, float("-inf"))
            self.bias, self.written = bias, 0
        if self.written < steps:
            for target, source in ((self.keys, storage.appended_keys), (self.values, storage.appended_values)):
                new = source[:, :, self.written :].reshape(-1, 1, steps - self.written, source.shape[-1])
                target[:, :, width + self.written : width + steps] = new if self.in_order else new[self.units]
            self.written = steps
        end = width + steps
        return self.keys[:, :, :end], self.values[:, :, :end], self.bias[..., :end]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.bias) if t is not None)


@register_backend("bucketed")
class BucketedBackend(AttentionBackend):
    """Rows grouped by length (:func:`width_buckets`), each group a padded copy kept between steps.

    One padded batch makes every row pay for the longest: a batch of caches of different methods
    and budgets, or per-head budgets, can be several times wider than its average row. Grouping
    rows of similar length costs one attention call per group and holds a copy of the rows (which
    :meth:`nbytes` counts), like ``"padded"``. Prompt-sized queries and sliding windows go through
    ``"gather"``.
    """

    def __init__(self, storage: RaggedKV):
        super().__init__(storage)
        self._buckets: list[_WidthBucket] | None = None
        self._general = GatherBackend(storage)

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        storage = self.storage
        batch, heads, q_len, dim = query.shape
        if q_len != 1 or sliding_window:
            return self._general.attend(query, scaling, sliding_window)
        if self._buckets is None:
            lengths = storage.lengths.reshape(-1).tolist()
            self._buckets = [_WidthBucket(storage, units) for units in width_buckets(lengths)]
        group = heads // storage.kv_heads
        grouped = query.reshape(batch * storage.kv_heads, 1, group, dim)
        output = torch.empty_like(grouped) if len(self._buckets) > 1 else None
        for bucket in self._buckets:
            keys, values, bias = bucket.rows(storage)
            part = grouped if bucket.in_order else grouped.index_select(0, bucket.units)
            attended = F.scaled_dot_product_attention(part, keys, values, attn_mask=bias, scale=scaling)
            if output is None:
                output = attended
            else:
                output.index_copy_(0, bucket.units, attended)
        return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous()

    def nbytes(self) -> int:
        held = 0 if self._buckets is None else sum(bucket.nbytes() for bucket in self._buckets)
        return held + self._general.nbytes()
