"""lavakv inside vLLM, through vLLM's own plugin entry points (nothing of vLLM is edited or patched).

- ``vllm.platform_plugins``: :func:`platform_plugin` activates :class:`~.platform.LavakvCpuPlatform`
  when ``LAVAKV_VLLM=1`` is set; without it an installed lavakv changes nothing in vLLM.
- ``vllm.logits_processors``: :class:`~.validation.LavakvRequestCheck` checks each request's
  ``lavakv_*`` options at admission, so that a bad one is an HTTP 400 and the server keeps serving.

The submodules import vLLM; this one does not.
"""

from __future__ import annotations

import os

ENABLE_VARIABLE = "LAVAKV_VLLM"
"""Set to ``1`` to serve with lavakv's compression."""


def enabled() -> bool:
    """Whether this process serves with lavakv (``LAVAKV_VLLM=1``)."""
    return os.environ.get(ENABLE_VARIABLE, "") == "1"


def platform_plugin() -> str | None:
    """vLLM's platform plugin hook: lavakv's platform class when enabled, else ``None`` (vLLM's own)."""
    if not enabled():
        return None
    from .. import check_vllm_version

    check_vllm_version()
    return "lavakv.serving.vllm.platform.LavakvCpuPlatform"
