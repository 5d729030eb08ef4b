"""lavakv against NVIDIA's kvpress on the same SmolLM2-135M-Instruct weights and passkey prompts.

    bash benchmarks/kvpress/setup_venv.sh                     # once: kvpress 0.5.5, transformers 5.2.0, torch 2.13.0
    OMP_NUM_THREADS=2 flock /tmp/lavakv-heavy.lock \\
        benchmarks/kvpress/.venv/bin/python benchmarks/kvpress_compare.py               # grid, ~17 min
    OMP_NUM_THREADS=2 flock /tmp/lavakv-heavy.lock \\
        benchmarks/kvpress/.venv/bin/python benchmarks/kvpress_compare.py --investigate # SnapKV at 50%, ~10 min
    benchmarks/kvpress/.venv/bin/python benchmarks/kvpress_compare.py --quick           # smoke run, ~3 min
    benchmarks/kvpress/.venv/bin/python benchmarks/kvpress_compare.py --report          # markdown from the JSON

kvpress 0.5.5 requires transformers<5.3 and lavakv imports ``get_layer_types_and_kwargs`` from
``transformers.cache_utils``, which transformers 5.2.0 lacks, so the two cannot share one process.
The script, run from the kvpress venv, starts its lavakv half in the main venv (``.venv/bin/python
benchmarks/kvpress_compare.py --engine lavakv``), which builds the prompts and converts the model;
then it runs kvpress on the same model directory and the very same token ids, and merges both into
``benchmarks/results/kvpress_compare.json`` and ``.md`` (times on this 2-core machine). ``--engine
lavakv --part FILE`` and ``--engine kvpress --prompts-from LAVAKV_FILE --part FILE`` run one half
alone; ``--merge LAVAKV_FILE KVPRESS_FILE`` merges them.

Protocols: ``query-aware`` compresses the whole prompt, question included (lavakv:
``lavakv.generate`` on the prompt's ids; kvpress: ``with press(model): model.generate(...)``).
``query-agnostic`` compresses the context alone and then feeds the question (lavakv:
``generate(context, question=...)``; kvpress: its pipeline's own ``forward`` on the same
context and question ids). ``chat-pipeline`` (investigation only) is kvpress's documented
end-to-end call ``pipe(context, question=..., press=press)``, which applies the tokenizer's chat
template. A budget B is the number of prompt tokens kept per KV head per layer, window included;
kvpress gets ``compression_ratio = 1 - (B + 0.5) / n`` (n = tokens of the compressed part) so that
its ``int(n * (1 - ratio))`` equals B. ``50%`` keeps ``int(n / 2)`` on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
LAVAKV_PYTHON = REPO / ".venv" / "bin" / "python"
METHODS = ("snapkv", "pyramidkv", "ada-snapkv")
HALF = "50%"
PREFIX = (("answer_prefix", "The pass key is"),)


@dataclass(frozen=True)
class Case:
    """One configuration run on every prompt by one engine."""

    engine: str
    protocol: str
    method: str
    budget: str
    options: tuple[tuple[str, object], ...] = ()
    label: str = ""
    match: str = ""

    def key(self) -> dict:
        return {
            "engine": self.engine,
            "protocol": self.protocol,
            "method": self.method,
            "budget": self.budget,
            "options": dict(self.options),
            "label": self.label or self.method,
            "match": self.match,
        }


def grid_cases(engine: str, budgets: list[str]) -> list[Case]:
    cases = []
    for protocol in ("query-aware", "query-agnostic"):
        cases.append(Case(engine, protocol, "full", "full"))
        for method in METHODS:
            for budget in budgets:
                if budget == HALF and method == "ada-snapkv":
                    continue
                cases.append(Case(engine, protocol, method, budget))
    return cases


def investigation_cases(engine: str) -> list[Case]:
    """SnapKV at 50% of the prompt: defaults, then each engine set to the other's window and pooling."""
    aware, agnostic, chat = "query-aware", "query-agnostic", "chat-pipeline"
    if engine == "kvpress":
        default = "kvpress defaults (window 64, avg pool 5)"
        return [
            Case(engine, aware, "full", "full"),
            Case(engine, aware, "snapkv", HALF, label=default, match="w64-avg5"),
            Case(engine, aware, "snapkv", HALF, (("window_size", 32),), "kvpress window 32, avg pool 5", "w32-avg5"),
            Case(engine, aware, "snapkv", HALF, (("window_size", 8),), "kvpress window 8, avg pool 5", "w8-avg5"),
            Case(engine, agnostic, "full", "full"),
            Case(engine, agnostic, "snapkv", HALF, label=default, match="w64-avg5"),
            Case(engine, agnostic, "pyramidkv", HALF, label="kvpress PyramidKV defaults"),
            Case(engine, chat, "full", "full", label="kvpress pipeline, chat template"),
            Case(engine, chat, "snapkv", HALF, label="kvpress pipeline, chat template, defaults"),
            Case(engine, chat, "full", "full", PREFIX, "kvpress pipeline, chat template, answer_prefix"),
            Case(engine, chat, "snapkv", HALF, PREFIX, "kvpress pipeline, chat template, answer_prefix, defaults"),
        ]
    default = "lavakv defaults (window 32, max pool 7)"
    avg5 = (("pooling", "avg"), ("kernel", 5))
    return [
        Case(engine, aware, "full", "full"),
        Case(engine, aware, "snapkv", HALF, label=default, match="w32-max7"),
        Case(engine, aware, "snapkv", HALF, (("window", 64),), "lavakv window 64, max pool 7", "w64-max7"),
        Case(engine, aware, "snapkv", HALF, avg5, "lavakv window 32, avg pool 5", "w32-avg5"),
        Case(engine, aware, "snapkv", HALF, (("window", 64), *avg5), "lavakv window 64, avg pool 5", "w64-avg5"),
        Case(engine, agnostic, "full", "full"),
        Case(engine, agnostic, "snapkv", HALF, label=default, match="w32-max7"),
        Case(engine, agnostic, "snapkv", HALF, (("window", 64), *avg5), "lavakv window 64, avg pool 5", "w64-avg5"),
    ]


