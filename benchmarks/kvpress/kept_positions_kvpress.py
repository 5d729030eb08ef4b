"""kvpress's kept (layer, KV head) positions for the prompts ``kept_positions.py`` wrote; runs in the kvpress venv.

    benchmarks/kvpress/.venv/bin/python benchmarks/kvpress/kept_positions_kvpress.py MODEL_DIR REQUESTS.json OUT.json

REQUESTS holds ``{"prompts": [[ids...], ...], "pairs": [[press, budget, options], ...]}``. Each
press compresses each prompt's prefill (``with press(model): model(...)``). Presses that cut the
cache (ScorerPress and its subclasses) keep ``n`` key vectors per head in their own order, so a
kept key is traced back to its position by matching it to the full prefill's keys of that head
(exact to float32 rounding: the largest distance to the matched key is reported). Presses that
mask entries instead (the Ada-KV family) leave ``masked_key_indices`` on each attention module,
whose complement is the kept set. Only torch, transformers and kvpress are imported here.
"""

from __future__ import annotations

import json
import sys
import traceback
from importlib import metadata

import kvpress
import torch
from transformers import AutoModelForCausalLM, DynamicCache


def make_press(name: str, budget: int, length: int, options: dict):
    """The press keeping ``budget`` of ``length`` entries per KV head (``compression_ratio = 1 - (B + 0.5) / n``)."""
    ratio = 1 - (budget + 0.5) / length
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "keydiff":
        return kvpress.KeyDiffPress(compression_ratio=ratio)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "expected-attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio, **options)
    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "criticalkv":
        return kvpress.CriticalKVPress(kvpress.SnapKVPress(compression_ratio=ratio), **options)
    if name == "critical-adakv":
        return kvpress.CriticalAdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio), **options)
    raise ValueError(f"unknown press {name!r}")


def prefill(model, ids: list[int], press) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(input_ids=torch.tensor([ids]), past_key_values=cache)
        else:
            with press(model):
                model(input_ids=torch.tensor([ids]), past_key_values=cache)
    return cache


def kept_positions(model, cache: DynamicCache, full: DynamicCache, length: int) -> tuple[list, float]:
    """``[layer][head]`` sorted kept positions, and the largest distance of a kept key to its matched full key."""
    kept, worst = [], 0.0
    for index, layer in enumerate(model.model.layers):
        masked = getattr(layer.self_attn, "masked_key_indices", None)
        full_keys = full.layers[index].keys[0].float()
        if masked is not None:
            _, heads, positions = masked
            dropped = [set() for _ in range(full_keys.shape[0])]
            for head, position in zip(heads.tolist(), positions.tolist()):
                dropped[head].add(position)
            kept.append([sorted(set(range(length)) - drop) for drop in dropped])
            continue
        keys = cache.layers[index].keys[0].float()
        per_head = []
        for head in range(keys.shape[0]):
            distances = torch.cdist(keys[head], full_keys[head])
            best = distances.min(dim=1)
            worst = max(worst, float(best.values.max()))
            per_head.append(sorted(best.indices.tolist()))
        kept.append(per_head)
    return kept, worst


def main() -> int:
    model_dir, requests_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    requests = json.loads(open(requests_path).read())
    results = []
    for prompt_index, ids in enumerate(requests["prompts"]):
        full = prefill(model, ids, None)
        for name, budget, options in requests["pairs"]:
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "masked_key_indices"):
                    layer.self_attn.masked_key_indices = None
            row = {"prompt": prompt_index, "press": name, "budget": budget, "options": options}
            try:
                cache = prefill(model, ids, make_press(name, budget, len(ids), options))
                row["kept"], row["max_key_distance"] = kept_positions(model, cache, full, len(ids))
            except Exception as error:  # noqa: BLE001 - recorded with its traceback, the other pairs go on
                row["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            results.append(row)
            status = "error" if "error" in row else "ok"
            print(f"[kvpress] prompt {prompt_index} {name}@{budget}: {status}", file=sys.stderr)
    versions = {name: metadata.version(name) for name in ("kvpress", "transformers", "torch")}
    with open(out_path, "w") as out:
        json.dump({"versions": versions, "results": results}, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
