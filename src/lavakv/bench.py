"""Speed and memory of compressed caches against the full cache, measured side by side in one process.

For one prompt length, ``run_bench`` measures the full cache (transformers' ``DynamicCache``),
every (method, budget) with its own compressing prefill, and a reference: a full cache that
only ever saw ``B`` tokens, which is what a compressed cache of budget ``B`` would cost if it
had no overhead. Per configuration it records:

* prefill wall time, and what compression added to it (``PhaseClock``: scoring, allocation,
  and the total including selection and packing);
* decode time per token: the median over ``decode_tokens`` greedy steps, each a full model call,
  taken round-robin over all configurations so that the machine's slow spells hit them alike;
* the cache's key/value bytes after prefill, and the bytes of the kept entries alone;
* peak memory: the process's resident set (``/proc/self/statm``) sampled every millisecond by a
  background thread. Prefill: the peak above the resident set right before the prefill. Decode:
  the cache's bytes plus the most one step added above the resident set before it. Before each
  prefill, glibc's free heap pages are handed back to the system (``malloc_trim``) so that memory
  freed earlier does not hide this one's peak; the allocator is otherwise left at its defaults,
  so timings are what users get.

CPU timings are wall-clock (``time.perf_counter``); torch's CPU kernels are synchronous.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .attention import model_forward, prepare_model
from .cache import CompressedCache
from .methods import Budget, parse_spec

MIB = 2**20
BENCH_METHODS = ("snapkv", "ada-snapkv", "cake", "lava")
LLAMA3_LAYOUT = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    max_position_embeddings=32768,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
RANDOM_MODELS = {
    "llama3-layout-1b": dict(LLAMA3_LAYOUT, num_hidden_layers=16),
    "llama3-layout-400m": dict(LLAMA3_LAYOUT, num_hidden_layers=4),
}
"""Random-weight Llamas with Llama 3's attention layout (32 query / 8 KV heads, GQA 4, head dim 128)."""


@dataclass
class Measurement:
    """One configuration of a benchmark run; ``method`` is ``full``, a method name, or ``reference``."""

    model: str
    prompt_tokens: int
    method: str
    budget: int | None
    prefill_seconds: float | None
    score_seconds: float
    allocate_seconds: float
    compress_seconds: float
    decode_ms_per_token: float
    decode_tokens: int
    kv_bytes: int
    index_bytes: int
    kept_entry_bytes: int
    prefill_peak_bytes: int | None
    decode_peak_bytes: int
    cache_peak_prefill_bytes: int | None = None

    @property
    def key(self) -> tuple:
        return (self.model, self.prompt_tokens, self.method, self.budget)


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system, so the next baseline is clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_bytes() -> int | None:
    """The process's resident set size (Linux), or ``None`` where ``/proc`` is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class ResidentSampler:
    """Peak resident memory per phase, sampled every ``interval`` seconds by one background thread.

    >>> with ResidentSampler() as sampler:
    ...     with sampler.phase() as phase:
    ...         work()
    ...     phase.peak - phase.start      # bytes the work added at its peak
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self._active: _Phase | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            active = self._active
            if active is not None:
                active.peak = max(active.peak, resident_bytes() or 0)
                active.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> ResidentSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def phase(self) -> Iterator[_Phase]:
        current = _Phase(resident_bytes() or 0)
        current.peak = current.start
        self._active = current
        try:
            yield current
        finally:
            self._active = None
            current.peak = max(current.peak, resident_bytes() or 0)