def kept_count(budget: str, length: int) -> int:
    return length // 2 if budget == HALF else int(budget)


def needle_positions(tokenizer, ids: list[int], passkey: str) -> list[int]:
    """Token positions of the passkey's characters in ``ids``, every occurrence (lavakv process only)."""
    from lavakv.passkey import passkey_token_positions

    return passkey_token_positions(tokenizer, ids, passkey)


def needle_copies(tokenizer, ids: list[int], passkey: str) -> list[list[int]]:
    """Per occurrence of the passkey, the positions of its digit tokens."""
    positions = needle_positions(tokenizer, ids, passkey)
    copies: list[list[int]] = []
    for position in positions:
        if copies and position == copies[-1][-1] + 1:
            copies[-1].append(position)
        else:
            copies.append([position])
    digit = {p for p in positions if tokenizer.decode([ids[p]]).strip()}
    return [[p for p in copy if p in digit] for copy in copies]


def digest(positions) -> str:
    return hashlib.sha1(",".join(str(p) for p in sorted(positions)).encode()).hexdigest()[:12]


def kept_summary(kept: list[list[list[int]]], needle: list[int], copies: list[list[int]], record: bool) -> dict:
    """How much of the needle per-(layer, KV head) kept positions hold; ``intact``: all digits of one copy."""
    wanted = set(needle)
    intact = [[any(set(copy) <= set(head) for copy in copies) for head in layer] for layer in kept]
    hits = [[len(wanted.intersection(head)) for head in layer] for layer in kept]
    total = sum(len(layer) for layer in kept) * len(wanted)
    out = {
        "needle_share": sum(map(sum, hits)) / total if total else None,
        "needle_min_per_layer": [min(layer) for layer in hits],
        "intact_share": statistics.fmean(x for layer in intact for x in layer) if copies else None,
        "layers_all_heads_intact": sum(all(layer) for layer in intact) if copies else None,
        "kept_per_head": statistics.fmean(len(head) for layer in kept for head in layer),
    }
    if record:
        out["kept_digests"] = [[digest(head) for head in layer] for layer in kept]
    return out


def describe_error(error: BaseException) -> dict:
    """Type, first line of the message, where it was raised and the innermost kvpress/lavakv frame above it."""
    frames = traceback.extract_tb(error.__traceback__)

    def where(frame) -> str | None:
        if frame is None:
            return None
        name = frame.filename.split("site-packages/")[-1].split("/src/")[-1]
        return f"{name}:{frame.lineno} in {frame.name}"

    library = next(
        (f for f in reversed(frames) if "site-packages/kvpress/" in f.filename or "/src/lavakv/" in f.filename), None
    )
    return {
        "type": type(error).__name__,
        "message": str(error).splitlines()[0][:400] if str(error) else "",
        "where": where(frames[-1] if frames else None),
        "library_frame": where(library),
    }


