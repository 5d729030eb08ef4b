"""The head-packed layout on vLLM's CPU paged cache: per-head rows in (block, KV head) sub-blocks.

vLLM's CPU attention cache is ``[num_blocks, kv_heads, block_size, 2 * head_dim]`` per layer; inside
one (block, KV head) the keys of ``block_size`` tokens come first (stored ``[head_dim, block_size]``,
the kernel's transposed order) and their values after (``[block_size, head_dim]``). That region is
self-contained, so the cache viewed as ``[num_blocks * kv_heads, 1, block_size, 2 * head_dim]`` is a
cache of *one* KV head whose blocks are the sub-blocks. A KV head of a compressed request is then a
sequence of its own, with its own length and its own list of sub-blocks, and vLLM's own kernel
attends all of them in one call: ragged per-head budgets with no padding and no copy per step.

This module holds the tensor operations on that view; which sub-blocks a request's heads own is
decided by the caller. It imports vLLM's compiled ops only when called.
"""

from __future__ import annotations

import math
from collections import deque

import torch

READABLE_ISAS = ("vec", "vec16", "neon")
"""The kernel variants whose key order :func:`read_rows` knows; others (AMX, RVV...) are refused."""


def _ops():
    from vllm import _custom_ops

    return _custom_ops


def sub_block_view(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_cache, value_cache)`` of ``kv_cache`` seen as one-head blocks, one per (block, KV head)."""
    if kv_cache.dim() != 4:
        shape = tuple(kv_cache.shape)
        raise ValueError(f"a CPU KV cache is [num_blocks, kv_heads, block_size, 2 * head_dim], got {shape}")
    num_blocks, kv_heads, block_size, twice_dim = kv_cache.shape
    flat = kv_cache.view(num_blocks * kv_heads, 1, 2 * block_size, twice_dim // 2)
    key_cache, value_cache = flat.chunk(2, dim=2)
    return key_cache, value_cache


def row_slots(sub_blocks: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Slot of row ``rows[i]`` of a head whose sub-blocks are ``sub_blocks`` (in order)."""
    return sub_blocks[rows // block_size].to(torch.int64) * block_size + rows % block_size


def write_rows(kv_cache: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, isa: str) -> None:
    """Write one head's ``keys``/``values`` ``[n, head_dim]`` (or several heads' rows) at sub-block ``slots``."""
    key_cache, value_cache = sub_block_view(kv_cache)
    _ops().cpu_attn_reshape_and_cache(
        keys.reshape(-1, 1, keys.shape[-1]).contiguous(),
        values.reshape(-1, 1, values.shape[-1]).contiguous(),
        key_cache,
        value_cache,
        slots.to(torch.int64),
        isa,
    )


def read_rows(kv_cache: torch.Tensor, slots: torch.Tensor, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values ``[n, head_dim]`` at sub-block ``slots`` (the inverse of :func:`write_rows`)."""
    if isa not in READABLE_ISAS:
        raise ValueError(f"reading rows back from the {isa!r} kernel's cache is not supported; valid: {READABLE_ISAS}")
    num_blocks, kv_heads, block_size, twice_dim = kv_cache.shape
    dim = twice_dim // 2
    regions = kv_cache.view(num_blocks * kv_heads, 2, block_size * dim)
    sub_blocks, offsets = slots // block_size, slots % block_size
    keys = regions[sub_blocks, 0].view(-1, dim, block_size)
    keys = keys.gather(2, offsets.view(-1, 1, 1).expand(-1, dim, 1)).squeeze(2)
    values = regions[sub_blocks, 1].view(-1, block_size, dim)
    values = values.gather(1, offsets.view(-1, 1, 1).expand(-1, 1, dim)).squeeze(1)
    return keys, values


def ragged_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    head_tables: torch.Tensor,
    head_lengths: torch.Tensor,
    isa: str,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of one new token per request over each KV head's own rows, in one kernel call.

    ``query`` is ``[requests, heads, head_dim]`` (query heads grouped by KV head as in GQA);
    ``head_tables[r * kv_heads + h]`` lists the sub-blocks of request ``r``'s KV head ``h`` and
    ``head_lengths`` the rows each holds. Returns ``[requests, heads, head_dim]``.
    """
    requests, heads, dim = query.shape
    kv_heads = kv_cache.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} KV heads")
    if head_tables.shape[0] != requests * kv_heads or head_lengths.shape[0] != requests * kv_heads:
        raise ValueError(
            f"need one table and one length per (request, KV head): {requests * kv_heads}, "
            f"got {head_tables.shape[0]} and {head_lengths.shape[0]}"
        )
    group = heads // kv_heads
    per_head = query.reshape(requests * kv_heads, group, dim).contiguous()
    starts = torch.arange(requests * kv_heads + 1, dtype=torch.int32)
    lengths = head_lengths.to(torch.int32)
    key_cache, value_cache = sub_block_view(kv_cache)
    ops = _ops()
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=requests * kv_heads,
        num_heads=group,
        num_kv_heads=1,
        head_dim=dim,
        seq_lens=lengths,
        dtype=query.dtype,
        query_start_loc=starts,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    output = torch.empty_like(per_head)
    ops.cpu_attention_with_kv_cache(
        query=per_head,
        key_cache=key_cache,
        value_cache=value_cache,
        output=output,
        query_start_loc=starts,
        seq_lens=lengths,
        scale=1 / math.sqrt(dim) if scale is None else scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=head_tables.to(torch.int32),
        softcap=0,
        scheduler_metadata=metadata,
        s_aux=None,
    )
    return output.view(requests, heads, dim)


def layer_sub_block(layer: int, block, head: int, num_blocks: int, kv_heads: int):
    """The id of (layer, block, KV head) in the buffer of all layers (``block`` an int or a tensor of them)."""
    return (layer * num_blocks + block) * kv_heads + head


class PackedRequest:
    """The sub-blocks each (layer, KV head) of one compressed request owns, and the rows each holds.

    Built by :meth:`pack` from the request's prompt, kept in vLLM's usual layout in its blocks of
    ``buffer`` (``[layers * num_blocks, kv_heads, block_size, 2 * head_dim]``, every layer's cache a
    view of it). The request's first ``keep_blocks`` blocks, in every layer, form one pool of
    sub-blocks shared by all its (layer, head) pairs; the caller gives back the others.
    """

    def __init__(self, num_layers: int, num_blocks: int, kv_heads: int, block_size: int):
        self.num_layers, self.num_blocks = num_layers, num_blocks
        self.kv_heads, self.block_size = kv_heads, block_size
        self.tables: list[list[int]] = [[] for _ in range(num_layers * kv_heads)]
        self.lengths: list[int] = [0] * (num_layers * kv_heads)
        self.free: deque[int] = deque()

    def add_blocks(self, block_ids: list[int]) -> None:
        """Blocks the scheduler gave the request: all their sub-blocks join its free pool."""
        self.free.extend(
            layer_sub_block(layer, block, head, self.num_blocks, self.kv_heads)
            for block in block_ids
            for layer in range(self.num_layers)
            for head in range(self.kv_heads)
        )

    def _take(self, pair: int) -> int:
        if not self.free:
            raise RuntimeError(
                f"the request's blocks are full: (layer, head) {divmod(pair, self.kv_heads)} needs a sub-block"
            )
        sub_block = self.free.popleft()
        self.tables[pair].append(sub_block)
        return sub_block

    @classmethod
    def pack(
        cls,
        buffer: torch.Tensor,
        num_layers: int,
        block_ids: list[int],
        keep_blocks: int,
        kept_positions: list[torch.Tensor],
        isa: str,
    ) -> PackedRequest:
        """Move the kept prompt rows (``kept_positions[layer * kv_heads + head]``) into packed sub-blocks."""
        total_blocks, kv_heads, block_size, _ = buffer.shape
        num_blocks = total_blocks // num_layers
        if len(kept_positions) != num_layers * kv_heads:
            raise ValueError(
                f"need kept positions for {num_layers * kv_heads} (layer, head) pairs, got {len(kept_positions)}"
            )
        packed = cls(num_layers, num_blocks, kv_heads, block_size)
        blocks = torch.tensor(block_ids, dtype=torch.int64)
        source = []
        for pair, positions in enumerate(kept_positions):
            layer, head = divmod(pair, kv_heads)
            sub_blocks = layer_sub_block(layer, blocks, head, num_blocks, kv_heads)
            source.append(row_slots(sub_blocks, positions.to(torch.int64), block_size))
        slots = torch.cat(source)
        keys, values = read_rows(buffer, slots, isa)
        packed.add_blocks(block_ids[:keep_blocks])
        destination = []
        for pair, positions in enumerate(kept_positions):
            rows = len(positions)
            for _ in range(-(-rows // block_size)):
                packed._take(pair)
            own = torch.tensor(packed.tables[pair], dtype=torch.int64)
            destination.append(row_slots(own, torch.arange(rows), block_size))
            packed.lengths[pair] = rows
        write_rows(buffer, torch.cat(destination), keys, values, isa)
        return packed

    def append(self, buffer: torch.Tensor, layer: int, keys: torch.Tensor, values: torch.Tensor, isa: str) -> None:
        """One decoded token's ``keys``/``values`` ``[kv_heads, head_dim]`` of ``layer``, after each head's rows."""
        slots = []
        for head in range(self.kv_heads):
            pair = layer * self.kv_heads + head
            offset = self.lengths[pair] % self.block_size
            sub_block = self._take(pair) if offset == 0 else self.tables[pair][-1]
            slots.append(sub_block * self.block_size + offset)
            self.lengths[pair] += 1
        write_rows(buffer, torch.tensor(slots, dtype=torch.int64), keys, values, isa)

    def layer_tables(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tables [kv_heads, max sub-blocks], lengths [kv_heads])`` of ``layer``, for :func:`ragged_decode`."""
        pairs = range(layer * self.kv_heads, (layer + 1) * self.kv_heads)
        width = max(len(self.tables[pair]) for pair in pairs)
        table = torch.zeros(self.kv_heads, width, dtype=torch.int32)
        for row, pair in enumerate(pairs):
            table[row, : len(self.tables[pair])] = torch.tensor(self.tables[pair], dtype=torch.int32)
        return table, torch.tensor([self.lengths[pair] for pair in pairs], dtype=torch.int32)
