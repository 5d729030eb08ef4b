"""vLLM's CPU worker and model runner, with lavakv's :class:`ServingState` bound to every attention layer.

The runner finds the one KV buffer that vLLM 0.32 places all layers in (layer-outermost), hands
it to the state as ``[layers * num_blocks, kv_heads, block_size, 2 * head_dim]``, and before each
forward tells the state the step's batch in its final order.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from ..requests import RequestCompression, compression_of_request, server_compression
from .backend import LavakvCPUAttentionImpl, LavakvCPUMetadataBuilder
from .state import BatchRow, ServingState

logger = logging.getLogger(__name__)

RECORD_VARIABLE = "LAVAKV_VLLM_RECORD"
"""A directory where the worker saves each compressed prompt's kept positions (see :class:`ServingState`)."""


def all_layers_buffer(layer_caches: list[torch.Tensor]) -> torch.Tensor:
    """The caches of all layers as one tensor, when vLLM placed them back to back (layer-outermost)."""
    first = layer_caches[0]
    num_blocks, kv_heads, block_size, twice_dim = first.shape
    layer_bytes = first.numel() * first.element_size()
    for index, cache in enumerate(layer_caches):
        if not cache.is_contiguous() or cache.shape != first.shape:
            raise RuntimeError(f"layer {index}'s KV cache is not a contiguous {tuple(first.shape)} tensor")
        if cache.data_ptr() != first.data_ptr() + index * layer_bytes:
            raise RuntimeError(
                "lavakv needs vLLM's layer-outermost KV cache layout (all layers back to back in one buffer); "
                f"layer {index} is not where it would be"
            )
    return torch.as_strided(
        first,
        (len(layer_caches) * num_blocks, kv_heads, block_size, twice_dim),
        (kv_heads * block_size * twice_dim, block_size * twice_dim, twice_dim, 1),
    )


class LavakvCPUModelRunner(CPUModelRunner):
    """vLLM's CPU model runner that tells lavakv's attention layers what each step holds."""

    serving: ServingState | None = None

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False, kv_cache_allocation_context=None):
        super().initialize_kv_cache(
            kv_cache_config, is_profiling, kv_cache_allocation_context=kv_cache_allocation_context
        )
        self.lavakv_default = server_compression(self.vllm_config.additional_config)
        self.lavakv_compressions: dict[str, RequestCompression | None] = {}
        layers = {
            name: module
            for name, module in self.compilation_config.static_forward_context.items()
            if isinstance(module, Attention)
        }
        ordered = sorted(layers, key=extract_layer_index)
        impls = [layers[name].impl for name in ordered]
        foreign = [type(impl).__name__ for impl in impls if not isinstance(impl, LavakvCPUAttentionImpl)]
        if foreign:
            raise RuntimeError(f"lavakv's vLLM plugin needs its own attention backend on every layer, got {foreign}")
        buffer = all_layers_buffer([layers[name].kv_cache for name in ordered])
        isa = getattr(layers[ordered[0]], "isa", "vec")
        self.serving = ServingState(buffer, len(ordered), isa, os.environ.get(RECORD_VARIABLE) or None)
        for index, impl in enumerate(impls):
            impl.bind(self.serving, index)
        for builder in (
            builder for groups in self.attn_groups for group in groups for builder in group.metadata_builders
        ):
            if isinstance(builder, LavakvCPUMetadataBuilder):
                builder.serving = self.serving
        logger.info(
            "lavakv: %d layers share one KV buffer of %d blocks of %d tokens (kernel %s)",
            len(ordered),
            self.serving.num_blocks,
            self.serving.block_size,
            isa,
        )

    def _update_states(self, scheduler_output):
        if self.serving is not None:
            self.serving.forget(scheduler_output.finished_req_ids)
            self.serving.forget(scheduler_output.preempted_req_ids or ())
            for request_id in scheduler_output.finished_req_ids:
                self.lavakv_compressions.pop(request_id, None)
        return super()._update_states(scheduler_output)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        try:
            return super().execute_model(scheduler_output, intermediate_tensors)
        finally:
            if self.serving is not None:
                self.serving.end_step()

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        prepared = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self.serving is not None:
            rows, start = [], 0
            for index, request_id in enumerate(self.input_batch.req_ids):
                state = self.requests[request_id]
                scheduled = int(num_scheduled_tokens[index])
                if request_id not in self.lavakv_compressions:
                    params = state.sampling_params
                    extra_args = params.extra_args if params is not None else None
                    self.lavakv_compressions[request_id] = compression_of_request(extra_args, self.lavakv_default)
                compression = self.lavakv_compressions[request_id]
                rows.append(
                    BatchRow(request_id, start, scheduled, state.num_computed_tokens, state.block_ids[0], compression)
                )
                start += scheduled
            self.serving.begin_step(rows)
        return prepared


class LavakvCPUWorker(CPUWorker):
    """vLLM's CPU worker running :class:`LavakvCPUModelRunner`."""

    def init_device(self):
        super().init_device()
        self.model_runner = LavakvCPUModelRunner(self.vllm_config, torch.device("cpu"))