class Probe:
    """Times every forward of a model's decoder stack and reads its cache after each one."""

    def __init__(self, inner) -> None:
        self.calls: list[dict] = []
        self._start = 0.0
        inner.register_forward_pre_hook(self._before, with_kwargs=True)
        inner.register_forward_hook(self._after, with_kwargs=True)

    def reset(self) -> None:
        self.calls = []

    def _before(self, module, args, kwargs) -> None:
        self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        end = time.perf_counter()
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        call = {"start": self._start, "end": end, "length": length}
        if not self.calls:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            call["cache_bytes"], call["index_bytes"], call["layer_lengths"] = cache_sizes(cache)
        self.calls.append(call)

    def timings(self, started: float, finished: float) -> dict:
        """Prefill = start until the first one-token forward; decode = median gap between one-token forwards."""
        decode = [c for c in self.calls if c["length"] == 1]
        first = decode[0]["start"] if decode else finished
        gaps = [b["start"] - a["start"] for a, b in zip(decode, decode[1:])]
        if not gaps and decode:
            gaps = [c["end"] - c["start"] for c in decode]
        return {
            "prefill_s": first - started,
            "prefill_forward_s": sum(c["end"] - c["start"] for c in self.calls if c["length"] > 1),
            "decode_ms_per_token": statistics.median(gaps) * 1000 if gaps else None,
            "decode_forwards": len(decode),
            "cache_bytes": self.calls[0]["cache_bytes"] if self.calls else None,
            "index_bytes": self.calls[0]["index_bytes"] if self.calls else None,
            "layer_lengths": self.calls[0]["layer_lengths"] if self.calls else None,
        }


def cache_sizes(cache) -> tuple[int | None, int | None, list[int] | None]:
    """Bytes of key/value tensors (and of lavakv's index tensors) a cache holds, and each layer's length."""
    if cache is None:
        return None, None, None
    if hasattr(cache, "stats"):
        stats = cache.stats(positions=False)
        return stats.kv_bytes, stats.index_bytes, None
    layers = [layer for layer in cache.layers if getattr(layer, "keys", None) is not None]
    total = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    return total, 0, [int(layer.keys.shape[-2]) for layer in layers]


