"""Ragged key/value storage: rows of different lengths, one per (sequence, KV head), packed without padding.

This is the whole memory layout of a compressed layer, in the vocabulary of ragged (varlen)
attention kernels, so that a varlen kernel or a paged layout can replace it without touching the
cache above it:

* ``keys`` and ``values`` are ``[total, head_dim]``: every row's kept entries back to back, so the
  bytes held are exactly the bytes kept;
* ``lengths`` is ``[batch, kv_heads]``, always on the CPU (read without a device sync); row
  ``r = sequence * kv_heads + head`` spans ``indptr[r]:indptr[r + 1]`` (its prefix sums);
  ``positions[i]`` is entry ``i``'s token position;
* tokens appended while decoding go to every row alike, in a dense ``[batch, kv_heads, steps,
  head_dim]`` tail, at positions ``append_start + step``. The tail is a buffer that grows
  geometrically and is read as a view of its first ``steps`` slots, so a generation of ``T``
  tokens copies ``O(T)`` bytes in all, not ``O(T^2)``; :meth:`RaggedKV.reserved_bytes` counts the
  slots held but not yet used.

Rows of one storage share one timeline: positions are right-aligned like a left-padded batch, so
that every row's next token is at ``append_start + steps``. :meth:`RaggedKV.fold` moves the tail
into the rows, :meth:`RaggedKV.concat` joins storages into one batch (aligning their timelines),
:meth:`RaggedKV.repeat_interleave` and :meth:`RaggedKV.select` derive batches from one, and
:meth:`RaggedKV.keep` keeps chosen entries of every row (eviction while decoding).

Attention reads the rows as a ``[batch, kv_heads, longest, head_dim]`` view when every row has
the same length (no copy), and otherwise gathers a padded copy with one ``index_select`` and hides
the padding with a mask built once at packing. The result is exact attention over each row's
entries. Torch only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

MIN_TAIL_SLOTS = 64
"""Decode slots the tail buffer starts with."""

ATTENTION_PATHS = ("gather", "padded", "flex")
"""Ways :meth:`RaggedKV.attend` can compute attention (see there)."""

_compiled_flex: dict[str, Callable] = {}


def flex_kernel(device: torch.device) -> Callable:
    """FlexAttention for ``device``: compiled with torch.compile (one compiled function per device type,
    recompiled by torch as shapes change) unless :data:`COMPILE_FLEX` is off, in which case torch's
    unfused reference implementation runs (exact, slow: for tests).

    On CPU (torch 2.13) compiled FlexAttention cannot return the log-sum-exp the tail merge needs,
    and its dynamic-shape C++ code fails to build, which is why ``"auto"`` never picks it there.
    """
    if not COMPILE_FLEX:
        return _eager_flex
    if device.type not in _compiled_flex:
        _compiled_flex[device.type] = torch.compile(flex_attention)
    return _compiled_flex[device.type]


COMPILE_FLEX = True
"""Whether the ``"flex"`` path compiles FlexAttention (torch.compile); tests switch it off."""


def _eager_flex(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One row's ``(positions [n], keys [n, d], values [n, d])``, in ascending position order."""


