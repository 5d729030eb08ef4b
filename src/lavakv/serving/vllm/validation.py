"""Each request's ``lavakv_*`` options, checked when vLLM admits it.

vLLM calls ``validate_params`` of every logits processor plugin on each request before it reaches
the engine, and turns a ``ValueError`` into an HTTP 400 while the server keeps serving. This
processor changes no logits.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from ..prompt import PromptCompression
from ..requests import OPTION_KEYS, compression_of_request, server_compression
from . import ENABLE_VARIABLE, enabled


class LavakvRequestCheck(LogitsProcessor):
    """Refuses a request whose lavakv options are bad, naming the value; logits pass unchanged."""

    server_default = None
    """The server's default compression (``additional_config``), set by lavakv's platform in each process."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra_args = sampling_params.extra_args or {}
        given = [key for key in extra_args if key.startswith("lavakv")]
        if not given:
            return
        if not enabled():
            raise ValueError(
                f"request options {sorted(given)} need a server started with {ENABLE_VARIABLE}=1 (lavakv's plugin)"
            )
        default = cls.server_default
        if default is None and "lavakv_method" not in extra_args and set(given) <= set(OPTION_KEYS):
            raise ValueError("lavakv_budget was given without lavakv_method, and the server sets no default method")
        compression = compression_of_request(extra_args, default)
        if compression is not None and compression.compresses:
            PromptCompression.check_servable(compression)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        type(self).server_default = server_compression(vllm_config.additional_config)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        return None
