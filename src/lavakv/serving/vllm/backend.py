"""lavakv's attention backend for vLLM's CPU engine: vLLM's own kernels, plus the compressed requests' paths.

Rows of requests that are not compressed, and every prefill, go through vLLM's CPU attention
unchanged. After each layer of a compressed request's prefill the layer's queries, keys and values
are scored (:class:`~lavakv.serving.prompt.PromptCompression`); after the last layer the kept rows
are packed (:meth:`ServingState.finish_prefill`). A compressed request's decoded token is written
after each head's own rows and attends them through :func:`~lavakv.serving.cpu_layout.ragged_decode`.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from ..cpu_layout import ragged_decode
from .state import ServingState


class LavakvCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, with the layer's part of lavakv's compression (the runner binds :attr:`serving`)."""

    serving: ServingState | None = None
    layer_index: int = -1

    def bind(self, serving: ServingState, layer_index: int) -> None:
        self.serving, self.layer_index = serving, layer_index

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        serving = self.serving
        plan = serving.step if serving is not None else None
        if plan is None or not plan.decodes:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        for decode in plan.decodes:
            decode.packed.append(serving.buffer, self.layer_index, key[decode.row], value[decode.row], serving.isa)
        rows = plan.stock_rows
        if rows.numel():
            super().do_kv_cache_update(layer, key[rows], value[rows], kv_cache, slot_mapping[rows])

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        output = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        serving = self.serving
        if attn_metadata is None or serving is None:
            return output
        plan = serving.step
        for prefill in plan.prefills:
            rows = slice(prefill.start, prefill.end)
            prefill.compression.add_layer(self.layer_index, query[rows], key[rows], value[rows], self.scale)
            if self.layer_index == serving.num_layers - 1:
                serving.finish_prefill(prefill)
        if plan.decodes:
            tables, lengths = [], []
            for decode in plan.decodes:
                table, length = decode.packed.layer_tables(self.layer_index)
                tables.append(table)
                lengths.append(length)
            width = max(table.shape[1] for table in tables)
            head_tables = torch.cat([torch.nn.functional.pad(table, (0, width - table.shape[1])) for table in tables])
            rows = plan.decode_rows
            attended = ragged_decode(
                query[rows], serving.buffer, head_tables, torch.cat(lengths), serving.isa, self.scale
            )
            output[rows] = attended.to(output.dtype).view(output[rows].shape)
        return output


class LavakvCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU metadata, with a compressed request's decode row cut to one entry for vLLM's kernel.

    That row's attention comes from its packed rows (:func:`ragged_decode`); vLLM's kernel, which
    still runs over the whole batch, then spends nothing on it.
    """

    serving: ServingState | None = None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        plan = self.serving.step if self.serving is not None else None
        if plan is not None and plan.decodes:
            seq_lens = common_attn_metadata.seq_lens.clone()
            seq_lens[[decode.batch_index for decode in plan.decodes]] = 1
            common_attn_metadata = dataclasses.replace(common_attn_metadata, seq_lens=seq_lens)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class LavakvCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend whose layers also compress lavakv requests."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[LavakvCPUAttentionImpl]:
        return LavakvCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[LavakvCPUMetadataBuilder]:
        return LavakvCPUMetadataBuilder
