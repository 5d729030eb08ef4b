"""lavakv's vLLM platform: vLLM's CPU platform with lavakv's attention backend, worker and scheduler.

vLLM's CPU platform ignores ``--attention-backend``, so a platform plugin is the place vLLM gives
for choosing the attention backend, the worker and the scheduler. This one changes nothing
else, and switches off what compressed requests cannot share, each with a logged reason.
"""

from __future__ import annotations

import logging

from vllm.platforms.cpu import CpuPlatform

from ..prompt import PromptCompression
from ..requests import server_compression

logger = logging.getLogger(__name__)

BACKEND = "lavakv.serving.vllm.backend.LavakvCPUAttentionBackend"
WORKER = "lavakv.serving.vllm.runner.LavakvCPUWorker"
SCHEDULER = "lavakv.serving.vllm.scheduler.LavakvScheduler"
DEFAULT_BLOCK_SIZE = 32
"""Tokens per block unless the user sets ``--block-size``: compressed requests free whole blocks,
so small blocks free more (vLLM's CPU default, 128, would keep at least three per request)."""


class LavakvCpuPlatform(CpuPlatform):
    """vLLM's CPU platform, serving every request through lavakv's compression."""

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        stock = super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
        if attn_selector_config.use_mla or not stock.endswith("CPUAttentionBackend"):
            raise ValueError(f"lavakv serves models with vLLM's CPU attention backend, this one uses {stock}")
        return BACKEND

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        cache_config = vllm_config.cache_config
        if not cache_config.user_specified_block_size:
            cache_config.block_size = DEFAULT_BLOCK_SIZE
            cache_config.user_specified_block_size = True
        super().check_and_update_config(vllm_config)
        from .validation import LavakvRequestCheck  # imports vLLM's sampling, which needs the platform resolved

        default = server_compression(vllm_config.additional_config)
        if default is not None and default.compresses:
            PromptCompression.check_servable(default)
        LavakvRequestCheck.server_default = default
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls in ("auto", "vllm.v1.worker.cpu_worker.CPUWorker"):
            parallel_config.worker_cls = WORKER
        scheduler_config = vllm_config.scheduler_config
        scheduler_config.scheduler_cls = SCHEDULER
        if cache_config.enable_prefix_caching:
            logger.info("lavakv: prefix caching is off (compressed requests rewrite their prompt blocks)")
            cache_config.enable_prefix_caching = False
        if scheduler_config.enable_chunked_prefill:
            logger.info("lavakv: chunked prefill is off (a prompt's scores need all of its keys in one step)")
            scheduler_config.enable_chunked_prefill = False
        model_config = vllm_config.model_config
        if model_config is not None:
            scheduler_config.max_num_batched_tokens = max(
                scheduler_config.max_num_batched_tokens, model_config.max_model_len
            )
        if vllm_config.speculative_config is not None:
            raise ValueError("lavakv's vLLM plugin does not run with speculative decoding; leave it off")