def load_model(directory: str, prepare_lavakv: bool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    if prepare_lavakv:
        import lavakv

        lavakv.prepare_model(model)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def versions(*names: str) -> dict:
    from importlib.metadata import version

    import torch

    out = {name: version(name) for name in names}
    out.update(python=platform.python_version(), torch_threads=torch.get_num_threads())
    return out


class LavakvEngine:
    name = "lavakv"

    def __init__(self, directory: str, max_new_tokens: int) -> None:
        import lavakv

        self.lavakv = lavakv
        self.model, self.tokenizer = load_model(directory, prepare_lavakv=True)
        self.probe = Probe(self.model.model)
        self.max_new_tokens = max_new_tokens
        self.info = versions("torch", "transformers", "lavakv") | {
            "attn_implementation": self.model.config._attn_implementation,
            "layers": self.model.config.num_hidden_layers,
        }

    def warm_up(self, prompt: dict) -> None:
        self.lavakv.generate(self.model, self.tokenizer, prompt["ids"][:128], method="full", max_new_tokens=2)

    def run(self, case: Case, prompt: dict) -> tuple[str, dict]:
        from lavakv.generate import QUESTION_SEPARATOR
        from lavakv.prompting import split_prompt

        options = dict(case.options)
        if case.protocol == "query-aware":
            source, length, extra = prompt["ids"], prompt["tokens"], {}
        else:
            chat = case.protocol == "chat-pipeline"
            source, extra = prompt["context_text"], {"question": prompt["question"], "chat_template": chat}
            context = prompt["context_text"] + QUESTION_SEPARATOR
            length = len(split_prompt(self.tokenizer, context, prompt["question"], chat)[0])
        budget = None if case.method == "full" else kept_count(case.budget, length)
        started = time.perf_counter()
        out = self.lavakv.generate(
            self.model,
            self.tokenizer,
            source,
            method=case.method,
            budget=budget,
            max_new_tokens=self.max_new_tokens,
            **extra,
            **options,
        )
        finished = time.perf_counter()
        stats = out.stats
        measured = self.probe.timings(started, finished)
        measured.update(
            compressed_tokens=length,
            kept_target=budget if budget is not None else length,
            layer_lengths=[round(b, 2) for b in stats.layer_budgets],
            lavakv_stats={
                "kv_bytes": stats.kv_bytes,
                "kept_entries": stats.kept_entries,
                "full_entries": stats.full_entries,
                "window": stats.window,
                "prefill_seconds": stats.prefill_seconds,
                "decode_seconds": stats.decode_seconds,
                "generated_tokens": stats.generated_tokens,
            },
        )
        kept = stats.kept_positions if case.protocol != "chat-pipeline" else None
        return out.text, measured | ({"kept": kept} if kept is not None else {})


class KvpressEngine:
    name = "kvpress"

    def __init__(self, directory: str, max_new_tokens: int) -> None:
        import kvpress
        from transformers import pipeline

        self.kvpress = kvpress
        self.model, self.tokenizer = load_model(directory, prepare_lavakv=False)
        self.pipe = pipeline("kv-press-text-generation", model=self.model, tokenizer=self.tokenizer)
        self.probe = Probe(self.model.model)
        self.max_new_tokens = max_new_tokens
        self.info = versions("torch", "transformers", "kvpress") | {
            "attn_implementation": self.model.config._attn_implementation,
            "snapkv_defaults": {
                "window_size": kvpress.SnapKVPress.window_size,
                "kernel_size": kvpress.SnapKVPress.kernel_size,
            },
        }

    def warm_up(self, prompt: dict) -> None:
        import torch

        with torch.inference_mode():
            self.model(torch.tensor([prompt["ids"][:128]]))

    def make_press(self, case: Case, length: int):
        if case.method == "full":
            return None
        ratio = 0.5 if case.budget == HALF else 1 - (int(case.budget) + 0.5) / length
        options = {k: v for k, v in case.options if k != "answer_prefix"}
        if case.method == "snapkv":
            return self.kvpress.SnapKVPress(compression_ratio=ratio, **options)
        if case.method == "pyramidkv":
            return self.kvpress.PyramidKVPress(compression_ratio=ratio, **options)
        return self.kvpress.AdaKVPress(self.kvpress.SnapKVPress(compression_ratio=ratio, **options))

    def run(self, case: Case, prompt: dict) -> tuple[str, dict]:
        import torch
        from transformers import DynamicCache

        if case.protocol == "query-aware":
            length = prompt["tokens"]
        elif case.protocol == "query-agnostic":
            length = prompt["context_tokens"]
        else:
            length = 0
        press = self.make_press(case, max(length, 1))
        scores = self._capture_scores(press)
        started = time.perf_counter()
        with torch.inference_mode():
            if case.protocol == "query-aware":
                ids = torch.tensor([prompt["ids"]])
                kwargs = dict(
                    attention_mask=torch.ones_like(ids),
                    past_key_values=DynamicCache(),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                if press is None:
                    generated = self.model.generate(ids, **kwargs)
                else:
                    with press(self.model):
                        generated = self.model.generate(ids, **kwargs)
                answer = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            elif case.protocol == "query-agnostic":
                inputs = {
                    "context_ids": torch.tensor([prompt["context_ids"]]),
                    "questions_ids": [torch.tensor([prompt["question_ids"]])],
                }
                answer = self.pipe.forward(inputs, press=press, max_new_tokens=self.max_new_tokens)[0]
            else:
                prefix = dict(case.options).get("answer_prefix", "")
                question = prompt["question"].removesuffix(prefix).rstrip()
                answer = self.pipe(
                    prompt["context_text"],
                    question="\n\n" + question,
                    answer_prefix=prefix,
                    press=press,
                    max_new_tokens=self.max_new_tokens,
                )["answer"]
        finished = time.perf_counter()
        measured = self.probe.timings(started, finished)
        lengths = measured["layer_lengths"] or []
        compressed = length or (self.probe.calls[0]["length"] if self.probe.calls else 0)
        measured.update(
            compressed_tokens=compressed,
            kept_target=compressed if press is None else self._n_kept(press, compressed),
            compression_ratio=None if press is None else press.compression_ratio,
        )
        if case.protocol != "chat-pipeline":
            measured["kept"] = self._kept_positions(press, scores, lengths, compressed)
        return answer, measured

    def _n_kept(self, press, length: int) -> int:
        from kvpress.utils import compute_n_kept

        return compute_n_kept(length, press.compression_ratio)

    @staticmethod
    def _capture_scores(press) -> dict:
        """Keep a copy of each layer's scores as the press computes them (the selection is not changed)."""
        captured: dict = {}
        if press is None:
            return captured
        scorer = getattr(press, "press", press)
        original = scorer.score

        def score(module, *args, **kwargs):
            result = original(module, *args, **kwargs)
            captured[module.layer_idx] = result[0].detach().clone()
            return result

        scorer.score = score
        return captured

    def _kept_positions(self, press, scores: dict, lengths: list[int], compressed: int) -> list[list[list[int]]]:
        """Per layer and KV head, the prompt positions the press kept (AdaKV: those it did not mask)."""
        layers = self.model.model.layers
        heads = self.model.config.num_key_value_heads
        if press is None:
            return [[list(range(compressed))] * heads for _ in layers]
        if isinstance(press, self.kvpress.AdaKVPress):
            kept = []
            for layer in layers:
                mask = layer.self_attn.masked_key_indices
                dropped = [set() for _ in range(heads)]
                if mask is not None:
                    for head, position in zip(mask[1].tolist(), mask[2].tolist()):
                        dropped[head].add(position)
                kept.append([[p for p in range(compressed) if p not in dropped[h]] for h in range(heads)])
            return kept
        return [sorted_topk(scores[index], lengths[index]) for index in range(len(layers))]


def sorted_topk(scores, count: int) -> list[list[int]]:
    return [sorted(row.topk(count).indices.tolist()) for row in scores]


def build_prompts(tokenizer, count: int, tokens: int) -> list[dict]:
    from lavakv.generate import QUESTION_SEPARATOR
    from lavakv.passkey import QUESTION, passkey_prompt
    from lavakv.prompting import split_prompt

    depths = [round(0.1 + 0.8 * i / (count - 1), 2) for i in range(count)] if count > 1 else [0.5]
    prompts = []
    for seed, depth in enumerate(depths):
        prompt = passkey_prompt(tokenizer, tokens, depth, seed=seed)
        context = prompt.text[: -len(QUESTION)].rstrip()
        context_ids, question_ids = split_prompt(tokenizer, context + QUESTION_SEPARATOR, QUESTION, False)
        ids = tokenizer(prompt.text)["input_ids"]
        prompts.append(
            {
                "depth": depth,
                "seed": seed,
                "passkey": prompt.passkey,
                "tokens": len(ids),
                "context_tokens": len(context_ids),
                "question_tokens": len(question_ids),
                "needle": needle_positions(tokenizer, ids, prompt.passkey),
                "context_needle": needle_positions(tokenizer, context_ids, prompt.passkey),
                "needle_copies": needle_copies(tokenizer, ids, prompt.passkey),
                "context_needle_copies": needle_copies(tokenizer, context_ids, prompt.passkey),
                "question": QUESTION,
                "context_text": context,
                "ids": ids,
                "context_ids": context_ids,
                "question_ids": question_ids,
            }
        )
    return prompts


def run_cases(engine, cases: list[Case], prompts: list[dict]) -> list[dict]:
    results = []
    engine.warm_up(prompts[0])
    began = time.time()
    for case in cases:
        runs = []
        for index, prompt in enumerate(prompts):
            engine.probe.reset()
            row: dict = {"prompt": index}
            try:
                answer, measured = engine.run(case, prompt)
                kept = measured.pop("kept", None)
                needle = prompt["needle"] if case.protocol == "query-aware" else prompt["context_needle"]
                if kept is not None:
                    copies = prompt.get("needle_copies" if case.protocol == "query-aware" else "context_needle_copies")
                    measured |= kept_summary(kept, needle, copies or [], bool(case.match))
                row |= {"answer": answer, "correct": prompt["passkey"] in answer, **measured}
            except Exception as error:
                row |= {"answer": None, "correct": False, "error": describe_error(error)}
            runs.append(row)
        results.append(case.key() | {"runs": runs, "summary": summarize(runs)})
        summary = results[-1]["summary"]
        print(
            f"[{engine.name} {time.time() - began:5.0f}s] {case.protocol:>14} {case.label or case.method:>42} "
            f"{case.budget:>4}: {summary['correct']}/{summary['prompts']}"
            f"{' errors ' + str(summary['errors']) if summary['errors'] else ''} "
            f"{[r['answer'] for r in runs]}",
            file=sys.stderr,
            flush=True,
        )
    return results


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]

    def median(key: str):
        values = [r[key] for r in ok if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "prompts": len(runs),
        "correct": sum(r["correct"] for r in runs),
        "errors": len(runs) - len(ok),
        "cache_bytes": median("cache_bytes"),
        "index_bytes": median("index_bytes"),
        "prefill_s": median("prefill_s"),
        "decode_ms_per_token": median("decode_ms_per_token"),
        "kept_per_head": median("kept_per_head"),
        "needle_share": median("needle_share"),
        "intact_share": median("intact_share"),
        "layers_all_heads_intact": median("layers_all_heads_intact"),
    }


def run_engine(name: str, args, prompts: list[dict] | None, directory: str | None) -> dict:
    if name == "lavakv":
        from lavakv.models import MODELS, convert_gguf

        directory = str(convert_gguf(MODELS["smollm2"].gguf_path()))
        engine = LavakvEngine(directory, args.max_new_tokens)
        prompts = build_prompts(engine.tokenizer, args.prompts, args.tokens)
    else:
        engine = KvpressEngine(directory, args.max_new_tokens)
    budgets = [b.strip() for b in args.budgets.split(",")]
    cases = investigation_cases(name) if args.investigate else grid_cases(name, budgets)
    return {
        "engine": name,
        "model_dir": directory,
        "info": engine.info,
        "prompts": prompts,
        "cases": run_cases(engine, cases, prompts),
    }


def merge(parts: list[dict], args) -> dict:
    lavakv_part = next(p for p in parts if p["engine"] == "lavakv")
    prompts = [
        {k: v for k, v in p.items() if not k.endswith("ids") and k != "context_text"} for p in lavakv_part["prompts"]
    ]
    section = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_dir": lavakv_part["model_dir"],
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to float32 by lavakv)",
        "max_new_tokens": args.max_new_tokens,
        "budgets": args.budgets,
        "engines": {p["engine"]: p["info"] for p in parts},
        "prompts": prompts,
        "cases": [case for p in parts for case in p["cases"]],
    }
    if args.investigate:
        section["agreement"] = agreement(section["cases"])
    return section


