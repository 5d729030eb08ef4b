"""``evaluate(config)``: the one entry point of an evaluation, for ``lavakv eval`` and scripts alike.

An :class:`EvalConfig` says everything a run depends on: the benchmarks with their options, the
methods and budgets, the model, the protocol and the prompt length policy, sharding. ``evaluate``
checks it all before loading the model where it can, settles the run's identity (what its rows
depend on, so that a resumed run cannot mix settings), and runs every benchmark into the run
directory's store. Interrupted, it resumes where it stopped when called again with the same config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..cachefile import head_identity
from ..methods import PAPER_METHODS, Method
from .benchmarks import Benchmark
from .metrics import SCORING
from .runner import (
    CHAT_TEMPLATE_MODES,
    DEFAULT_DECODE_BATCH,
    EVAL_WINDOW_IDENTITY,
    LONGBENCH_CONTEXT_MARGIN,
    PROMPT_TOKENIZATION,
    Pair,
    check_decode_batch,
    check_protocol,
    make_pairs,
    plan,
    progress_bar,
    run,
)
from .samples import Sample, interleave_datasets
from .shards import resolve_shard
from .store import ResultRow, ResultStore, read_run

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BUDGETS = (32, 64, 128, 256)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: ``benchmarks`` x ``methods`` x ``budgets`` into the run directory ``out``.

    ``budgets=None`` is :data:`DEFAULT_EVAL_BUDGETS`; ``window=None`` lets each method's window be
    at most half its budget. ``max_length=None`` cuts file benchmarks to the model's context minus
    :data:`~lavakv.eval.runner.LONGBENCH_CONTEXT_MARGIN`, as LongBench's model table does, and
    builds generated ones to fit the context. ``device="auto"`` is the launcher's GPU, else cuda,
    else cpu. ``command`` is logged with the run (the CLI's argv).
    """

    benchmarks: tuple[Benchmark, ...]
    out: str
    methods: tuple[str | Method, ...] = PAPER_METHODS
    budgets: tuple[int, ...] | None = None
    window: int | None = None
    model: str | None = None
    device: str = "auto"
    protocol: str = "query-aware"
    chat_template: str = "auto"
    max_length: int | None = None
    decode_batch: int = DEFAULT_DECODE_BATCH
    shard: str | None = None
    shard_store: str | None = None
    retry_errors: bool = False
    from_scratch: bool = False
    progress: bool = True
    command: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.benchmarks:
            raise ValueError("an evaluation needs at least one benchmark")
        names = [benchmark.name for benchmark in self.benchmarks]
        if len(set(names)) < len(names):
            raise ValueError(f"a benchmark is named twice in {', '.join(names)}; give each once")
        check_protocol(self.protocol)
        if self.chat_template not in CHAT_TEMPLATE_MODES:
            raise ValueError(
                f"chat_template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {self.chat_template!r}"
            )
        check_decode_batch(self.decode_batch)
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ValueError(f"--max-length must be an integer >= 2 (tokens kept of a prompt), got {self.max_length}")

    def pairs(self) -> list[Pair]:
        """The ``(method, budget)`` pairs; a budget or window given to methods that all keep everything is an error."""
        budgets = list(DEFAULT_EVAL_BUDGETS if self.budgets is None else self.budgets)
        pairs = make_pairs(list(self.methods), budgets, self.window)
        if all(pair.budget is None for pair in pairs):
            budgets_text = None if self.budgets is None else ",".join(map(str, self.budgets))
            for option, value in (("--budgets", budgets_text), ("--window", self.window)):
                if value is not None:
                    methods = ",".join(map(str, self.methods))
                    raise ValueError(f"{option} {value} has no effect: no method in --methods {methods} compresses")
        return pairs

    @property
    def seed(self) -> int | list[int]:
        """The seed of the generated benchmarks, as the identity records it (0 when none is generated)."""
        seeds = sorted({benchmark.seed for benchmark in self.benchmarks if hasattr(benchmark, "seed")})
        return seeds[0] if len(seeds) == 1 else seeds or 0


@dataclass(frozen=True)
class EvalResult:
    """What a run directory holds after :func:`evaluate`: every row of every shard, and how many this call wrote."""

    out: Path
    rows: list[ResultRow]
    written: int

    @property
    def errors(self) -> int:
        return sum(row.error is not None for row in self.rows)


