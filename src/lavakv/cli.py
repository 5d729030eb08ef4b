"""Command line: ``lavakv generate`` and ``lavakv demo``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .methods import OPTION_NAMES, PRESETS


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="lava", help=f"one of {', '.join(PRESETS)} (default: lava)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help="prompt tokens kept per KV head per layer, window included")
    size.add_argument("--ratio", type=float, help="budget as a fraction of the prompt, in (0, 1]")
    for name in OPTION_NAMES:
        kind = str if name == "pooling" else (int if name in ("window", "kernel", "sink") else float)
        parser.add_argument(f"--{name}", type=kind, help="method option (see README)")
    parser.add_argument("--model", help="transformers model directory or .gguf file (default: embedded SmolLM2)")


def _method_options(args) -> dict:
    return {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name) is not None}


def _read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        return path.read_text()
    if args.prompt is None:
        raise ValueError("give --prompt TEXT or --prompt-file FILE")
    return args.prompt


def cmd_generate(args) -> int:
    from .generate import generate
    from .models import load_model

    prompt = _read_prompt(args)
    budget = args.budget if args.budget is not None or args.ratio is not None or args.method == "full" else 128
    model, tokenizer = load_model(args.model, quiet=args.json)
    out = generate(
        model,
        tokenizer,
        prompt,
        method=args.method,
        budget=budget,
        ratio=args.ratio,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        question=args.question,
        **_method_options(args),
    )
    if args.json:
        stats = asdict(out.stats)
        if not args.positions:
            stats.pop("kept_positions")
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": stats}))
        return 0
    s = out.stats
    print(out.text)
    print(
        f"\n[{s.method}] prompt {s.prompt_length} tokens, budget {s.budget}/head/layer: kept {s.kept_entries:,} of "
        f"{s.full_entries:,} entries; cache {s.kv_bytes / 2**20:.2f} MiB vs {s.full_kv_bytes / 2**20:.2f} MiB full; "
        f"prefill {s.prefill_seconds:.2f} s, decode {s.decode_seconds:.2f} s for {s.generated_tokens} tokens",
        file=sys.stderr,
    )
    return 0


def cmd_demo(args) -> int:
    """Hide a passkey in ~1,000 tokens of filler and ask for it with the full cache and compressed ones."""
    from .generate import generate
    from .models import load_model
    from .passkey import passkey_prompt

    model, tokenizer = load_model(args.model)
    prompt = passkey_prompt(tokenizer, args.tokens, depth=0.3, seed=1)
    print(f"Passkey {prompt.passkey} hidden in a {prompt.tokens}-token prompt; budget {args.budget} tokens per head.")
    print(f"{'method':>14}  {'answer':<18} {'kept entries':>14} {'cache MiB':>10}  {'prefill s':>9}")
    for method in ("full", "streamingllm", "snapkv", "ada-snapkv", "lava"):
        out = generate(
            model,
            tokenizer,
            prompt.text,
            method=method,
            budget=None if method == "full" else args.budget,
            max_new_tokens=8,
            chat_template=False,
        )
        s = out.stats
        answer = out.text.strip().splitlines()[0][:18] if out.text.strip() else ""
        print(
            f"{method:>14}  {answer:<18} {s.kept_entries:>14,} {s.kv_bytes / 2**20:>10.2f}  {s.prefill_seconds:>9.2f}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavakv", description="KV-cache compression for transformers models")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate with a compressed KV cache")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from a file")
    gen.add_argument("--question", help="query-agnostic protocol: compress the prompt alone, then ask this")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    gen.add_argument("--positions", action="store_true", help="with --json, include the kept positions")
    _add_method_arguments(gen)
    gen.set_defaults(handler=cmd_generate)

    demo = commands.add_parser("demo", help="passkey demo: full cache vs compressed caches on the embedded model")
    demo.add_argument("--budget", type=int, default=64)
    demo.add_argument("--tokens", type=int, default=1000)
    demo.add_argument("--model", help="transformers model directory or .gguf file (default: embedded SmolLM2)")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError) as error:
        print(f"lavakv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