def agreement(cases: list[dict]) -> list[dict]:
    """For configurations run by both engines, how often they kept the same positions and answered alike."""
    rows = []
    for ours in (c for c in cases if c["engine"] == "lavakv" and c["match"]):
        theirs = next(
            (
                c
                for c in cases
                if c["engine"] == "kvpress" and c["match"] == ours["match"] and c["protocol"] == ours["protocol"]
            ),
            None,
        )
        if theirs is None:
            continue
        same = total = answers = 0
        for a, b in zip(ours["runs"], theirs["runs"]):
            answers += a.get("answer") == b.get("answer")
            for la, lb in zip(a.get("kept_digests", []), b.get("kept_digests", [])):
                for ha, hb in zip(la, lb):
                    same += ha == hb
                    total += 1
        rows.append(
            {
                "protocol": ours["protocol"],
                "match": ours["match"],
                "same_kept_sets": same,
                "layer_heads": total,
                "same_answers": answers,
                "prompts": len(ours["runs"]),
            }
        )
    return rows


def write_outputs(section: dict, args) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    data = json.loads(path.read_text()) if path.exists() else {}
    data["investigation" if args.investigate else "grid"] = section
    path.write_text(json.dumps(data, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(data))
    return path


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def acc(case: dict | None) -> str:
    if case is None:
        return "-"
    s = case["summary"]
    errors = f" ({s['errors']} err)" if s["errors"] else ""
    return f"{s['correct']}/{s['prompts']}{errors}"


def report(data: dict) -> str:
    lines = [
        "# lavakv vs kvpress: SnapKV, PyramidKV and Ada-SnapKV on SmolLM2 passkey prompts",
        "",
        "Generated by `benchmarks/kvpress_compare.py` from `kvpress_compare.json` (do not edit by hand). "
        "Why kvpress's SnapKV misses passkeys: `kvpress_investigation.md`.",
        "",
    ]
    grid = data.get("grid")
    if grid:
        lines += setup_lines(grid)
        for protocol in ("query-aware", "query-agnostic"):
            lines += grid_table(grid, protocol)
        lines += error_lines(grid)
    inv = data.get("investigation")
    if inv:
        lines += investigation_lines(inv)
    return "\n".join(lines) + "\n"


def setup_lines(section: dict) -> list[str]:
    prompts = section["prompts"]
    engines = section["engines"]
    lines = [
        "## Setup",
        "",
        f"- Model: {section['model']}, float32, CPU; greedy decoding, {section['max_new_tokens']} new tokens; "
        "a prompt is correct when the passkey appears in the answer.",
        f"- Prompts: {len(prompts)} plain passkey prompts (`lavakv.passkey.passkey_prompt`, no chat template) of "
        f"{min(p['tokens'] for p in prompts)}-{max(p['tokens'] for p in prompts)} tokens, depths "
        f"{', '.join(str(p['depth']) for p in prompts)}; the query-agnostic context is "
        f"{min(p['context_tokens'] for p in prompts)} tokens + a {prompts[0]['question_tokens']}-token question. "
        "Both engines get the same token ids.",
    ]
    for name, info in engines.items():
        described = ", ".join(f"{k} {v}" for k, v in info.items() if not isinstance(v, dict))
        lines.append(f"- {name}: {described}.")
    lines += [
        "- Budget B: prompt tokens kept per KV head per layer, observation window included (lavakv window 32, "
        "max pool 7; kvpress window 64, avg pool 5). kvpress gets `compression_ratio = 1 - (B + 0.5) / n`; "
        "`50%` is `compression_ratio=0.5` (lavakv budget `n // 2`). `kept/head` is the measured mean; "
        "`needle kept` the median share of (layer, KV head, passkey token) entries kept.",
        "- Cache MiB: bytes of the key/value tensors held right after the prompt (query-aware) or the context "
        "(query-agnostic) was compressed, median over prompts (kvpress: the DynamicCache's tensors; AdaKV masks "
        "entries and keeps full-size tensors). Prefill s: from the call until the first one-token forward "
        "(query-agnostic: context and question). Decode: median gap between one-token forwards. The two engines ran "
        "in two processes one after the other (different transformers versions), on a shared 2-core CPU.",
        "",
    ]
    return lines


def find(cases: list[dict], engine: str, protocol: str, method: str, budget: str) -> dict | None:
    return next(
        (
            c
            for c in cases
            if c["engine"] == engine
            and c["protocol"] == protocol
            and c["method"] == method
            and c["budget"] == budget
            and not c["options"]
        ),
        None,
    )


def grid_table(section: dict, protocol: str) -> list[str]:
    cases = section["cases"]
    title = {
        "query-aware": "Query-aware: the whole prompt is compressed, question inside the window",
        "query-agnostic": "Query-agnostic: the context is compressed, then the question is fed",
    }[protocol]
    lines = [
        f"## {title}",
        "",
        "| method | B | kept/head lavakv / kvpress | correct lavakv | correct kvpress | needle kept lavakv / kvpress | "
        "cache MiB lavakv | cache MiB kvpress | prefill s lavakv | prefill s kvpress | decode ms/tok lavakv | "
        "decode ms/tok kvpress |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [("full", "full")] + [(m, b) for m in METHODS for b in section["budgets"].split(",")]
    for method, budget in rows:
        ours = find(cases, "lavakv", protocol, method, budget)
        theirs = find(cases, "kvpress", protocol, method, budget)
        if ours is None and theirs is None:
            continue
        a = ours["summary"] if ours else {}
        b = theirs["summary"] if theirs else {}
        lines.append(
            f"| {method} | {budget} | {num(a.get('kept_per_head'), 0)} / {num(b.get('kept_per_head'), 0)} | "
            f"{acc(ours)} | {acc(theirs)} | {num(a.get('needle_share'))} / {num(b.get('needle_share'))} | "
            f"{mib(a.get('cache_bytes'))} | {mib(b.get('cache_bytes'))} | "
            f"{num(a.get('prefill_s'))} | {num(b.get('prefill_s'))} | {num(a.get('decode_ms_per_token'), 1)} | "
            f"{num(b.get('decode_ms_per_token'), 1)} |"
        )
    return lines + [""]


def error_lines(section: dict) -> list[str]:
    lines = ["## Errors", ""]
    seen: dict = {}
    for case in section["cases"]:
        for run in case["runs"]:
            if "error" in run:
                e = run["error"]
                key = (case["engine"], case["protocol"], case["label"], case["budget"], e["type"], e["where"])
                seen.setdefault(key, [e, 0])[1] += 1
    if not seen:
        return lines + ["None.", ""]
    lines += [
        "| engine | protocol | method | B | prompts | error | raised at | innermost kvpress/lavakv frame |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (engine, protocol, label, budget, _, _), (e, count) in seen.items():
        message = e["message"].replace("|", "\\|")
        called = e["library_frame"] if e["library_frame"] != e["where"] else None
        lines.append(
            f"| {engine} | {protocol} | {label} | {budget} | {count} | {e['type']}: {message} | "
            f"`{e['where']}` | {f'`{called}`' if called else '-'} |"
        )
    return lines + [""]


def investigation_lines(section: dict) -> list[str]:
    prompts = section["prompts"]
    lines = [
        "## Investigation: SnapKV at 50% of the prompt",
        "",
        f"{len(prompts)} prompts of {min(p['tokens'] for p in prompts)}-{max(p['tokens'] for p in prompts)} "
        f"tokens, depths {', '.join(str(p['depth']) for p in prompts)}; passkeys "
        f"{', '.join(p['passkey'] for p in prompts)}. Medians over prompts: `needle kept` is the share of "
        "(layer, KV head, needle token) entries kept, `intact heads` the share of (layer, KV head) pairs that "
        "keep every digit of at least one of the passkey's two copies, `intact layers` the number of layers "
        f"(of {section['engines']['lavakv'].get('layers', 30)}) where every KV head does.",
        "",
        "| engine | protocol | configuration | kept/head | correct | needle kept | intact heads | intact layers | "
        "answers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in section["cases"]:
        s = case["summary"]
        answers = " / ".join("ERR" if r.get("error") else repr(r["answer"].strip()[:12]) for r in case["runs"])
        label = case["label"]
        if case["method"] == "full":
            label = "full cache" + ("" if label == "full" else f" ({label})")
        lines.append(
            f"| {case['engine']} | {case['protocol']} | {label} | {num(s['kept_per_head'], 0)} | "
            f"{acc(case)} | {num(s['needle_share'])} | {num(s.get('intact_share'))} | "
            f"{num(s.get('layers_all_heads_intact'), 0)} | {answers} |"
        )
    if section.get("agreement"):
        lines += [
            "",
            "Same configuration in both engines (kept position sets compared per prompt, layer and KV head):",
            "",
            "| protocol | configuration | identical kept sets | identical answers |",
            "|---|---|---|---|",
        ]
        for row in section["agreement"]:
            lines.append(
                f"| {row['protocol']} | {row['match']} | {row['same_kept_sets']}/{row['layer_heads']} | "
                f"{row['same_answers']}/{row['prompts']} |"
            )
    if any("error" in r for c in section["cases"] for r in c["runs"]):
        lines += ["", "Errors:", ""] + error_lines(section)[2:-1]
    return lines + [""]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("both", "lavakv", "kvpress"), default="both")
    parser.add_argument("--part", help="with --engine lavakv|kvpress: where to write that half's JSON")
    parser.add_argument("--prompts-from", help="with --engine kvpress: the lavakv part holding the prompts")
    parser.add_argument("--merge", nargs=2, metavar=("LAVAKV_PART", "KVPRESS_PART"))
    parser.add_argument("--investigate", action="store_true", help="SnapKV at 50%%: defaults and swapped settings")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, budget 128, temporary output")
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    parser.add_argument("--prompts", type=int, help="number of prompts (grid 5, investigation 9)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--budgets", default=f"64,128,256,{HALF}")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--out", help="output path without suffix (default benchmarks/results/kvpress_compare)")
    parser.add_argument("--lavakv-python", default=str(LAVAKV_PYTHON))
    args = parser.parse_args()
    if args.quick:
        args.prompts = args.prompts or 2
        args.budgets = "128"
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="kvpress-quick-")) / "kvpress_compare")
    args.prompts = args.prompts or (9 if args.investigate else 5)
    args.out = args.out or str(RESULTS / "kvpress_compare")
    return args