@dataclass(frozen=True)
class PromptLengths:
    """The prompt length policy of a run, settled against the model's context (:func:`settle_lengths`)."""

    max_length: int
    context: int
    generated_max_length: int | None

    def of(self, benchmark: Benchmark, config: EvalConfig) -> int:
        """Generated benchmarks are built to fit the context unless ``--max-length`` is given."""
        return self.max_length if benchmark.reads_files or config.max_length else self.context


def evaluate(config: EvalConfig, model=None, tokenizer=None, environ: Mapping[str, str] | None = None) -> EvalResult:
    """Run ``config`` into its run directory, resuming what an earlier call left; returns the directory's rows.

    ``model`` and ``tokenizer`` skip loading ``config.model`` (a script that times several runs
    loads it once); the identity still records ``config.model``. ``environ`` is where
    ``shard="auto"`` reads its launcher's variables (the process's environment by default).
    """
    pairs = config.pairs()
    placement = resolve_shard(config.shard, config.shard_store, os.environ if environ is None else environ)
    for benchmark in config.benchmarks:
        if config.max_length is not None:
            benchmark.check_fits(config.max_length, "--max-length")
        if benchmark.reads_files and getattr(benchmark, "data", None) and not Path(benchmark.data).is_dir():
            raise FileNotFoundError(f"--data {benchmark.data}: no such directory")
    from_files = {b.name: _samples(b, None, config) for b in config.benchmarks if b.reads_files}
    ResultStore(config.out, name=placement.store_name).close()
    if model is None:
        from ..models import load_model

        model, tokenizer = load_model(config.model, device=eval_device(config.device, placement.local_rank))
    if config.chat_template == "on" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat-template on: the model's tokenizer has no chat template; use auto or off")
    profiled = [pair.method for pair in pairs if pair.method.reads_profile]
    if profiled:
        identity = head_identity(model)
        for method in profiled:
            method.check_model(identity)
    lengths = settle_lengths(config, model)
    samples = {
        b.name: interleave_datasets(from_files.get(b.name) or _samples(b, tokenizer, config)) for b in config.benchmarks
    }
    written = _run_all(config, model, tokenizer, pairs, samples, lengths, placement)
    _, rows = read_run(config.out)
    return EvalResult(Path(config.out), rows, written)


def _samples(benchmark: Benchmark, tokenizer, config: EvalConfig) -> list[Sample]:
    samples = benchmark.samples(tokenizer, chat_template=config.chat_template != "off")
    if not samples:
        data = getattr(benchmark, "data", None)
        where = f" in --data {data}" if benchmark.reads_files else ""
        datasets = ",".join(getattr(benchmark, "datasets", None) or ()) or "all present"
        raise ValueError(f"--benchmark {benchmark.name} has no samples{where} (datasets: {datasets})")
    return samples


def settle_lengths(config: EvalConfig, model) -> PromptLengths:
    """``--max-length`` against the model's context: refused when it exceeds it or leaves no room."""
    from ..prompting import context_length

    context = context_length(model)
    if context is None and config.max_length is None:
        raise ValueError("the model's config states no context length: give --max-length")
    if config.max_length is None:
        for benchmark in config.benchmarks:
            benchmark.check_fits(context, "the model's context")
    elif context is not None and config.max_length > context:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's context of {context} tokens")
    files = [b.name for b in config.benchmarks if b.reads_files]
    if config.max_length is None and files and context - LONGBENCH_CONTEXT_MARGIN < 2:
        raise ValueError(
            f"the model's context of {context} tokens leaves no room for {', '.join(files)}'s default --max-length "
            f"(the context minus {LONGBENCH_CONTEXT_MARGIN}): give --max-length"
        )
    max_length = config.max_length or (context - LONGBENCH_CONTEXT_MARGIN if files else context)
    mixed = config.max_length is None and files and len(files) < len(config.benchmarks)
    return PromptLengths(max_length, context if context is not None else max_length, context if mixed else None)


