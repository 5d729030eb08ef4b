"""What a vLLM worker knows of its compressed requests, and what each step does with each of them.

The model runner owns one :class:`ServingState`. Before a step's forward it calls
:meth:`ServingState.begin_step` with the batch in its final order; every attention layer then
reads the step's plan (:class:`StepPlan`): which token rows prefill a prompt that is compressed
after the last layer, which rows decode a compressed request through its packed rows, and which
rows take vLLM's usual path. The packed rows of each compressed request live in the one KV buffer
of all layers (:class:`~lavakv.serving.cpu_layout.PackedRequest`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..accounting import compression_frees_blocks, kept_prompt_blocks
from ..cpu_layout import PackedRequest
from ..prompt import PromptCompression
from ..requests import RequestCompression

logger = logging.getLogger(__name__)


@dataclass
class Prefill:
    """One request whose whole prompt is prefilled in this step and compressed after the last layer."""

    request_id: str
    start: int
    end: int
    block_ids: list[int]
    compression: PromptCompression
    budget: int
    ragged: bool


@dataclass
class Decode:
    """One compressed request decoding one token in this step, at token row ``row``."""

    request_id: str
    row: int
    batch_index: int
    packed: PackedRequest


@dataclass
class StepPlan:
    """The token rows of one step, by the path each takes through attention."""

    prefills: list[Prefill] = field(default_factory=list)
    decodes: list[Decode] = field(default_factory=list)
    stock_rows: torch.Tensor | None = None
    """Rows that vLLM's own kernel writes to the cache; ``None`` when every row does."""

    @property
    def decode_rows(self) -> torch.Tensor:
        return torch.tensor([decode.row for decode in self.decodes], dtype=torch.int64)


@dataclass
class BatchRow:
    """One request of a step as the runner sees it."""

    request_id: str
    start: int
    scheduled: int
    computed: int
    block_ids: list[int]
    compression: RequestCompression | None


class ServingState:
    """The packed compressed requests of one worker and the plan of the step in flight.

    ``buffer`` is the KV cache of all layers as one tensor ``[layers * num_blocks, kv_heads,
    block_size, 2 * head_dim]``; ``isa`` the CPU kernel variant vLLM chose for it. With
    ``record_dir``, each compressed prompt's kept positions per (layer, KV head) are saved there as
    ``{request_id}.pt`` (to compare them with the transformers path's).
    """

    def __init__(self, buffer: torch.Tensor, num_layers: int, isa: str, record_dir: str | None = None):
        self.buffer = buffer
        self.record_dir = record_dir
        self.num_layers = num_layers
        self.num_blocks = buffer.shape[0] // num_layers
        self.kv_heads, self.block_size = buffer.shape[1], buffer.shape[2]
        self.isa = isa
        self.packed: dict[str, PackedRequest] = {}
        self.known_blocks: dict[str, int] = {}
        self.step = StepPlan()

    def forget(self, request_ids) -> None:
        """Drop finished or preempted requests (their blocks went back to vLLM's pool)."""
        for request_id in request_ids:
            self.packed.pop(request_id, None)
            self.known_blocks.pop(request_id, None)

    def begin_step(self, rows: list[BatchRow]) -> StepPlan:
        """Plan the step whose batch is ``rows`` (in the order of the step's token rows)."""
        plan = StepPlan()
        stock: list[torch.Tensor] = []
        for index, row in enumerate(rows):
            if row.request_id in self.packed and row.computed > 0:
                if row.scheduled != 1:
                    raise RuntimeError(
                        f"request {row.request_id!r} is compressed and was scheduled {row.scheduled} tokens in one "
                        "step; compressed requests decode one token per step (speculative decoding is off for them)"
                    )
                packed = self.packed[row.request_id]
                self._add_new_blocks(row, packed)
                plan.decodes.append(Decode(row.request_id, row.start, index, packed))
                continue
            self.forget([row.request_id])
            compression = row.compression
            if compression is not None and compression.compresses and row.computed == 0:
                if not compression_frees_blocks(row.scheduled, compression.budget, self.block_size, compression.ragged):
                    logger.info(
                        "request %s: a prompt of %d tokens at budget %d frees no block of %d tokens; kept whole",
                        row.request_id,
                        row.scheduled,
                        compression.budget,
                        self.block_size,
                    )
                    stock.append(torch.arange(row.start, row.start + row.scheduled))
                    continue
                compression = PromptCompression(row.compression, row.scheduled, self.num_layers)
                plan.prefills.append(
                    Prefill(
                        row.request_id,
                        row.start,
                        row.start + row.scheduled,
                        list(row.block_ids),
                        compression,
                        row.compression.budget,
                        row.compression.ragged,
                    )
                )
            elif compression is not None and compression.compresses:
                raise RuntimeError(
                    f"request {row.request_id!r} is compressed but its prompt was split across steps "
                    f"({row.computed} tokens computed before this one); compressed prompts are prefilled whole"
                )
            stock.append(torch.arange(row.start, row.start + row.scheduled))
        if plan.decodes:
            plan.stock_rows = torch.cat(stock) if stock else torch.empty(0, dtype=torch.int64)
        self.step = plan
        return plan

    def end_step(self) -> None:
        """Forget the step's plan once its forward is done (a warm-up or dummy forward then sees none)."""
        self.step = StepPlan()

    def _add_new_blocks(self, row: BatchRow, packed: PackedRequest) -> None:
        known = self.known_blocks[row.request_id]
        if len(row.block_ids) > known:
            packed.add_blocks(row.block_ids[known:])
            self.known_blocks[row.request_id] = len(row.block_ids)

    def finish_prefill(self, prefill: Prefill) -> None:
        """Pack a prompt compressed after the last layer into its kept blocks (and its last block)."""
        kept = []
        for layer in range(self.num_layers):
            positions, _, _ = prefill.compression.kept(layer)
            kept.extend(positions)
        prompt_blocks = -(-(prefill.end - prefill.start) // self.block_size)
        blocks = prefill.block_ids[:prompt_blocks]
        keep = min(kept_prompt_blocks(prefill.budget, self.block_size, prefill.ragged), len(blocks))
        packed = PackedRequest.pack(self.buffer, self.num_layers, blocks, keep, kept, self.isa)
        tail = len(blocks) - 1
        if tail >= keep:
            packed.add_blocks([blocks[tail]])
        if len(prefill.block_ids) > len(blocks):
            packed.add_blocks(prefill.block_ids[len(blocks) :])
        self.packed[prefill.request_id] = packed
        if self.record_dir is not None:
            record = {"prompt_tokens": prefill.end - prefill.start, "kept_positions": [p.tolist() for p in kept]}
            torch.save(record, Path(self.record_dir) / f"{prefill.request_id}.pt")
        self.known_blocks[prefill.request_id] = len(prefill.block_ids)
        logger.debug(
            "request %s: %d prompt tokens packed into %d of %d blocks",
            prefill.request_id,
            prefill.end - prefill.start,
            keep + (1 if tail >= keep else 0),
            len(blocks),
        )
