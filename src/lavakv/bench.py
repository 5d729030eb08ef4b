"""Speed and memory of compressed caches against the full cache, measured side by side in one process.

For one prompt length, ``run_bench`` measures the full cache (transformers' ``DynamicCache``),
every (method, budget) with its own compressing prefill, and a reference: a full cache that
only ever saw ``B`` tokens, which is what a compressed cache of budget ``B`` would cost if it
had no overhead. Per configuration it records:

* prefill wall time, and what compression added to it (``PhaseClock``: scoring, allocation,
  and the total including selection and packing);
* decode time per token: the median over ``decode_tokens`` greedy steps, each a full model call;
* the cache's key/value bytes after prefill, and the bytes of the kept entries alone;
* peak memory: the process's resident set (``/proc/self/statm``) sampled every millisecond by a
  background thread, reported above the resident set right before the prefill, i.e. above the
  loaded model. glibc is told to serve allocations of 64 KiB and more with ``mmap`` so that freed
  tensors leave the resident set at once; otherwise freed memory would hide later peaks.

CPU timings are wall-clock (``time.perf_counter``); torch's CPU kernels are synchronous.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache

from .cache import CompressedCache
from .methods import resolve_method

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
    "llama3-layout-350m": dict(LLAMA3_LAYOUT, num_hidden_layers=4),
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


def limit_malloc_caching() -> bool:
    """Make glibc return freed large blocks to the system at once, so resident memory tracks live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 64 * 1024))


def resident_bytes() -> int | None:
    """The process's resident set size (Linux), or ``None`` where ``/proc`` is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakResident:
    """Peak resident memory while the ``with`` block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes() or 0)
            time.sleep(self.interval)

    def __enter__(self) -> PeakResident:
        self.peak = resident_bytes() or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes() or 0)


