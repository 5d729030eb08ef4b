"""Ragged key/value storage: rows of different lengths, one per (sequence, KV head), packed without padding.

This is the whole memory layout of a compressed layer, in the vocabulary of ragged (varlen)
attention kernels, so that a varlen kernel or a paged layout can replace it without touching the
cache above it:

* ``keys`` and ``values`` are ``[total, head_dim]``: every row's kept entries back to back, so the
  bytes held are exactly the bytes kept;
* ``lengths`` is ``[batch, kv_heads]``, always on the CPU (read without a device sync); row
  ``r = sequence * kv_heads + head`` spans ``indptr[r]:indptr[r + 1]`` (its prefix sums, on the
  keys' device, built once; the same offsets are kept as Python integers for reads without a sync);
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

The storage is the layout only: :meth:`RaggedKV.padded` reads the rows as a ``[batch, kv_heads,
longest, head_dim]`` view when every row has the same length (no copy), and otherwise gathers a
padded copy with one ``index_select`` (``gather_index``), ``valid`` marking the real slots. Decode
attention over it is :mod:`lavakv.backends`. Torch only.
"""

from __future__ import annotations

import torch

MIN_TAIL_SLOTS = 64
"""Decode slots the tail buffer starts with."""


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
        self.indptr = torch.tensor(self._offsets, dtype=torch.long, device=keys.device)
        """Row offsets ``[batch * kv_heads + 1]`` on the keys' device: row ``r`` spans ``indptr[r]:indptr[r + 1]``."""
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
            starts = torch.tensor(self._offsets[:-1], dtype=torch.long).view(batch, kv_heads)
            index = torch.where(valid, starts[:, :, None] + offsets, torch.zeros((), dtype=torch.long))
            self.gather_index = index.reshape(-1).to(device)
            self.valid = valid[:, :, None, :].to(device)
            slot_positions = positions[self.gather_index].view(batch, kv_heads, self.longest)
        self.slot_positions = slot_positions if track_positions else None

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
    def steps(self) -> int:
        """Tokens appended to every row since packing."""
        return self._steps

    @property
    def tail_capacity(self) -> int:
        """Decode slots the tail buffer holds, used or not."""
        return 0 if self._tail_keys is None else self._tail_keys.shape[-2]

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

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the key/value entries held, bytes of the index tensors held); the tail buffer's unused
        slots are apart (:meth:`reserved_bytes`)."""
        kv = sum(t.nbytes for t in (self.keys, self.values, self.appended_keys, self.appended_values) if t is not None)
        held = (self.positions, self.lengths, self.indptr, self.gather_index, self.valid)
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
