"""Passkey retrieval on the embedded SmolLM2 for every method at several budgets.

    .venv/bin/python benchmarks/passkey_quality.py [--tokens 1000] [--budgets 32,64,128] [--depths ...]

Plain prompts (no chat template: SmolLM2 answers passkeys far more reliably without it), greedy
decoding, 8 new tokens. A prompt scores 1 when the answer starts with the passkey; ``digits`` is the
share of passkey digits reproduced in order (SmolLM2 spells numbers one digit per token, so an
eviction that drops one digit truncates the answer). ``needle kept`` is the share of (layer, KV head,
digit token) entries of the needle that the cache kept. Writes JSON and a markdown table to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import time
from difflib import SequenceMatcher
from pathlib import Path

import lavakv
from lavakv.passkey import passkey_prompt, passkey_token_positions

RESULTS = Path(__file__).parent / "results"


def needle_positions(tokenizer, text: str, passkey: str) -> list[int]:
    """Token positions of the passkey's digits, all occurrences."""
    return passkey_token_positions(tokenizer, tokenizer(text)["input_ids"], passkey)


def window_for(budget: int) -> int:
    """The default window of 32 unless the budget is too small to hold it; then 8."""
    return 32 if budget > 32 else 8


def share_kept(kept_positions, needle: list[int]) -> float:
    needle = set(needle)
    total = kept = 0
    for layer in kept_positions:
        for positions in layer:
            kept += len(needle.intersection(positions))
            total += len(needle)
    return kept / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--budgets", default="32,64,128")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--methods", default=",".join(m for m in lavakv.METHODS if m != "full"))
    parser.add_argument("--out", default=str(RESULTS / "passkey_quality"))
    args = parser.parse_args()
    model, tokenizer = lavakv.load_model()
    budgets = [int(b) for b in args.budgets.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    prompts = [passkey_prompt(tokenizer, args.tokens, depth, seed=i) for i, depth in enumerate(depths)]
    runs = [("full", None)] + [(m, b) for m in args.methods.split(",") for b in budgets]
    rows = []
    started = time.time()
    for method, budget in runs:
        for prompt in prompts:
            options = {} if budget is None else {"window": window_for(budget)}
            out = lavakv.generate(
                model,
                tokenizer,
                prompt.text,
                method=method,
                budget=budget,
                max_new_tokens=8,
                chat_template=False,
                **options,
            )
            answer = out.text.strip()
            digits = "".join(c for c in answer.split(".")[0] if c.isdigit())
            needle = needle_positions(tokenizer, prompt.text, prompt.passkey)
            rows.append(
                {
                    "method": method,
                    "budget": budget,
                    "depth": prompt.depth,
                    "prompt_tokens": out.stats.prompt_length,
                    "passkey": prompt.passkey,
                    "answer": answer,
                    "correct": digits == prompt.passkey,
                    "digits": SequenceMatcher(None, digits, prompt.passkey).ratio(),
                    "needle_kept": share_kept(out.stats.kept_positions, needle),
                    "kept_entries": out.stats.kept_entries,
                    "full_entries": out.stats.full_entries,
                }
            )
            print(
                f"{method:>14} {budget or 'full':>5} depth {prompt.depth:.1f}: {answer[:16]!r:20} "
                f"{'ok' if rows[-1]['correct'] else '--'} needle kept {rows[-1]['needle_kept']:.2f} "
                f"[{time.time() - started:.0f}s]",
                flush=True,
            )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=1))
    out_path.with_suffix(".md").write_text(table(rows, budgets, len(prompts), args.tokens))
    print(table(rows, budgets, len(prompts), args.tokens))


def table(rows, budgets, count, tokens) -> str:
    lines = [
        f"Passkey retrieval, SmolLM2-135M-Instruct, ~{tokens}-token plain prompts, {count} depths. "
        "Cell: correct / prompts (mean digit similarity; share of needle entries kept). "
        "Window 32, except 8 at budgets of 32 or less.",
        "",
        "| method | " + " | ".join(f"B={b}" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    full = [r for r in rows if r["method"] == "full"]
    lines.append("| full | " + " | ".join(_cell(full, count) for _ in budgets) + " |")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "full"):
        cells = [_cell([r for r in rows if r["method"] == method and r["budget"] == b], count) for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(rows, count) -> str:
    if not rows:
        return "-"
    correct = sum(r["correct"] for r in rows)
    digits = sum(r["digits"] for r in rows) / len(rows)
    kept = sum(r["needle_kept"] for r in rows) / len(rows)
    return f"{correct}/{count} ({digits:.2f}; {kept:.2f})"


if __name__ == "__main__":
    main()