@dataclass
class _Phase:
    start: int
    peak: int = 0
    samples: int = 0
    """Readings the background thread took during the phase (how often a transient could be seen)."""

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight model from ``RANDOM_MODELS`` (for speed and memory only; it has no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; valid names: {', '.join(RANDOM_MODELS)}")
    torch.manual_seed(seed)
    config = LlamaConfig(**RANDOM_MODELS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.weight.fill_(1.0)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.eval()
    return prepare_model(model)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class _Prepared:
    """A configuration after its prefill, waiting for the interleaved decode."""

    measurement: Measurement
    cache: object
    token: torch.Tensor
    step_seconds: list[float]
    decode_added: int = 0


def _step(model, cache, token: torch.Tensor) -> torch.Tensor:
    logits = model_forward(model, cache, input_ids=token).logits
    return logits[:, -1:].argmax(-1)


def warm_up(model, input_ids: torch.Tensor, tokens: int = 256) -> None:
    """One short prefill and two decode steps, so that one-time setup costs fall outside every measurement."""
    cache = DynamicCache()
    with torch.inference_mode():
        logits = model_forward(model, cache, input_ids=input_ids[:, :tokens]).logits
        token = logits[:, -1:].argmax(-1)
        for _ in range(2):
            token = _step(model, cache, token)
    del cache
    release_free_memory()


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def prefill(
    model, input_ids: torch.Tensor, method: str, budget: int | None, model_name: str, sampler: ResidentSampler
) -> _Prepared:
    """Prefill one configuration: ``full`` (DynamicCache), ``reference`` (DynamicCache of ``budget``
    tokens) or a method at ``budget`` (CompressedCache), measuring time, compression phases and memory."""
    release_free_memory()
    if method == "full":
        cache, prompt = DynamicCache(), input_ids
    elif method == "reference":
        cache, prompt = DynamicCache(), input_ids[:, :budget]
    else:
        cache, prompt = CompressedCache(model, method=method, budget=budget), input_ids
    with sampler.phase() as phase, torch.inference_mode():
        start = time.perf_counter()
        logits = model_forward(model, cache, input_ids=prompt, logits_to_keep=1).logits
        seconds = time.perf_counter() - start
    if isinstance(cache, CompressedCache):
        stats = cache.stats(positions=False)
        kv_bytes, index_bytes, kept_entry_bytes = stats.kv_bytes, stats.index_bytes, stats.kept_entry_bytes
        clock, cache_peak = stats.compression_seconds, stats.peak_prefill_bytes
    else:
        kv_bytes = kept_entry_bytes = _dynamic_bytes(cache)
        index_bytes, clock, cache_peak = 0, {"score": 0.0, "allocate": 0.0, "total": 0.0}, None
    measurement = Measurement(
        model=model_name,
        prompt_tokens=input_ids.shape[1],
        method=method,
        budget=budget,
        prefill_seconds=None if method == "reference" else seconds,
        score_seconds=clock["score"],
        allocate_seconds=clock["allocate"],
        compress_seconds=clock["total"],
        decode_ms_per_token=0.0,
        decode_tokens=0,
        kv_bytes=kv_bytes,
        index_bytes=index_bytes,
        kept_entry_bytes=kept_entry_bytes,
        prefill_peak_bytes=None if method == "reference" else phase.added,
        decode_peak_bytes=0,
        cache_peak_prefill_bytes=cache_peak,
    )
    return _Prepared(measurement, cache, logits[:, -1:].argmax(-1), [])


def decode_interleaved(model, prepared: list[_Prepared], steps: int, sampler: ResidentSampler) -> None:
    """Greedy steps taken round-robin over the configurations, so that a slow spell of a noisy
    machine hits all of them alike. Fills in the median time per step and the decode memory:
    the cache's bytes plus the most any one step added."""
    with torch.inference_mode():
        for _ in range(steps):
            for item in prepared:
                with sampler.phase() as phase:
                    start = time.perf_counter()
                    item.token = _step(model, item.cache, item.token)
                    item.step_seconds.append(time.perf_counter() - start)
                item.decode_added = max(item.decode_added, phase.added)
    for item in prepared:
        item.measurement.decode_ms_per_token = statistics.median(item.step_seconds) * 1000
        item.measurement.decode_tokens = steps
        item.measurement.decode_peak_bytes = item.measurement.kv_bytes + item.decode_added


def check_bench_arguments(
    methods: Iterable[str], budgets: Iterable[int], prompt_tokens: int, decode_tokens: int
) -> None:
    """Clear errors for a bad benchmark request, before any model work."""
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode tokens must be an integer >= 1, got {decode_tokens!r}")
    if prompt_tokens < 2:
        raise ValueError(f"prompt length must be at least 2 tokens, got {prompt_tokens}")
    for method in methods:
        resolved = parse_spec(method)
        if not resolved.compresses:
            raise ValueError(f"method {method!r} does not compress; the full cache is always measured")
        for budget in budgets:
            try:
                resolved.check_budget(Budget(tokens=budget))
            except ValueError as error:
                raise ValueError(f"{method}: {error}") from None
            if budget >= prompt_tokens:
                raise ValueError(f"budget {budget} must be smaller than the prompt ({prompt_tokens} tokens)")


def run_bench(
    model,
    input_ids: torch.Tensor,
    methods: Iterable[str] = BENCH_METHODS,
    budgets: Iterable[int] = (128, 512),
    decode_tokens: int = 64,
    model_name: str = "model",
    done: Callable[[Measurement], bool] | None = None,
    on_result: Callable[[Measurement], None] | None = None,
) -> list[Measurement]:
    """Measure the full cache, the ``B``-token references and every (method, budget) on one prompt.

    Each configuration is prefilled in turn (and keeps its cache), then all of them decode
    ``decode_tokens`` steps interleaved. ``done(m)`` may skip configurations already measured
    (the sweep resumes with it); the measurements are passed to ``on_result`` at the end.
    """
    methods, budgets = list(methods), list(budgets)
    check_bench_arguments(methods, budgets, input_ids.shape[1], decode_tokens)
    plan: list[tuple[str, int | None]] = [("full", None)]
    plan += [("reference", budget) for budget in budgets]
    plan += [(method, budget) for budget in budgets for method in methods]
    model_tokens = input_ids.shape[1]
    plan = [
        (method, budget)
        for method, budget in plan
        if done is None or not done(Measurement(model_name, model_tokens, method, budget, *[None] * 11))
    ]
    if not plan:
        return []
    warm_up(model, input_ids)
    with ResidentSampler() as sampler:
        prepared = [prefill(model, input_ids, method, budget, model_name, sampler) for method, budget in plan]
        decode_interleaved(model, prepared, decode_tokens, sampler)
    results = [item.measurement for item in prepared]
    del prepared
    release_free_memory()
    if on_result is not None:
        for result in results:
            on_result(result)
    return results


def ratios(results: list[Measurement]) -> list[dict]:
    """Each measurement as a dict with its ratios to the full cache of the same model and length."""
    full = {(m.model, m.prompt_tokens): m for m in results if m.method == "full"}
    rows = []
    for m in results:
        row = asdict(m)
        reference = full.get((m.model, m.prompt_tokens))
        if reference is not None:
            row["decode_speedup"] = reference.decode_ms_per_token / m.decode_ms_per_token
            row["kv_bytes_fraction"] = m.kv_bytes / reference.kv_bytes
            row["compress_share_of_full_prefill"] = m.compress_seconds / reference.prefill_seconds
        row["kv_bytes_over_kept"] = m.kv_bytes / m.kept_entry_bytes if m.kept_entry_bytes else None
        rows.append(row)
    return rows


def _fmt(value: float | None, pattern: str, scale: float = 1.0, suffix: str = "") -> str:
    return "–" if value is None else format(value / scale, pattern) + suffix


def format_table(results: list[Measurement]) -> str:
    """A markdown table of the measurements with ratios to the full cache.

    "KV peak in prefill" is the key/value memory the cache held at its fullest during the
    prefill (lavakv's own accounting; the full cache's final size for the full cache);
    "process peak" columns are resident-memory measurements (see the module docstring).
    """
    header = (
        "| method | budget | prefill s | compression % | decode ms/token | decode speed-up | KV MiB | KV / full "
        "| KV / kept | KV peak in prefill MiB | process peak prefill MiB | process peak decode MiB |"
    )
    lines = [header, "|" + "---|" * 12]
    for row in ratios(results):
        compressed = row["method"] not in ("full", "reference")
        kv_peak = row["cache_peak_prefill_bytes"] if compressed else row["kv_bytes"]
        cells = [
            row["method"],
            "–" if row["budget"] is None else str(row["budget"]),
            _fmt(row["prefill_seconds"], ".2f"),
            _fmt(row.get("compress_share_of_full_prefill") if compressed else None, ".1f", 0.01),
            _fmt(row["decode_ms_per_token"], ".1f"),
            _fmt(row.get("decode_speedup"), ".2f", suffix="x"),
            _fmt(row["kv_bytes"], ".2f", MIB),
            _fmt(row.get("kv_bytes_fraction"), ".3f"),
            _fmt(row["kv_bytes_over_kept"], ".3f"),
            _fmt(kv_peak if row["method"] != "reference" else None, ".1f", MIB),
            _fmt(row["prefill_peak_bytes"], ".0f", MIB),
            _fmt(row["decode_peak_bytes"], ".0f", MIB),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_prompt(tokenizer, tokens: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``[1, tokens]`` prompt ids: a passkey prompt cut to length for a real model, random ids without tokenizer."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (1, tokens), generator=generator)
    from .passkey import passkey_prompt

    ids = tokenizer(passkey_prompt(tokenizer, tokens + 64, 0.5, seed=seed).text)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"could not build a {tokens}-token prompt (got {len(ids)})")
    return torch.tensor([ids[-tokens:]])


def load_bench_model(name: str | None):
    """``(model, tokenizer or None, name)``: a random model from ``RANDOM_MODELS``, or what ``load_model`` takes."""
    if name in RANDOM_MODELS:
        return random_model(name), None, name
    from .models import DEFAULT_MODEL, load_model

    model, tokenizer = load_model(name)
    return model, tokenizer, name or DEFAULT_MODEL


def compression_overhead(
    model,
    input_ids: torch.Tensor,
    methods: Iterable[str] = BENCH_METHODS,
    budgets: Iterable[int] = (128, 512),
    repeats: int = 3,
) -> list[dict]:
    """Compression time on its own, against the full cache's prefill time, medians of ``repeats``.

    One recorded prefill is replayed into fresh caches exactly as a compressing prefill runs
    (progressive where the method is, every score computed anew), so the figure is free of the
    model's own time and of the machine's slow spells during a 10-second prefill. The full
    prefills and the replays alternate, round after round.
    """
    from .recording import PrefillRecord

    methods, budgets = list(methods), list(budgets)
    check_bench_arguments(methods, budgets, input_ids.shape[1], 1)
    warm_up(model, input_ids)
    record = PrefillRecord(model, input_ids)
    full_seconds: list[float] = []
    clocks: dict[tuple[str, int], list[dict]] = {(m, b): [] for m in methods for b in budgets}
    for _ in range(repeats):
        with torch.inference_mode():
            start = time.perf_counter()
            model_forward(model, DynamicCache(), input_ids=input_ids, logits_to_keep=1)
            full_seconds.append(time.perf_counter() - start)
        for method, budget in clocks:
            progressive = parse_spec(method).progressive
            cache = record.compress(method, budget, progressive=progressive, reuse_scores=False)
            clocks[(method, budget)].append(cache.stats(positions=False).compression_seconds)
    full = statistics.median(full_seconds)
    rows = []
    for (method, budget), runs in clocks.items():
        phases = {name: statistics.median(run[name] for run in runs) for name in ("score", "allocate", "total")}
        rows.append(
            {
                "prompt_tokens": input_ids.shape[1],
                "method": method,
                "budget": budget,
                "repeats": repeats,
                "full_prefill_seconds": full,
                "score_seconds": phases["score"],
                "allocate_seconds": phases["allocate"],
                "compress_seconds": phases["total"],
                "share_of_full_prefill": phases["total"] / full,
            }
        )
    return rows


MEMORY_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_memory(text: str) -> int:
    """Bytes of a memory size such as ``80GiB``, ``141GB`` or ``512MiB``; a bad size is a ``ValueError``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in MEMORY_UNITS:
        raise ValueError(
            f"memory size must be a number with a unit (GiB, GB, MiB, MB, KiB, KB or B), e.g. 80GiB, got {text!r}"
        )
    size = int(float(match.group(1)) * MEMORY_UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return size


@dataclass
class Capacity:
    """How many sequences of one prompt length fit in ``memory_bytes`` with one cache configuration.

    ``sequence_bytes`` is what one finished sequence holds: its cache's key/value and index bytes
    after the prefill (measured) plus ``generate_tokens`` appended tokens at the exact per-token
    bytes. ``prefill_peak_bytes`` is the most the process grew while prefilling one sequence
    (activations and the cache at its fullest, measured). Sequences are prefilled one at a time
    while the finished ones wait, so ``sequences`` is the largest ``n`` with
    ``model_bytes + (n - 1) * sequence_bytes + prefill_peak_bytes <= memory_bytes``.
    """

    method: str
    budget: int | None
    prompt_tokens: int
    generate_tokens: int
    memory_bytes: int
    model_bytes: int
    sequence_bytes: int
    prefill_peak_bytes: int
    sequences: int


def sequences_that_fit(memory: int, model_bytes: int, sequence_bytes: int, prefill_peak: int) -> int:
    """The largest ``n`` with ``model_bytes + (n - 1) * sequence_bytes + prefill_peak <= memory`` (0 if none)."""
    room = memory - model_bytes - prefill_peak
    if room < 0:
        return 0
    return 1 + room // max(1, sequence_bytes)


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def token_kv_bytes(model) -> int:
    """Key/value bytes one more token adds to a sequence's cache (every layer and KV head)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * config.num_key_value_heads * 2 * head_dim * element


def measure_capacity(
    model,
    input_ids: torch.Tensor,
    memory_bytes: int,
    methods: Iterable[str] = BENCH_METHODS,
    budgets: Iterable[int] = (128, 512),
    generate_tokens: int = 0,
) -> list[Capacity]:
    """Capacity of the full cache and of every (method, budget) for this prompt, from one measured prefill each."""
    methods, budgets = list(methods), list(budgets)
    check_bench_arguments(methods, budgets, input_ids.shape[1], 1)
    if isinstance(generate_tokens, bool) or not isinstance(generate_tokens, int) or generate_tokens < 0:
        raise ValueError(f"generate tokens must be an integer >= 0, got {generate_tokens!r}")
    weights = model_bytes(model)
    per_token = token_kv_bytes(model)
    warm_up(model, input_ids)
    results = []
    plan = [("full", None)] + [(method, budget) for budget in budgets for method in methods]
    with ResidentSampler() as sampler:
        for method, budget in plan:
            prepared = prefill(model, input_ids, method, budget, "model", sampler)
            measured = prepared.measurement
            del prepared
            sequence = measured.kv_bytes + measured.index_bytes + generate_tokens * per_token
            peak = max(measured.prefill_peak_bytes or 0, measured.kv_bytes)
            results.append(
                Capacity(
                    method=method,
                    budget=budget,
                    prompt_tokens=input_ids.shape[1],
                    generate_tokens=generate_tokens,
                    memory_bytes=memory_bytes,
                    model_bytes=weights,
                    sequence_bytes=sequence,
                    prefill_peak_bytes=peak,
                    sequences=sequences_that_fit(memory_bytes, weights, sequence, peak),
                )
            )
    release_free_memory()
    return results


def format_capacity(results: list[Capacity]) -> str:
    """A markdown table of :func:`measure_capacity`'s results, with each configuration's gain over the full cache."""
    first = results[0]
    full = next((r.sequences for r in results if r.method == "full"), 0)
    lines = [
        f"Capacity in {first.memory_bytes / 2**30:.2f} GiB: {first.prompt_tokens}-token prompts, "
        f"{first.generate_tokens} generated tokens each, model {first.model_bytes / MIB:.0f} MiB",
        "",
        "| cache | budget | MiB per sequence | prefill peak MiB | sequences | vs full |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gain = f"{r.sequences / full:.1f}x" if full else ("-" if not r.sequences else "only this fits")
        lines.append(
            f"| {r.method} | {r.budget or '-'} | {r.sequence_bytes / MIB:.2f} | {r.prefill_peak_bytes / MIB:.1f} "
            f"| {r.sequences} | {gain} |"
        )
    return "\n".join(lines)
