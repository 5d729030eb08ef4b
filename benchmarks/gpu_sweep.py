"""Long contexts on a GPU: a random-weight Llama-3.1-8B layout in bfloat16 at 32K, 64K and 128K tokens.

    python3 benchmarks/gpu_sweep.py                      # one H100/H200: under 8 minutes
    .venv/bin/python benchmarks/gpu_sweep.py --tiny --device cpu --out /tmp/sweep.json
    .venv/bin/python benchmarks/gpu_sweep.py --report    # rewrite the page from the committed JSON

For each prompt length: the full cache (transformers' ``DynamicCache`` with the model's SDPA
attention, flash kernels on a GPU) and snapkv, ada-snapkv and lava at budgets 128 and 1024, each
with its own compressing prefill (progressive for LAVa). Measured: prefill seconds, the share of
it spent compressing (the cache's phase clock), peak GPU memory during the prefill
(``torch.cuda.max_memory_allocated`` above the weights), KV bytes held, decode ms/token (median
of ``--decode-steps`` greedy steps, CUDA-synchronised) and the speed-up over the full cache. At
the first length it also finds the largest batch that fits in the card (``--memory``, default
the card's free memory): the batch-1 cache is repeated (``batch_repeat_interleave``) to the
largest batch whose cache, decode growth and one step's activations fit beside the weights
(capped at ``--max-batch``), and that batch decodes too, so tokens per second can be compared.

Every row is appended to ``--out`` as soon as it is measured, so a run cut short keeps what it
measured and a rerun skips it. The model is built on the device from its config with random
weights (no download); nothing but torch, transformers and lavakv is needed. On a machine whose
transformers is older than lavakv needs, carry a wheel (``pip download transformers --no-deps``)
and put it first on ``PYTHONPATH``. ``--tiny`` runs a two-layer model at 256 and 512 tokens with
budgets 48 and 96 so that CI exercises every step on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu_sweep.json"
PAGE = RESULTS.with_suffix(".md")
PLOT = ROOT / "benchmarks" / "results" / "gpu_sweep.png"

LLAMA31_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
)
TINY = dict(
    LLAMA31_8B,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
)
DEFAULTS = {"lengths": "32768,65536,131072", "budgets": "128,1024"}
TINY_DEFAULTS = {"lengths": "256,512", "budgets": "48,96"}
METHODS = ("snapkv", "ada-snapkv", "lava")


def build_model(layout: dict, device: torch.device, dtype: torch.dtype):
    """A Llama of ``layout`` with random weights, created directly on ``device`` (no host copy of 16 GB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lavakv.attention import prepare_model

    torch.manual_seed(0)
    config = LlamaConfig(**layout)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    return prepare_model(model.eval())


class Device:
    """Synchronisation and memory readings for one device (CPU readings are ``None``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def free(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.cuda else None


def kv_bytes(cache) -> int:
    from lavakv import CompressedCache

    if isinstance(cache, CompressedCache):
        return cache.stats(positions=False).kv_bytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def new_cache(model, method: str, budget: int | None, attention_path: str):
    from transformers import DynamicCache

    from lavakv import CompressedCache

    if method == "full":
        return DynamicCache(config=model.config)
    return CompressedCache(model, method=method, budget=budget, attention_path=attention_path)


def decode(model, cache, token: torch.Tensor, steps: int, device: Device) -> list[float]:
    """Greedy steps; seconds per step, each synchronised."""
    from lavakv.attention import model_forward

    seconds = []
    with torch.inference_mode():
        for _ in range(steps):
            device.sync()
            start = time.perf_counter()
            token = model_forward(model, cache, input_ids=token).logits[:, -1:].argmax(-1)
            device.sync()
            seconds.append(time.perf_counter() - start)
    return seconds


def measure(model, prompt: torch.Tensor, method: str, budget: int | None, args, device: Device) -> tuple[dict, object]:
    """One compressing (or full) prefill of ``prompt`` and its decode at batch 1."""
    from lavakv import CompressedCache
    from lavakv.attention import model_forward

    base = device.reset_peak()
    cache = new_cache(model, method, budget, args.attention_path)
    with torch.inference_mode():
        device.sync()
        start = time.perf_counter()
        logits = model_forward(model, cache, input_ids=prompt, logits_to_keep=1).logits
        device.sync()
        prefill_seconds = time.perf_counter() - start
    peak = device.peak()
    token = logits[:, -1:].argmax(-1)
    compress_seconds, paths = 0.0, []
    if isinstance(cache, CompressedCache):
        stats = cache.stats(positions=False)
        compress_seconds, paths = stats.compression_seconds["total"], stats.attention_paths
    steps = decode(model, cache, token, args.decode_steps, device)
    row = {
        "prompt_tokens": prompt.shape[1],
        "method": method,
        "budget": budget,
        "batch": 1,
        "prefill_seconds": prefill_seconds,
        "compress_seconds": compress_seconds,
        "compression_share": compress_seconds / prefill_seconds,
        "prefill_peak_bytes": None if peak is None else peak - base,
        "kv_bytes": kv_bytes(cache),
        "decode_ms_per_token": 1000 * statistics.median(steps),
        "decode_steps": len(steps),
        "attention_paths": paths,
    }
    return row, (cache, token)


def largest_batch(row: dict, layout: dict, dtype: torch.dtype, memory: int | None, args) -> int:
    """The most copies of a batch-1 cache that fit in ``memory`` (90% of it) beside what is already held.

    Per sequence: its cache after the prefill, the tokens the decode appends, and one step's
    activations (logits, the MLP's intermediate, and one layer's padded view of its entries).
    """
    if memory is None:
        return min(args.max_batch, args.cpu_batch)
    element = torch.finfo(dtype).bits // 8
    layers = layout["num_hidden_layers"]
    token_kv = layers * 2 * layout["num_key_value_heads"] * layout["head_dim"] * element
    activations = layout["vocab_size"] * 4 + layout["intermediate_size"] * 2 * element + 4 * row["kv_bytes"] // layers
    per_sequence = row["kv_bytes"] + args.decode_steps * token_kv + activations
    return max(1, min(args.max_batch, int(0.9 * memory) // per_sequence))


def decode_batch(model, state, batch: int, args, device: Device) -> dict:
    cache, token = state
    cache.batch_repeat_interleave(batch)
    tokens = token.repeat_interleave(batch, dim=0)
    steps = decode(model, cache, tokens, args.decode_steps, device)
    step = statistics.median(steps)
    return {"batch": batch, "decode_ms_per_token": 1000 * step, "tokens_per_second": batch / step}


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"environment": {}, "rows": []}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)


def sweep(args) -> dict:
    import transformers

    device = Device(torch.device(args.device))
    if device.cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    out = Path(args.out)
    data = load(out)
    layout = TINY if args.tiny else LLAMA31_8B
    started = time.perf_counter()
    model = build_model(layout, device.device, dtype)
    device.sync()
    data["environment"] = {
        "device": torch.cuda.get_device_name(device.device) if device.cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "model": "tiny" if args.tiny else "llama-3.1-8b layout, random weights",
        "weights_bytes": sum(p.nbytes for p in model.parameters()),
        "build_seconds": time.perf_counter() - started,
    }
    done = {(r["prompt_tokens"], r["method"], r["budget"], r.get("batch_kind", "one")) for r in data["rows"]}
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    plan = [("full", None)] + [(m, b) for b in budgets for m in args.methods.split(",")]
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(1, layout["vocab_size"], (1, min(lengths[0], 2048)), generator=generator)
    for method, budget in plan:  # compile, allocate and tune once, outside every measurement
        measure(model, warm.to(device.device), method, min(budget or 64, warm.shape[1] // 2), args, device)
    for length in lengths:
        prompt = torch.randint(1, layout["vocab_size"], (1, length), generator=generator).to(device.device)
        for method, budget in plan:
            if (length, method, budget, "one") in done:
                continue
            row, state = measure(model, prompt, method, budget, args, device)
            data["rows"].append(row)
            save(out, data)
            print(json.dumps(row), flush=True)
            if length == lengths[0] and (length, method, budget, "max") not in done:
                memory = args.memory if args.memory is not None else device.free()
                batch = largest_batch(row, layout, dtype, memory, args)
                result = dict(row, **decode_batch(model, state, batch, args, device), batch_kind="max")
                data["rows"].append(result)
                save(out, data)
                print(json.dumps(result), flush=True)
            del state
            if device.cuda:
                torch.cuda.empty_cache()
    data["environment"]["total_seconds"] = time.perf_counter() - started
    save(out, data)
    return data


def report(data: dict, page: Path = PAGE, plot: Path = PLOT) -> str:
    env, rows = data.get("environment", {}), data.get("rows", [])
    on_gpu = env.get("device", "cpu") != "cpu" and not env.get("model", "").startswith("tiny")
    lines = [
        "# GPU sweep: Llama-3.1-8B layout, bfloat16, 32K to 128K tokens",
        "",
        "Written by `benchmarks/gpu_sweep.py --report` from `benchmarks/results/gpu_sweep.json`; the run is "
        "`python3 benchmarks/gpu_sweep.py` on one H100/H200 (random weights built on the card, no download).",
        "",
    ]
    if not on_gpu:
        lines += [
            "**Not measured on a GPU yet.** No session of this project has had a GPU for it; the script runs in CI in "
            "its tiny CPU configuration (`--tiny --device cpu`), which checks every step but measures nothing "
            "worth quoting. Its table and plot appear here once the sweep runs on a card.",
            "",
        ]
    if not rows:
        text = "\n".join(lines)
        page.write_text(text)
        return text
    lines += [
        f"Device: {env.get('device', '-')}, torch {env.get('torch', '-')}, transformers "
        f"{env.get('transformers', '-')}, {env.get('dtype', '-')}; model: {env.get('model', '-')}.",
        "",
        "| prompt tokens | method | budget | batch | prefill s | compression % | peak prefill GiB | KV MiB | "
        "decode ms/token | tokens/s | speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full = {(r["prompt_tokens"], r.get("batch_kind", "one")): r for r in rows if r["method"] == "full"}
    for r in rows:
        kind = r.get("batch_kind", "one")
        tokens = r.get("tokens_per_second") or 1000 / r["decode_ms_per_token"]
        reference = full.get((r["prompt_tokens"], kind))
        speedup = None
        if reference is not None:
            speedup = tokens / (reference.get("tokens_per_second") or 1000 / reference["decode_ms_per_token"])
        peak = r.get("prefill_peak_bytes")
        lines.append(
            f"| {r['prompt_tokens']} | {r['method']} | {r['budget'] or '-'} | {r['batch']} | "
            f"{r['prefill_seconds']:.2f} | {100 * r['compression_share']:.1f} | "
            f"{'-' if peak is None else f'{peak / 2**30:.1f}'} | {r['kv_bytes'] / 2**20:.1f} | "
            f"{r['decode_ms_per_token']:.2f} | {tokens:.0f} | {'-' if speedup is None else f'{speedup:.2f}x'} |"
        )
    lines += [
        "",
        "*batch* above 1 is the largest batch whose caches fit in the card at the first length (the batch-1 cache "
        "repeated, capped at `--max-batch`), decoding together; *speed-up* is tokens per second against the full "
        "cache at batch 1 (for batch-1 rows) or at its own largest batch (for the others). KV MiB is the batch-1 "
        "cache after the prefill.",
    ]
    write_plot(rows, plot)
    lines += ["", f"![decode time and peak memory against prompt length]({plot.name})"]
    text = "\n".join(lines) + "\n"
    page.write_text(text)
    return text


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    single = [r for r in rows if r.get("batch_kind") is None]
    for method, budget in sorted({(r["method"], r["budget"] or 0) for r in single}):
        chosen = [r for r in single if r["method"] == method and (r["budget"] or 0) == budget]
        points = [(r["prompt_tokens"], r) for r in sorted(chosen, key=lambda r: r["prompt_tokens"])]
        label = "full cache" if method == "full" else f"{method} {budget}"
        axes[0].plot([n for n, _ in points], [r["decode_ms_per_token"] for _, r in points], marker="o", label=label)
        peaks = [(n, r["prefill_peak_bytes"]) for n, r in points if r.get("prefill_peak_bytes") is not None]
        if peaks:
            axes[1].plot([n for n, _ in peaks], [p / 2**30 for _, p in peaks], marker="o", label=label)
    axes[0].set(xlabel="prompt tokens", ylabel="decode ms/token (batch 1)", xscale="log")
    axes[1].set(xlabel="prompt tokens", ylabel="peak prefill memory above weights (GiB)", xscale="log")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tiny", action="store_true", help="two-layer model, short prompts (CI on a CPU)")
    parser.add_argument("--lengths", help=f"default {DEFAULTS['lengths']} ({TINY_DEFAULTS['lengths']} with --tiny)")
    parser.add_argument("--budgets", help=f"default {DEFAULTS['budgets']} ({TINY_DEFAULTS['budgets']} with --tiny)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--attention-path", default="auto", choices=("auto", "gather", "flex"))
    parser.add_argument("--memory", type=int, help="bytes for the largest-batch search (default: the card's free)")
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--cpu-batch", type=int, default=4, help="the 'largest batch' on a CPU, which has no card")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--report", action="store_true", help="rewrite the page from --out and stop")
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else DEFAULTS
    args.lengths = args.lengths or defaults["lengths"]
    args.budgets = args.budgets or defaults["budgets"]
    if args.decode_steps < 1 or args.max_batch < 1:
        parser.error(f"--decode-steps and --max-batch must be >= 1, got {args.decode_steps} and {args.max_batch}")
    out = Path(args.out)
    data = load(out) if args.report else sweep(args)
    page = PAGE if out == RESULTS else out.with_suffix(".md")
    plot = PLOT if out == RESULTS else out.with_suffix(".png")
    print(report(data, page, plot))


if __name__ == "__main__":
    main()
