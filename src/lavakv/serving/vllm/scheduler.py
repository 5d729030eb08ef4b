"""vLLM's scheduler, giving a compressed request's freed prompt blocks back to the pool after its prefill.

In the step that prefills a compressed prompt the worker packs the kept rows into the prompt's
first :func:`~lavakv.serving.accounting.kept_prompt_blocks` blocks. Once that step's output is
in, the blocks between them and the one holding the prompt's last position are freed into vLLM's
block pool and replaced by the null block in the request's block table, the way vLLM frees the
middle of a sliding-window request (``SingleTypeKVCacheManager._remove_blocks_in_range``). vLLM
then goes on allocating blocks by position for the decoded tokens, and its accounting and
``/metrics`` see the freed blocks at once.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler

from ..accounting import compression_frees_blocks, kept_prompt_blocks
from ..requests import RequestCompression, compression_of_request, server_compression

logger = logging.getLogger(__name__)


class LavakvScheduler(Scheduler):
    """vLLM's scheduler that frees the prompt blocks a compressed request no longer needs."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.lavakv_default = server_compression(vllm_config.additional_config)
        self.lavakv_block_size = vllm_config.cache_config.block_size
        self.lavakv_freed_blocks = 0

    def lavakv_compression(self, request) -> RequestCompression | None:
        params = request.sampling_params
        return compression_of_request(params.extra_args if params is not None else None, self.lavakv_default)

    def update_from_output(self, scheduler_output, model_runner_output):
        prefilled = [
            (request_id, scheduled)
            for request_id, scheduled in scheduler_output.num_scheduled_tokens.items()
            if request_id in self.requests and self.requests[request_id].num_computed_tokens == scheduled
        ]
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request_id, scheduled in prefilled:
            request = self.requests.get(request_id)
            if request is None:
                continue
            compression = self.lavakv_compression(request)
            if compression is None or not compression.compresses:
                continue
            self._free_compressed_prompt(request_id, scheduled, compression)
        return outputs

    def _free_compressed_prompt(self, request_id: str, prompt_tokens: int, compression: RequestCompression) -> None:
        if not compression_frees_blocks(prompt_tokens, compression.budget, self.lavakv_block_size, compression.ragged):
            return
        keep = kept_prompt_blocks(compression.budget, self.lavakv_block_size, compression.ragged)
        last = -(-prompt_tokens // self.lavakv_block_size) - 1
        manager = self.kv_cache_manager.coordinator.single_type_managers[0]
        before = self.kv_cache_manager.block_pool.get_num_free_blocks()
        manager._remove_blocks_in_range(request_id, keep, last)
        freed = self.kv_cache_manager.block_pool.get_num_free_blocks() - before
        self.lavakv_freed_blocks += freed
        logger.debug("request %s compressed: %d prompt blocks freed, %d kept", request_id, freed, keep + 1)