def random_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight model from ``RANDOM_MODELS`` (for speed and memory only; it has no tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .attention import prepare_model

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


def _decode(model, cache, first_token: torch.Tensor, steps: int) -> tuple[float, int]:
    """Median seconds per greedy step over ``steps`` steps, and peak resident bytes during them."""
    times = []
    token = first_token
    with PeakResident() as peak, torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak.peak


def _prefill(model, input_ids: torch.Tensor, cache) -> tuple[float, int, torch.Tensor]:
    with PeakResident() as peak, torch.inference_mode():
        start = time.perf_counter()
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        seconds = time.perf_counter() - start
    return seconds, peak.peak, logits[:, -1:].argmax(-1)


def warm_up(model, input_ids: torch.Tensor, tokens: int = 256) -> None:
    """One short prefill and two decode steps, so that one-time setup costs fall outside every measurement."""
    cache = DynamicCache()
    _, _, token = _prefill(model, input_ids[:, :tokens], cache)
    _decode(model, cache, token, 2)
    del cache
    gc.collect()


def _dynamic_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _settle() -> int:
    gc.collect()
    return resident_bytes() or 0


def measure_full(model, input_ids: torch.Tensor, decode_tokens: int, model_name: str) -> Measurement:
    """The uncompressed cache: prefill and decode with transformers' ``DynamicCache``."""
    base = _settle()
    cache = DynamicCache()
    seconds, prefill_peak, token = _prefill(model, input_ids, cache)
    kv_bytes = _dynamic_bytes(cache)
    per_token, decode_peak = _decode(model, cache, token, decode_tokens)
    return Measurement(
        model=model_name,
        prompt_tokens=input_ids.shape[1],
        method="full",
        budget=None,
        prefill_seconds=seconds,
        score_seconds=0.0,
        allocate_seconds=0.0,
        compress_seconds=0.0,
        decode_ms_per_token=per_token * 1000,
        decode_tokens=decode_tokens,
        kv_bytes=kv_bytes,
        index_bytes=0,
        kept_entry_bytes=kv_bytes,
        prefill_peak_bytes=prefill_peak - base,
        decode_peak_bytes=decode_peak - base,
    )


def measure_reference(model, input_ids: torch.Tensor, budget: int, decode_tokens: int, model_name: str) -> Measurement:
    """A full cache that saw only the prompt's first ``budget`` tokens: the ideal cost of budget ``budget``."""
    base = _settle()
    cache = DynamicCache()
    _, _, token = _prefill(model, input_ids[:, :budget], cache)
    kv_bytes = _dynamic_bytes(cache)
    per_token, decode_peak = _decode(model, cache, token, decode_tokens)
    return Measurement(
        model=model_name,
        prompt_tokens=input_ids.shape[1],
        method="reference",
        budget=budget,
        prefill_seconds=None,
        score_seconds=0.0,
        allocate_seconds=0.0,
        compress_seconds=0.0,
        decode_ms_per_token=per_token * 1000,
        decode_tokens=decode_tokens,
        kv_bytes=kv_bytes,
        index_bytes=0,
        kept_entry_bytes=kv_bytes,
        prefill_peak_bytes=None,
        decode_peak_bytes=decode_peak - base,
    )


def measure_method(
    model, input_ids: torch.Tensor, method: str, budget: int, decode_tokens: int, model_name: str
) -> Measurement:
    """One method at one budget: a compressing prefill, then greedy decoding from its cache."""
    base = _settle()
    cache = CompressedCache(model, method=method, budget=budget)
    seconds, prefill_peak, token = _prefill(model, input_ids, cache)
    kv_bytes, index_bytes = cache.kv_bytes(), cache.index_bytes()
    layer = cache.layers[0]
    kept_entry_bytes = cache.kept_entries() * 2 * layer.prefix_keys.shape[-1] * layer.prefix_keys.element_size()
    per_token, decode_peak = _decode(model, cache, token, decode_tokens)
    clock = cache.clock.seconds
    return Measurement(
        model=model_name,
        prompt_tokens=input_ids.shape[1],
        method=method,
        budget=budget,
        prefill_seconds=seconds,
        score_seconds=clock["score"],
        allocate_seconds=clock["allocate"],
        compress_seconds=clock["total"],
        decode_ms_per_token=per_token * 1000,
        decode_tokens=decode_tokens,
        kv_bytes=kv_bytes,
        index_bytes=index_bytes,
        kept_entry_bytes=kept_entry_bytes,
        prefill_peak_bytes=prefill_peak - base,
        decode_peak_bytes=decode_peak - base,
        cache_peak_prefill_bytes=cache.peak_prefill_bytes,
    )


def check_bench_arguments(
    methods: Iterable[str], budgets: Iterable[int], prompt_tokens: int, decode_tokens: int
) -> None:
    """Clear errors for a bad benchmark request, before any model work."""
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 1:
        raise ValueError(f"decode tokens must be an integer >= 1, got {decode_tokens!r}")
    if prompt_tokens < 2:
        raise ValueError(f"prompt length must be at least 2 tokens, got {prompt_tokens}")
    for method in methods:
        resolved = resolve_method(method)
        if not resolved.compresses:
            raise ValueError(f"method {method!r} does not compress; the full cache is always measured")
        for budget in budgets:
            if budget <= resolved.window:
                raise ValueError(f"budget {budget} must exceed {method}'s window of {resolved.window} tokens")
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
    """Measure the full cache, the ``B``-token references and every (method, budget), one after another.

    ``done(m)`` may skip configurations already measured (the sweep resumes with it); every new
    measurement is passed to ``on_result`` as soon as it exists.
    """
    methods, budgets = list(methods), list(budgets)
    check_bench_arguments(methods, budgets, input_ids.shape[1], decode_tokens)
    limit_malloc_caching()
    warm_up(model, input_ids)
    plan: list[tuple[str, int | None]] = [("full", None)]
    plan += [("reference", budget) for budget in budgets]
    plan += [(method, budget) for budget in budgets for method in methods]
    results = []
    for method, budget in plan:
        probe = Measurement(model_name, input_ids.shape[1], method, budget, None, 0, 0, 0, 0, 0, 0, 0, 0, None, 0)
        if done is not None and done(probe):
            continue
        if method == "full":
            result = measure_full(model, input_ids, decode_tokens, model_name)
        elif method == "reference":
            result = measure_reference(model, input_ids, budget, decode_tokens, model_name)
        else:
            result = measure_method(model, input_ids, method, budget, decode_tokens, model_name)
        results.append(result)
        if on_result is not None:
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


def format_table(results: list[Measurement]) -> str:
    """A markdown table of the measurements with ratios to the full cache."""
    header = (
        "| method | budget | prefill s | compression % | decode ms/token | decode speed-up | KV MiB | KV / full "
        "| KV / kept | peak prefill MiB | peak decode MiB |"
    )
    lines = [header, "|" + "---|" * 11]
    for row in ratios(results):

        def fmt(value, pattern: str) -> str:
            return "–" if value is None else format(value, pattern)

        lines.append(
            "| {method} | {budget} | {prefill} | {share} | {decode} | {speedup} | {kv} | {fraction} | {kept} "
            "| {peak_prefill} | {peak_decode} |".format(
                method=row["method"],
                budget=row["budget"] if row["budget"] is not None else "–",
                prefill=fmt(row["prefill_seconds"], ".2f"),
                share=fmt(100 * row["compress_share_of_full_prefill"], ".1f")
                if row["method"]
                not in (
                    "full",
                    "reference",
                )
                else "–",
                decode=fmt(row["decode_ms_per_token"], ".1f"),
                speedup=fmt(row.get("decode_speedup"), ".2f") + "x" if "decode_speedup" in row else "–",
                kv=fmt(row["kv_bytes"] / MIB, ".2f"),
                fraction=fmt(row.get("kv_bytes_fraction"), ".3f"),
                kept=fmt(row["kv_bytes_over_kept"], ".3f"),
                peak_prefill=fmt(
                    row["prefill_peak_bytes"] / MIB if row["prefill_peak_bytes"] is not None else None, ".0f"
                ),
                peak_decode=fmt(row["decode_peak_bytes"] / MIB, ".0f"),
            )
        )
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

    model, tokenizer = load_model(name, quiet=True)
    return model, tokenizer, name or DEFAULT_MODEL
