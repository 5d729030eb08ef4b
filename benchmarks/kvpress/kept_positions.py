"""Do lavakv's methods keep the positions kvpress's presses keep? Same weights, same token ids, per (layer, KV head).

    bash benchmarks/kvpress/setup_venv.sh        # once: kvpress's own venv
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/kvpress/kept_positions.py [--prompts 20] [--budgets 64,128,256]

Prompts are the opening ``--length`` tokens of different Paul Graham essays from the shipped
haystack (natural text: repeated filler would tie many scores and measure tie-breaking instead),
followed by a question. lavakv's side compresses each prompt's recorded prefill with each method
spec; ``kept_positions_kvpress.py`` runs the matching press in the kvpress venv on the same ids.
For each (method, budget): ``entries_equal_share`` (kept entries both keep, over the entries kept)
and ``heads_identical_share`` (share of (prompt, layer, KV head) rows kept identically). Written
to ``benchmarks/results/kvpress_kept_positions.json`` and ``.md``.

Each lavakv spec is set to the press's conventions where lavakv's defaults differ: SnapKV's base
with kvpress's window 64 and average pooling of 5 (lavakv: 32, max pooling of 7), and CriticalKV's
first stage given the count kvpress gives it (kvpress counts its window inside the first stage's
``first_stage_ratio * budget``; lavakv takes the ratio of the slots left after the window).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
HAYSTACK = HERE.parents[2] / "shared" / "data" / "paul_graham_essays"
QUESTION = "\n\nWhat is the main argument of the text above? Answer in one sentence."
KVPRESS_WINDOW = 64


def lavakv_spec(method: str, budget: int) -> tuple[str, dict]:
    """The lavakv spec matching ``method``'s press at ``budget``, and the press's options."""
    base = f"window={KVPRESS_WINDOW},kernel=5,pooling=avg"
    if method == "criticalkv":
        first = int((budget + 0.5) * 0.5) - KVPRESS_WINDOW
        ratio = max(0, first) / (budget - KVPRESS_WINDOW) + 0.5 / (budget - KVPRESS_WINDOW)
        return f"criticalkv:{base},first_stage_ratio={min(ratio, 1.0):.6f}", {}
    if method == "critical-adakv":
        return f"critical-adakv:{base},first_stage_ratio=0.5", {}
    if method == "snapkv":
        return f"snapkv:{base}", {}
    return method, {}


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    essays = sorted(HAYSTACK.glob("*.txt"))
    if len(essays) < count:
        raise SystemExit(f"{HAYSTACK} holds {len(essays)} essays, fewer than --prompts {count}")
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    out = []
    for essay in essays[:count]:
        ids = tokenizer(essay.read_text(), add_special_tokens=False)["input_ids"][: length - len(question)]
        out.append(ids + question)
    return out


def compare(ours: list, theirs: list) -> tuple[int, int, int, int]:
    """``(entries both keep, entries kvpress keeps, identical rows, rows)`` over layers and heads."""
    shared = total = same = rows = 0
    for our_layer, their_layer in zip(ours, theirs):
        for our_head, their_head in zip(our_layer, their_layer):
            shared += len(set(our_head) & set(their_head))
            total += len(their_head)
            same += our_head == their_head
            rows += 1
    return shared, total, same, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--budgets", default="128,256")
    parser.add_argument("--methods", default="knorm,keydiff,tova,expected-attention,snapkv,criticalkv,critical-adakv")
    parser.add_argument("--kvpress-python", default=str(HERE / ".venv" / "bin" / "python"))
    parser.add_argument("--out", type=Path, default=RESULTS / "kvpress_kept_positions.json")
    args = parser.parse_args()
    import lavakv
    from lavakv.recording import PrefillRecord

    sys.path.insert(0, str(HERE))
    from engine import model_directory

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, tokenizer = lavakv.load_model()
    budgets = [int(b) for b in args.budgets.split(",")]
    methods = args.methods.split(",")
    all_ids = prompts(tokenizer, args.prompts, args.length)
    pairs = [[m, b, lavakv_spec(m, b)[1]] for m in methods for b in budgets]
    ours = {}
    for index, ids in enumerate(all_ids):
        record = PrefillRecord(model, torch.tensor([ids]))
        for method, budget, _ in pairs:
            spec = lavakv_spec(method, budget)[0]
            stats = record.compress(spec, budget=budget, progressive=False).stats()
            ours[(index, method, budget)] = stats.sequences[0].kept_positions
    with tempfile.TemporaryDirectory() as scratch:
        requests, theirs_path = Path(scratch) / "requests.json", Path(scratch) / "kvpress.json"
        requests.write_text(json.dumps({"prompts": all_ids, "pairs": pairs}))
        command = [args.kvpress_python, str(HERE / "kept_positions_kvpress.py"), str(model_directory(None))]
        subprocess.run([*command, str(requests), str(theirs_path)], check=True)
        theirs = json.loads(theirs_path.read_text())
    rows = []
    for method, budget, _ in pairs:
        shared = total = same = count = 0
        errors, worst = [], 0.0
        for result in theirs["results"]:
            if result["press"] != method or result["budget"] != budget:
                continue
            if "error" in result:
                errors.append(result["error"].splitlines()[0])
                continue
            worst = max(worst, result["max_key_distance"])
            counts = compare(ours[(result["prompt"], method, budget)], result["kept"])
            shared, total, same, count = (a + b for a, b in zip((shared, total, same, count), counts))
        rows.append(
            {
                "method": method,
                "lavakv_spec": lavakv_spec(method, budget)[0],
                "budget": budget,
                "prompts": args.prompts,
                "entries_equal_share": shared / total if total else None,
                "heads_identical_share": same / count if count else None,
                "rows": count,
                "max_key_distance": worst,
                "errors": errors,
            }
        )
    args.out.write_text(json.dumps({"versions": theirs["versions"], "length": args.length, "rows": rows}, indent=1))
    write_page(args.out.with_suffix(".md"), rows, args, theirs["versions"])
    for row in rows:
        print(row["method"], row["budget"], row["entries_equal_share"], row["heads_identical_share"], row["errors"][:1])
    return 0


def write_page(path: Path, rows: list[dict], args, versions: dict) -> None:
    lines = [
        "# lavakv vs kvpress: kept positions per (layer, KV head)",
        "",
        f"Written by `benchmarks/kvpress/kept_positions.py` ({args.prompts} prompts of {args.length} tokens: the",
        "opening of different Paul Graham essays and a question; SmolLM2-135M-Instruct in float32, CPU; kvpress",
        f"{versions.get('kvpress')}, torch {versions.get('torch')}). `entries equal` is the share of kvpress's kept",
        "entries that lavakv keeps too; `rows identical` the share of (prompt, layer, KV head) rows kept identically.",
        "",
        "| method | lavakv spec | B | entries equal | rows identical |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row["entries_equal_share"] is None:
            error = row["errors"][0]
            lines.append(f"| {row['method']} | `{row['lavakv_spec']}` | {row['budget']} | error: {error} | |")
            continue
        lines.append(
            f"| {row['method']} | `{row['lavakv_spec']}` | {row['budget']} | {row['entries_equal_share']:.4f} | "
            f"{row['heads_identical_share']:.3f} |"
        )
    lines += [
        "",
        "Where the shares are below 1:",
        "",
        "- **knorm**: the two engines' keys differ by float rounding (their prefills run different attention code;",
        "  `max_key_distance` in the JSON), and a key-norm score has near-ties that this rounding reorders.",
        "- **critical-adakv**: the head budgets differ by design. lavakv gives each head",
        "  `(1 - alpha) * winners + alpha * slots` of the layer's slots (Ada-KV's floor, with exact totals); kvpress",
        "  forces each head's `alpha * n_kept` best entries into a flattened top-k. The heads then keep different",
        "  counts, so rows are rarely identical while almost every kept entry is shared.",
        "",
        "The lavakv specs are set to kvpress's conventions: SnapKV's base with window 64 and average pooling of 5,",
        "and CriticalKV's first stage given kvpress's count (kvpress counts its window inside",
        "`first_stage_ratio * budget`, lavakv takes the ratio of the slots after the window).",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
