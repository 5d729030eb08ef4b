"""Ragged key/value storage: rows of different lengths, one per (sequence, KV head), packed without padding.

This is the whole memory layout of a compressed layer, in the vocabulary of ragged (varlen)
attention kernels, so that a varlen kernel or a paged layout can replace it without touching the
cache above it:

* ``keys`` and ``values`` are ``[total, head_dim]``: every row's kept entries back to back, so the
  bytes held are exactly the bytes kept;
* ``lengths`` is ``[batch, kv_heads]``; row ``r = sequence * kv_heads + head`` spans
  ``indptr[r]:indptr[r + 1]`` (its prefix sums); ``positions[i]`` is entry ``i``'s token position;
* tokens appended while decoding go to every row alike, in a dense ``[batch, kv_heads, steps,
  head_dim]`` tail, at positions ``append_start + step``.

Attention reads the rows as a ``[batch, kv_heads, longest, head_dim]`` view when every row has
the same length (no copy), and otherwise gathers a padded copy with one ``index_select`` and hides
the padding with a mask built once at packing. The result is exact attention over each row's
entries. Torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    ):
        if lengths.dim() != 2 or int(lengths.sum()) != keys.shape[0]:
            raise ValueError(
                f"lengths must be [batch, kv_heads] and sum to the {keys.shape[0]} packed entries, "
                f"got shape {tuple(lengths.shape)} summing to {int(lengths.sum())}"
            )
        self.keys, self.values, self.positions = keys, values, positions
        self.lengths = lengths
        self.batch, self.kv_heads = lengths.shape
        self._offsets = [0] + lengths.reshape(-1).cumsum(0).tolist()
        self.append_start = append_start
        self.appended_keys: torch.Tensor | None = None
        self.appended_values: torch.Tensor | None = None
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

    @property
    def indptr(self) -> torch.Tensor:
        """Row offsets ``[batch * kv_heads + 1]``: row ``r`` spans ``indptr[r]:indptr[r + 1]`` (on the CPU)."""
        return torch.tensor(self._offsets, dtype=torch.long)

    @property
    def steps(self) -> int:
        """Tokens appended to every row since packing."""
        return 0 if self.appended_keys is None else self.appended_keys.shape[-2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``[batch, kv_heads, q, d]`` new entries to every row."""
        if self.appended_keys is None:
            self.appended_keys, self.appended_values = keys, values
        else:
            self.appended_keys = torch.cat([self.appended_keys, keys], dim=-2)
            self.appended_values = torch.cat([self.appended_values, values], dim=-2)

    def row(self, sequence: int, head: int) -> Row:
        """The packed entries of one row (views of the storage)."""
        index = sequence * self.kv_heads + head
        start, end = self._offsets[index], self._offsets[index + 1]
        return self.positions[start:end], self.keys[start:end], self.values[start:end]

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """``[batch, kv_heads, longest, d]`` rows of ``keys`` or ``values`` (a view when no row is padded)."""
        if self.gather_index is not None:
            packed = packed.index_select(0, self.gather_index)
        return packed.view(self.batch, self.kv_heads, self.longest, packed.shape[-1])

    def attend(self, query: torch.Tensor, scaling: float, sliding_window: int | None = None) -> torch.Tensor:
        """Exact attention of ``query[batch, heads, q, d]`` (the last ``q`` appended tokens) over each row.

        Query heads are grouped over the KV heads (GQA); returns ``[batch, q, heads, d]``.
        """
        batch, heads, q_len, dim = query.shape
        group = heads // self.kv_heads
        keys, values = self.padded(self.keys), self.padded(self.values)
        if self.appended_keys is not None:
            keys = torch.cat([keys, self.appended_keys], dim=2)
            values = torch.cat([values, self.appended_values], dim=2)
        mask = self.mask(q_len, group, sliding_window)
        grouped = query.reshape(batch, self.kv_heads, group * q_len, dim)
        output = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scaling)
        return output.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous()

    def mask(self, q_len: int, group: int, sliding_window: int | None) -> torch.Tensor | None:
        """Visibility for the grouped query ``[batch, kv_heads, group * q, entries]``; ``None`` when all is visible."""
        steps = self.steps
        batch, kv_heads = self.batch, self.kv_heads
        if q_len == 1 and not sliding_window:
            if self.valid is None:
                return None
            appended = self.valid.new_ones(batch, kv_heads, 1, steps)
            return torch.cat([self.valid, appended], dim=-1)
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

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the key/value tensors held, bytes of the index tensors held)."""
        kv = sum(
            t.nbytes for t in (self.keys, self.values, self.appended_keys, self.appended_values) if t is not None
        )
        index = sum(t.nbytes for t in (self.positions, self.lengths, self.gather_index, self.valid) if t is not None)
        if self.gather_index is not None and self.slot_positions is not None:
            index += self.slot_positions.nbytes
        return kv, index

    def sequence_kv_bytes(self, sequence: int) -> int:
        """Key/value bytes held for one sequence: its rows' entries and its share of the appended tail."""
        start = self._offsets[sequence * self.kv_heads]
        end = self._offsets[(sequence + 1) * self.kv_heads]
        entry = 2 * self.keys.shape[-1] * self.keys.element_size()
        return (end - start + self.steps * self.kv_heads) * entry