def forwarded(args) -> list[str]:
    out = [
        "--prompts",
        str(args.prompts),
        "--tokens",
        str(args.tokens),
        "--budgets",
        args.budgets,
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    return out + (["--investigate"] if args.investigate else [])


def main() -> None:
    args = parse_args()
    if args.report:
        path = Path(args.out).with_suffix(".json")
        Path(args.out).with_suffix(".md").write_text(report(json.loads(path.read_text())))
        return
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        print(write_outputs(merge(parts, args), args))
        return
    if args.engine == "lavakv":
        Path(args.part).write_text(json.dumps(run_engine("lavakv", args, None, None)))
        return
    if args.engine == "kvpress":
        source = json.loads(Path(args.prompts_from).read_text())
        Path(args.part).write_text(json.dumps(run_engine("kvpress", args, source["prompts"], source["model_dir"])))
        return
    if importlib.util.find_spec("kvpress") is None:
        sys.exit("kvpress is not installed here: run bash benchmarks/kvpress/setup_venv.sh and use its python")
    with tempfile.TemporaryDirectory(prefix="kvpress-compare-") as scratch:
        lavakv_part = Path(scratch) / "lavakv.json"
        env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        subprocess.run(
            [args.lavakv_python, __file__, "--engine", "lavakv", "--part", str(lavakv_part), *forwarded(args)],
            check=True,
            env=env,
        )
        ours = json.loads(lavakv_part.read_text())
    theirs = run_engine("kvpress", args, ours["prompts"], ours["model_dir"])
    path = write_outputs(merge([ours, theirs], args), args)
    print(Path(path).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
