"""kvpress's presses over token ids that ``benchmarks/kvpress/engine.py`` prepared; runs in the kvpress venv.

    benchmarks/kvpress/.venv/bin/python benchmarks/kvpress/generate.py MODEL_DIR REQUESTS.jsonl GENERATIONS.jsonl

Each line of REQUESTS is one sample: its key, the ids to prefill (the whole prompt, or the context
for the query-agnostic protocol), the ids fed after compression (the question, or none), the
stop ids, ``max_new_tokens``, ``stop_at_newline`` and the ``[press, budget]`` pairs to run. For each
pair the press compresses the prefill (``with press(model): model(...)``, as kvpress's pipeline
prefills); then the question, if any, and greedy tokens go through the compressed cache with
positions that continue the uncompressed prompt, as the pipeline decodes. One line per pair is
appended to GENERATIONS (flushed, so a stopped run keeps what it finished): the generated token
ids, the kept entries and bytes of the compressed cache (in all and per layer), its observation
window, and timings; or the error and where it was raised. Scoring and result rows are the lavakv
side's. Only torch, transformers and kvpress are imported here (kvpress pins a transformers that
lavakv does not import under).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

PRESSES = ("full", "snapkv", "pyramidkv", "ada-snapkv")


def make_press(name: str, budget: int, length: int):
    """The press keeping ``budget`` of ``length`` prefilled tokens per KV head per layer (``None``: full cache).

    kvpress keeps ``int(length * (1 - compression_ratio))`` entries, its observation window included,
    so ``compression_ratio = 1 - (budget + 0.5) / length`` keeps exactly ``budget``.
    """
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; valid: {', '.join(PRESSES)}")
    if name == "full":
        return None
    if not 0 < budget < length:
        raise ValueError(f"budget {budget} must be between 0 and the {length} prefilled tokens")
    ratio = 1 - (budget + 0.5) / length
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "pyramidkv":
        return kvpress.PyramidKVPress(compression_ratio=ratio)
    return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))


def window_of(press) -> int | None:
    inner = getattr(press, "press", press)
    return getattr(inner, "window_size", None)


def cache_entries(model, cache: DynamicCache, press) -> tuple[int, int, list[float]]:
    """Key/value bytes held, prompt entries kept over layers and KV heads, and per layer the mean kept per head.

    AdaKV keeps every entry in memory and masks the ones it evicts; only those it did not mask count.
    """
    layers = cache.layers
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    per_layer = [layer.keys.shape[1] * layer.keys.shape[2] for layer in layers]
    if isinstance(press, kvpress.AdaKVPress):
        for index, decoder_layer in enumerate(model.model.layers):
            masked = getattr(decoder_layer.self_attn, "masked_key_indices", None)
            per_layer[index] -= 0 if masked is None else len(masked[0])
    heads = [layer.keys.shape[1] for layer in layers]
    return kv_bytes, sum(per_layer), [kept / count for kept, count in zip(per_layer, heads)]


class Generator:
    """Greedy generation through a kvpress-compressed DynamicCache, stopping as lavakv's runner stops."""

    def __init__(self, model_dir: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        config = self.model.config
        self.entries_per_token = config.num_hidden_layers * config.num_key_value_heads

    def forward(self, ids: list[int], cache: DynamicCache, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids)).unsqueeze(0)
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=positions, logits_to_keep=1)
        return out.logits[0, -1]

    def finished(self, tokens: list[int], stop_at_newline: bool) -> bool:
        return stop_at_newline and "\n" in self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    @torch.inference_mode()
    def run(self, request: dict, name: str, budget: int) -> dict:
        prefill, after = request["prefill_ids"], request["after_prefill_ids"]
        stop_ids = set(request["stop_ids"])
        press = make_press(name, budget, len(prefill))
        cache = DynamicCache()
        start = time.perf_counter()
        with press(self.model) if press is not None else contextlib.nullcontext():
            logits = self.forward(prefill, cache, 0)
        prefilled = time.perf_counter()
        kv_bytes, kept, layer_budgets = cache_entries(self.model, cache, press)
        if after:
            logits = self.forward(after, cache, len(prefill))
        position, tokens = len(prefill) + len(after), []
        for _ in range(request["max_new_tokens"]):
            tokens.append(int(logits.argmax()))
            if tokens[-1] in stop_ids or self.finished(tokens, request["stop_at_newline"]):
                break
            logits = self.forward(tokens[-1:], cache, position)
            position += 1
        return {
            "tokens": tokens,
            "kv_bytes": kv_bytes,
            "kept_entries": kept,
            "full_entries": self.entries_per_token * len(prefill),
            "layer_budgets": layer_budgets,
            "window": window_of(press),
            "prefill_seconds": prefilled - start,
            "decode_seconds": time.perf_counter() - prefilled,
        }


def describe_error(error: BaseException) -> str:
    """``Type: message (raised at FILE:LINE in FUNCTION)``, the file relative to site-packages."""
    frames = traceback.extract_tb(error.__traceback__)
    message = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if not frames:
        return message
    frame = frames[-1]
    return f"{message} (raised at {frame.filename.split('site-packages/')[-1]}:{frame.lineno} in {frame.name})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("requests", type=Path)
    parser.add_argument("generations", type=Path)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # a bar per load would drown the per-pair lines the engine passes on
    generator = Generator(args.model_dir)
    requests = [json.loads(line) for line in args.requests.read_text().splitlines() if line.strip()]
    began = time.perf_counter()
    with args.generations.open("a", encoding="utf-8") as out:
        for request in requests:
            for name, budget in request["pairs"]:
                key = {"key": request["key"], "press": name, "budget": budget}
                try:
                    result = generator.run(request, name, budget)
                except Exception as error:  # noqa: BLE001 - recorded as the pair's error row, the run goes on
                    result = {"error": describe_error(error)}
                out.write(json.dumps(key | result) + "\n")
                out.flush()
                status = result.get("error") or repr(generator.tokenizer.decode(result["tokens"])[:40])
                elapsed = time.perf_counter() - began
                print(
                    f"[kvpress {elapsed:5.0f}s] {'/'.join(request['key'])} {name}@{budget}: {status}", file=sys.stderr
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
