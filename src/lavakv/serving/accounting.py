"""How many vLLM KV blocks a request holds, with and without compression.

vLLM's paged cache gives every layer a tensor of blocks; one block id spans all layers, and a
block of one layer holds ``block_size`` tokens for each of its KV heads. lavakv's head-packed
layout cuts each (block, KV head) of a layer into a *sub-block* of ``block_size`` rows of one head
(docs/SERVING.md), so a KV head keeps exactly the rows it needs, in its own sub-blocks.
"""

from __future__ import annotations

from collections.abc import Sequence


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def sub_blocks_needed(rows_per_head: Sequence[int], block_size: int) -> int:
    """Sub-blocks for KV heads holding ``rows_per_head`` rows each: ``sum(ceil(rows / block_size))``."""
    return sum(_ceil_div(rows, block_size) for rows in rows_per_head)


def blocks_for_compressed(budget: int, decoded: int, block_size: int) -> int:
    """Blocks a request compressed to ``budget`` entries per KV head per layer holds after ``decoded`` tokens.

    Every method keeps ``budget * kv_heads * layers`` prompt entries in all (LAVa, Ada-KV and CAKE
    move budget between heads and layers, not in or out), and every head gains one row per decoded
    token. With the request's sub-blocks shared by all its (layer, head) pairs (the layers' tensors
    are views of one buffer, so a layer may read a sub-block of another's), the rows need at most
    ``(budget + decoded) / block_size`` blocks plus one sub-block of rounding per pair, which is one
    block more: ``ceil((budget + decoded) / block_size) + 1``. A uniform budget that is a multiple
    of the block size needs no rounding; the bound stays the same so that the scheduler can size a
    request before its scores exist.
    """
    if budget < 1 or decoded < 0 or block_size < 1:
        raise ValueError(
            f"budget >= 1, decoded >= 0 and block_size >= 1 are needed, got {budget}, {decoded}, {block_size}"
        )
    return _ceil_div(budget + decoded, block_size) + 1


def kept_prompt_blocks(budget: int, block_size: int, ragged: bool = True) -> int:
    """Leading blocks of a prompt that a compressed request keeps to hold its packed prompt rows.

    ``ceil(budget / block_size)``, plus one for the rounding of ``ragged`` budgets (heads or layers
    keeping different numbers of rows: one sub-block of rounding per pair, as in
    :func:`blocks_for_compressed`). The scheduler frees the prompt's other blocks except the one
    holding its last position, where vLLM goes on counting the decoded tokens; that block leaves
    every head room for its next rows until vLLM's next block arrives. With the same rows in every
    (layer, head) the heads' tails fill together, and that block alone is enough.
    """
    if budget < 1 or block_size < 1:
        raise ValueError(f"budget >= 1 and block_size >= 1 are needed, got {budget} and {block_size}")
    return _ceil_div(budget, block_size) + (1 if ragged else 0)


def compression_frees_blocks(prompt_tokens: int, budget: int, block_size: int, ragged: bool = True) -> bool:
    """Whether compressing a prompt gives any block back: more prompt blocks than the kept ones and the last.

    A prompt that fits in those (a budget close to its length) is served with its whole cache:
    packing it would free nothing, and its blocks could not hold every head's decoded rows until
    vLLM's next block.
    """
    prompt_blocks = _ceil_div(prompt_tokens, block_size)
    return prompt_blocks - 1 > kept_prompt_blocks(budget, block_size, ragged)