def run_identity(config: EvalConfig, max_length: int, generated_max_length: int | None = None) -> dict[str, object]:
    """What every row of the run depends on; a resumed run must match it (``ResultStore.claim_identity``)."""
    identity = {
        "model": model_identity(config.model),
        "protocol": config.protocol,
        "chat_template": config.chat_template,
        "max_length": max_length,
        "seed": config.seed,
        "window": config.window if config.window is not None else EVAL_WINDOW_IDENTITY,
        "scoring": SCORING,
        "prompt_tokens": PROMPT_TOKENIZATION,
    }
    if generated_max_length is not None:
        identity["generated_max_length"] = generated_max_length
    return identity


def _run_all(config, model, tokenizer, pairs, samples: dict[str, list[Sample]], lengths: PromptLengths, placement):
    shard = placement.part
    written = 0
    with ResultStore(config.out, name=placement.store_name) as store:
        store.claim_identity(run_identity(config, lengths.max_length, lengths.generated_max_length))
        store.log_invocation(config.command or " ".join(sys.argv), logged_config(config))
        pending = {
            name: sum(len(p) for _, p in plan(samples[name], pairs, store, shard, config.retry_errors))
            for name in samples
        }
        where = f"shard {shard[0]}/{shard[1]}, " if shard[1] > 1 else ""
        for name in samples:
            logger.info(
                "%s: %d rows to do (%s%d samples x %d pairs)",
                name,
                pending[name],
                where,
                len(samples[name]),
                len(pairs),
            )
        overall = progress_bar(sum(pending.values()), "all benchmarks", config.progress, position=0)
        try:
            for benchmark in config.benchmarks:
                written += run(
                    model,
                    tokenizer,
                    samples[benchmark.name],
                    pairs,
                    store,
                    protocol=config.protocol,
                    chat_template=config.chat_template,
                    max_length=lengths.of(benchmark, config),
                    shard=shard,
                    from_scratch=config.from_scratch,
                    progress=config.progress,
                    description=benchmark.name,
                    overall=overall,
                    decode_batch=config.decode_batch,
                    retry_errors=config.retry_errors,
                )
        finally:
            overall.close()
    return written


def logged_config(config: EvalConfig) -> dict:
    """The config as the store's invocation log keeps it (JSON); :func:`recorded_config` reads it back."""
    return {
        "benchmarks": [{"name": b.name, **vars(b)} for b in config.benchmarks],
        **{key: value for key, value in vars(config).items() if key not in ("benchmarks", "methods", "command")},
        "methods": [getattr(method, "spec", method) for method in config.methods],
    }


def recorded_config(directory: str | Path) -> EvalConfig | None:
    """The config of the latest ``evaluate`` call logged in a run directory (``None`` for a fresh one).

    Another engine joining the run (``benchmarks/kvpress/engine.py``) builds the same samples and
    identity from it.
    """
    from .benchmarks import create_benchmark
    from .store import store_paths

    latest: tuple[float, dict] | None = None
    for path in store_paths(Path(directory)):
        with ResultStore(directory, create=False, name=path.name) as store:
            for started, _, logged in store.invocations():
                if "benchmarks" in logged and "engine" not in logged and (latest is None or started > latest[0]):
                    latest = (started, logged)
    if latest is None:
        return None
    logged = dict(latest[1])
    benchmarks = tuple(create_benchmark(**options) for options in logged.pop("benchmarks"))
    names = {f for f in EvalConfig.__dataclass_fields__ if f not in ("benchmarks", "out", "command")}
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in logged.items() if key in names}
    return EvalConfig(benchmarks=benchmarks, out=str(directory), **values)


def model_identity(path: str | None) -> str:
    """A model's name in a run's identity: a registered name as it is, a path made absolute."""
    from ..models import DEFAULT_MODEL, MODELS

    name = DEFAULT_MODEL if path is None else path
    return name if name in MODELS else str(Path(path).resolve())


def eval_device(device: str, local_rank: int | None) -> str:
    """``--device``: ``auto`` is the launcher's GPU (``LOCAL_RANK``), else ``cuda`` when there is one, else ``cpu``.

    A device torch cannot parse, or one this machine does not have, is an error before any work.
    """
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{local_rank}" if local_rank is not None else "cuda"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device; valid: auto, cpu, cuda, cuda:N, mps") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if parsed.index is not None and parsed.index >= count or count == 0:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s); use auto or cpu")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use auto or cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: lavakv eval runs on cpu, cuda or mps")
    return device