class RaggedKV:
    """Packed rows of kept entries plus the dense decode tail; see the module docstring."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        append_start: int,
        track_positions: bool = False,
        appended_keys: torch.Tensor | None = None,
        appended_values: torch.Tensor | None = None,
    ):
        if lengths.dim() != 2 or int(lengths.sum()) != keys.shape[0]:
            raise ValueError(
                f"lengths must be [batch, kv_heads] and sum to the {keys.shape[0]} packed entries, "
                f"got shape {tuple(lengths.shape)} summing to {int(lengths.sum())}"
            )
        self.keys, self.values, self.positions = keys, values, positions
        self.lengths = lengths.cpu()
        self.batch, self.kv_heads = lengths.shape
        self._offsets = [0] + lengths.reshape(-1).cumsum(0).tolist()
        self.append_start = int(append_start)
        self.track_positions = track_positions
        self._tail_keys: torch.Tensor | None = appended_keys
        self._tail_values: torch.Tensor | None = appended_values
        self._steps = 0 if appended_keys is None else appended_keys.shape[-2]
        batch, kv_heads = self.batch, self.kv_heads
        self.longest = int(lengths.max()) if lengths.numel() else 0
        device = keys.device
        if bool((lengths == self.longest).all()):
            self.gather_index = self.valid = None
            slot_positions = positions.view(batch, kv_heads, self.longest)
        else:
            offsets = torch.arange(self.longest)
            valid = offsets[None, None, :] < lengths[:, :, None]
            starts = self.indptr[:-1].view(batch, kv_heads)
            index = torch.where(valid, starts[:, :, None] + offsets, torch.zeros((), dtype=torch.long))
            self.gather_index = index.reshape(-1).to(device)
            self.valid = valid[:, :, None, :].to(device)
            slot_positions = positions[self.gather_index].view(batch, kv_heads, self.longest)
        self.slot_positions = slot_positions if track_positions else None
        self._padding_bias: torch.Tensor | None = None
        self._flex_masks: dict = {}
        self._padded_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._padded_steps = 0

    @classmethod
    def pack(
        cls, rows: list[list[Row]], position_offsets: list[int], append_start: int, track_positions: bool = False
    ) -> RaggedKV:
        """Pack ``rows[sequence][head]``; each sequence's positions are shifted by its ``position_offsets`` entry.

        ``track_positions`` keeps each padded slot's position for masks that depend on distance
        (sliding-window layers).
        """
        lengths = torch.tensor([[len(p) for p, _, _ in heads] for heads in rows], dtype=torch.long)
        positions = torch.cat([p + offset for heads, offset in zip(rows, position_offsets) for p, _, _ in heads])
        keys = torch.cat([k for heads in rows for _, k, _ in heads])
        values = torch.cat([v for heads in rows for _, _, v in heads])
        return cls(keys, values, positions.to(torch.int32), lengths, append_start, track_positions)

    @classmethod
    def concat(cls, storages: list[RaggedKV]) -> RaggedKV:
        """One batch of every storage's sequences, in order; each keeps exactly its entries.

        Timelines are aligned on the latest next position: a storage whose next token comes earlier
        has its positions shifted (left padding). Storages whose tails agree keep them; otherwise
        tails are folded into the rows first.
        """
        if not storages:
            raise ValueError("concat needs at least one storage")
        if len({(s.kv_heads, s.keys.shape[-1], s.keys.dtype) for s in storages}) != 1:
            raise ValueError("storages to concatenate must agree in KV heads, head dim and dtype")
        ends = [s.append_start + s.steps for s in storages]
        end = max(ends)
        same_tail = len({(s.append_start, s.steps) for s in storages}) == 1
        parts = storages if same_tail else [s.fold(shift=end - e) for s, e in zip(storages, ends)]
        tail_keys = tail_values = None
        if same_tail and storages[0].steps:
            tail_keys = torch.cat([s.appended_keys for s in parts])
            tail_values = torch.cat([s.appended_values for s in parts])
        return cls(
            torch.cat([s.keys for s in parts]),
            torch.cat([s.values for s in parts]),
            torch.cat([s.positions for s in parts]),
            torch.cat([s.lengths for s in parts]),
            parts[0].append_start,
            any(s.track_positions for s in storages),
            tail_keys,
            tail_values,
        )

    def fold(self, shift: int = 0) -> RaggedKV:
        """This storage with its tail moved into the rows (no tail left) and positions moved by ``shift``."""
        steps = self.steps
        if steps == 0 and shift == 0:
            return self
        index = self._row_entries()
        positions = (self.positions.long() + shift).to(torch.int32)
        if steps == 0:
            keys, values = self.keys, self.values
        else:
            rows = self.batch * self.kv_heads
            tail_positions = self.append_start + shift + torch.arange(steps, device=positions.device)
            positions = torch.cat([positions, tail_positions.to(torch.int32).repeat(rows)])
            keys = torch.cat([self.keys, self.appended_keys.reshape(rows * steps, -1)])
            values = torch.cat([self.values, self.appended_values.reshape(rows * steps, -1)])
            tail_index = torch.arange(rows * steps).view(rows, steps) + self.keys.shape[0]
            index = [torch.cat([own, tail]) for own, tail in zip(index, tail_index)]
            order = torch.cat(index).to(keys.device)
            positions, keys, values = positions[order], keys[order], values[order]
        return RaggedKV(
            keys,
            values,
            positions,
            self.lengths + steps,
            self.append_start + steps + shift,
            self.track_positions,
        )

    def keep(self, chosen: list[list[torch.Tensor]]) -> RaggedKV:
        """A storage holding, for every row, the entries ``chosen[sequence][head]`` indexes (tail folded in).

        Indices count a row's entries in position order, its packed entries first, then its tail.
        """
        folded = self.fold()
        order = []
        for row, offset in enumerate(folded._offsets[:-1]):
            sequence, head = divmod(row, self.kv_heads)
            order.append(chosen[sequence][head].to(torch.long).cpu() + offset)
        lengths = torch.tensor([[len(c) for c in heads] for heads in chosen], dtype=torch.long)
        index = torch.cat(order).to(folded.keys.device)
        return RaggedKV(
            folded.keys[index],
            folded.values[index],
            folded.positions[index],
            lengths,
            folded.append_start,
            self.track_positions,
        )

    def repeat_interleave(self, repeats: int) -> RaggedKV:
        """Each sequence ``repeats`` times in a row (independent copies)."""
        return self.select([sequence for sequence in range(self.batch) for _ in range(repeats)])

    def select(self, sequences: list[int]) -> RaggedKV:
        """A storage of the given sequences, in that order (copies)."""
        for sequence in sequences:
            if not 0 <= sequence < self.batch:
                raise IndexError(f"sequence {sequence} is outside this storage's batch of {self.batch}")
        rows = self._row_entries()
        index = torch.cat([rows[s * self.kv_heads + h] for s in sequences for h in range(self.kv_heads)]).to(
            self.keys.device
        )
        chosen = torch.tensor(sequences, dtype=torch.long)
        tail_keys = tail_values = None
        if self.steps:
            device_index = chosen.to(self.appended_keys.device)
            tail_keys = self.appended_keys.index_select(0, device_index)
            tail_values = self.appended_values.index_select(0, device_index)
        return RaggedKV(
            self.keys[index],
            self.values[index],
            self.positions[index],
            self.lengths[chosen],
            self.append_start,
            self.track_positions,
            tail_keys,
            tail_values,
        )

    def clone(self) -> RaggedKV:
        """An independent copy: appending to one never changes the other."""
        return RaggedKV(
            self.keys.clone(),
            self.values.clone(),
            self.positions.clone(),
            self.lengths.clone(),
            self.append_start,
            self.track_positions,
            None if self.appended_keys is None else self.appended_keys.clone(),
            None if self.appended_values is None else self.appended_values.clone(),
        )

    def _row_entries(self) -> list[torch.Tensor]:
        """Per row, the indices of its packed entries (on the CPU)."""
        return [torch.arange(start, end) for start, end in zip(self._offsets[:-1], self._offsets[1:])]

    def count_before(self, bounds: list[int]) -> torch.Tensor:
        """``[batch, kv_heads]``: each row's entries at positions below its sequence's bound (tail included)."""
        rows = self.batch * self.kv_heads
        row_of_entry = torch.repeat_interleave(torch.arange(rows), self.lengths.reshape(-1))
        bound = torch.tensor(bounds, dtype=torch.long).repeat_interleave(self.kv_heads)[row_of_entry]
        below = self.positions.long().cpu() < bound
        counts = torch.bincount(row_of_entry[below], minlength=rows).view(self.batch, self.kv_heads)
        if self.steps:
            tail = torch.arange(self.append_start, self.append_start + self.steps)
            counts += (tail[None, :] < torch.tensor(bounds)[:, None]).sum(-1)[:, None]
        return counts

    @property
    def indptr(self) -> torch.Tensor:
        """Row offsets ``[batch * kv_heads + 1]``: row ``r`` spans ``indptr[r]:indptr[r + 1]`` (on the CPU)."""
        return torch.tensor(self._offsets, dtype=torch.long)

    @property
    def steps(self) -> int:
        """Tokens appended to every row since packing."""
        return self._steps

    @property
    def appended_keys(self) -> torch.Tensor | None:
        """``[batch, kv_heads, steps, d]``: the appended keys (a view of the tail buffer), ``None`` before any."""
        return None if not self._steps else self._tail_keys[:, :, : self._steps]

    @property
    def appended_values(self) -> torch.Tensor | None:
        """``[batch, kv_heads, steps, d]``: the appended values (a view of the tail buffer), ``None`` before any."""
        return None if not self._steps else self._tail_values[:, :, : self._steps]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``[batch, kv_heads, q, d]`` new entries to every row, in amortized constant time per entry.

        The buffer doubles when full (at least :data:`MIN_TAIL_SLOTS` slots); only then are the
        used slots copied.
        """
        needed = self._steps + keys.shape[-2]
        buffer = self._tail_keys
        stale = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
        if buffer is None or buffer.shape[-2] < needed or stale:
            capacity = needed if stale else max(needed, MIN_TAIL_SLOTS, 2 * (0 if buffer is None else buffer.shape[-2]))
            self._tail_keys = self._grown(self._tail_keys, keys, capacity)
            self._tail_values = self._grown(self._tail_values, values, capacity)
        self._tail_keys[:, :, self._steps : needed] = keys
        self._tail_values[:, :, self._steps : needed] = values
        self._steps = needed

    def _grown(self, buffer: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
        if self._steps:
            grown[:, :, : self._steps] = buffer[:, :, : self._steps]
        return grown

    def reserved_bytes(self) -> int:
        """Bytes of the tail buffer's slots held but not used yet."""
        if self._tail_keys is None:
            return 0
        free = self._tail_keys.shape[-2] - self._steps
        return 2 * free * self._tail_keys[:, :, :1].nbytes

    def row(self, sequence: int, head: int) -> Row:
        """The packed entries of one row (views of the storage)."""
        index = sequence * self.kv_heads + head
        start, end = self._offsets[index], self._offsets[index + 1]
        return self.positions[start:end], self.keys[start:end], self.values[start:end]

    def full_row(self, sequence: int, head: int) -> Row:
        """Every entry one row holds, packed then appended, in position order (copies when there is a tail)."""
        positions, keys, values = self.row(sequence, head)
        if not self.steps:
            return positions, keys, values
        tail = torch.arange(self.append_start, self.append_start + self.steps, device=positions.device)
        return (
            torch.cat([positions, tail.to(positions.dtype)]),
            torch.cat([keys, self.appended_keys[sequence, head]]),
            torch.cat([values, self.appended_values[sequence, head]]),
        )

    def row_lengths(self) -> torch.Tensor:
        """``[batch, kv_heads]`` entries each row holds, tail included (on the CPU)."""
        return self.lengths + self.steps

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage's tensors by name (see :meth:`from_tensors`), contiguous, for saving."""
        named = {"keys": self.keys, "values": self.values, "positions": self.positions, "lengths": self.lengths}
        if self.steps:
            named["appended_keys"] = self.appended_keys
            named["appended_values"] = self.appended_values
        return {name: tensor.contiguous() for name, tensor in named.items()}

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], append_start: int, track_positions: bool) -> RaggedKV:
        """The storage :meth:`tensors` describes; a missing or inconsistent tensor is a ``ValueError``."""
        missing = [name for name in ("keys", "values", "positions", "lengths") if name not in named]
        if missing or (("appended_keys" in named) != ("appended_values" in named)):
            raise ValueError(f"ragged storage tensors incomplete (missing: {', '.join(missing) or 'a tail half'})")
        keys, values, positions, lengths = (named[n] for n in ("keys", "values", "positions", "lengths"))
        if keys.shape != values.shape or keys.dim() != 2 or positions.shape != keys.shape[:1]:
            raise ValueError(
                f"ragged storage shapes disagree: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                f"positions {tuple(positions.shape)}"
            )
        tail_keys, tail_values = named.get("appended_keys"), named.get("appended_values")
        if tail_keys is not None and (
            tail_keys.shape != tail_values.shape or tail_keys.shape[:2] != tuple(lengths.shape)
        ):
            raise ValueError(
                f"ragged storage tail of shape {tuple(tail_keys.shape)} does not fit lengths {tuple(lengths.shape)}"
            )
        positions, lengths = positions.to(torch.int32), lengths.long().cpu()
        return cls(keys, values, positions, lengths, append_start, track_positions, tail_keys, tail_values)

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads, longest, d]`` rows of ``keys`` or ``values`` (a view when no row is padded)."""
        if self.gather_index is not None:
            packed = packed.index_select(0, self.gather_index)
        return packed.view(self.batch, self.kv_heads, self.longest, packed.shape[-1])

    def attend(
        self, query: torch.Tensor, scaling: float, sliding_window: int | None = None, path: str = "gather"
    ) -> torch.Tensor:
        """Exact attention of ``query[batch, heads, q, d]`` (the last ``q`` appended tokens) over each row.

        Query heads are grouped over the KV heads (GQA); returns ``[batch, q, heads, d]``. ``path``
        is one of :data:`ATTENTION_PATHS`: ``"gather"`` reads the rows as a padded view (a copy
        when rows differ in length) and runs SDPA with a padding mask; ``"padded"`` does the same
        over a padded copy it keeps, with room for the tail, so that a decode step copies only the
        new token (faster for batches of uneven rows, at the cost of holding that copy); ``"flex"`` runs
        FlexAttention over the packed entries themselves with a block mask built once per storage
        (no padding copy) and merges the appended tail by log-sum-exp. Both are exact.
        """
        if path == "flex":
            return self._attend_flex(query, scaling, sliding_window)
        if path not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {path!r}; valid paths: {', '.join(ATTENTION_PATHS)}")
        batch, heads, q_len, dim = query.shape
        group = heads // self.kv_heads
        if path == "padded":
            keys, values = self._padded_with_tail()
        else:
            keys, values = self.padded(self.keys), self.padded(self.values)
            if self.appended_keys is not None:
                keys = torch.cat([keys, self.appended_keys], dim=2)
                values = torch.cat([values, self.appended_values], dim=2)
        mask = self.mask(q_len, group, sliding_window)
        grouped = query.reshape(batch, self.kv_heads, group * q_len, dim)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def _padded_with_tail(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, kv_heads, longest + steps, d]`` keys and values, views of a padded copy kept between steps.

        The copy is made once (with room for as many appended slots as the tail buffer holds) and
        each call writes only the slots appended since the last one.
        """
        steps, longest = self.steps, self.longest
        width = longest + steps
        rows = self._padded_rows
        stale = rows is not None and rows[0].is_inference() and not torch.is_inference_mode_enabled()
        if rows is None or rows[0].shape[2] < width or stale:
            room = max(steps, MIN_TAIL_SLOTS, 0 if self._tail_keys is None else self._tail_keys.shape[-2])
            shape = (self.batch, self.kv_heads, longest + room, self.keys.shape[-1])
            rows = (self.keys.new_empty(shape), self.values.new_empty(shape))
            rows[0][:, :, :longest] = self.padded(self.keys)
            rows[1][:, :, :longest] = self.padded(self.values)
            self._padded_rows, self._padded_steps = rows, 0
        if self._padded_steps < steps:
            done = self._padded_steps
            rows[0][:, :, longest + done : width] = self.appended_keys[:, :, done:]
            rows[1][:, :, longest + done : width] = self.appended_values[:, :, done:]
            self._padded_steps = steps
        return rows[0][:, :, :width], rows[1][:, :, :width]

    def mask(self, q_len: int, group: int, sliding_window: int | None) -> torch.Tensor | None:
        """Visibility for the grouped query ``[batch, kv_heads, group * q, entries]``; ``None`` when all is visible.

        A single decode token gets an additive mask (0 or -inf, in the keys' dtype, built once per
        storage), which SDPA on CPU runs faster than a boolean one; otherwise a boolean mask.
        """
        steps = self.steps
        batch, kv_heads = self.batch, self.kv_heads
        if q_len == 1 and not sliding_window:
            if self.valid is None:
                return None
            if self._padding_bias is None:
                bias = torch.zeros(self.valid.shape, dtype=self.keys.dtype, device=self.valid.device)
                self._padding_bias = bias.masked_fill(~self.valid, float("-inf"))
            appended = self._padding_bias.new_zeros(batch, kv_heads, 1, steps)
            return torch.cat([self._padding_bias, appended], dim=-1)
        device = self.keys.device
        prefix = torch.ones(batch, kv_heads, q_len, self.longest, dtype=torch.bool, device=device)
        if self.valid is not None:
            prefix &= self.valid
        step_index = torch.arange(steps, device=device)
        query_step = torch.arange(steps - q_len, steps, device=device)
        appended = (step_index[None, :] <= query_step[:, None]).expand(batch, kv_heads, -1, -1)
        if sliding_window:
            if self.slot_positions is None:
                raise RuntimeError("a sliding-window mask needs storage packed with track_positions=True")
            query_position = self.append_start + query_step
            distance = query_position[None, None, :, None] - self.slot_positions[:, :, None, :].long()
            prefix &= distance < sliding_window
            appended = appended & ((query_step[:, None] - step_index[None, :]) < sliding_window)
        mask = torch.cat([prefix, appended], dim=-1)
        return mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, kv_heads, group * q_len, -1)

    def _attend_flex(self, query: torch.Tensor, scaling: float, sliding_window: int | None) -> torch.Tensor:
        batch, heads, q_len, dim = query.shape
        group = heads // self.kv_heads
        packed_query = query.reshape(1, 1, batch * heads * q_len, dim)
        block_mask = self._flex_block_mask(q_len, group, sliding_window, query.device)
        kernel = flex_kernel(query.device)
        request = AuxRequest(lse=True) if self.steps else None
        output = kernel(
            packed_query,
            self.keys[None, None],
            self.values[None, None],
            block_mask=block_mask,
            scale=scaling,
            return_aux=request,
        )
        if request is not None:
            output, aux = output
        output = output.view(batch, self.kv_heads, group * q_len, dim)
        if self.steps:
            lse = aux.lse.view(batch, self.kv_heads, group * q_len, 1)
            output = self._merge_tail(query, output, lse.float(), scaling, sliding_window)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def _flex_block_mask(self, q_len: int, group: int, sliding_window: int | None, device: torch.device):
        """The block mask pairing each packed query with its own row's entries (and a sliding window's reach).

        Built once per storage and query shape; a sliding window moves with every step, so its mask is rebuilt.
        """
        key = (q_len, group)
        if key in self._flex_masks and not sliding_window:
            return self._flex_masks[key]
        per_row = group * q_len
        rows = self.batch * self.kv_heads
        query_row = torch.arange(rows * per_row, device=device) // per_row
        entry_row = torch.repeat_interleave(torch.arange(rows), self.lengths.reshape(-1)).to(device)
        total = self.keys.shape[0]
        if sliding_window:
            first_query = self.append_start + self.steps - q_len
            query_position = first_query + torch.arange(rows * per_row, device=device) % q_len
            entry_position = self.positions.to(device).long()

            def visible(b, h, q_index, kv_index):
                same_row = query_row[q_index] == entry_row[kv_index]
                return same_row & (query_position[q_index] - entry_position[kv_index] < sliding_window)
        else:

            def visible(b, h, q_index, kv_index):
                return query_row[q_index] == entry_row[kv_index]

        block_mask = create_block_mask(visible, 1, 1, rows * per_row, total, device=device)
        if not sliding_window:
            self._flex_masks[key] = block_mask
        return block_mask

    def _merge_tail(
        self, query: torch.Tensor, prefix: torch.Tensor, prefix_lse: torch.Tensor, scaling: float, window: int | None
    ) -> torch.Tensor:
        """Combine attention over the packed rows (``prefix``, its log-sum-exp) with attention over the tail."""
        batch, heads, q_len, dim = query.shape
        group = heads // self.kv_heads
        grouped = query.reshape(batch, self.kv_heads, group * q_len, dim).float()
        scores = grouped @ self.appended_keys.float().transpose(-1, -2) * scaling
        steps = self.steps
        step_index = torch.arange(steps, device=query.device)
        query_step = torch.arange(steps - q_len, steps, device=query.device)
        visible = step_index[None, :] <= query_step[:, None]
        if window:
            visible = visible & ((query_step[:, None] - step_index[None, :]) < window)
        visible = visible[None, :, :].expand(group, -1, -1).reshape(group * q_len, steps)
        scores = scores.masked_fill(~visible, float("-inf"))
        tail_lse = scores.logsumexp(dim=-1, keepdim=True)
        tail = torch.softmax(scores, dim=-1) @ self.appended_values.float()
        top = torch.maximum(prefix_lse, tail_lse)
        prefix_weight, tail_weight = (prefix_lse - top).exp(), (tail_lse - top).exp()
        merged = (prefix.float() * prefix_weight + tail * tail_weight) / (prefix_weight + tail_weight)
        return merged.to(query.dtype)

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the key/value entries held, bytes of the index tensors held); the tail buffer's unused
        slots are apart (:meth:`reserved_bytes`)."""
        kv = sum(t.nbytes for t in (self.keys, self.values, self.appended_keys, self.appended_values) if t is not None)
        held = (self.positions, self.lengths, self.gather_index, self.valid, self._padding_bias)
        index = sum(t.nbytes for t in held if t is not None)
        if self.gather_index is not None and self.slot_positions is not None:
            index += self.slot_positions.nbytes
        return kv, index

    def sequence_kv_bytes(self, sequence: int) -> int:
        """Key/value bytes held for one sequence: its rows' entries and its share of the appended tail."""
        start = self._offsets[sequence * self.kv_heads]
        end = self._offsets[(sequence + 1) * self.kv_heads]
        entry = 2 * self.keys.shape[-1] * self.keys.element_size()
        return (end - start + self.steps * self.kv_heads) * entry
