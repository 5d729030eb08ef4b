"""Command line: ``lavakv generate``, ``compress``, ``demo``, ``eval``, ``report`` and ``bench``.

Commands only: each parses its arguments, checks them, calls the library and prints the result.
Progress and status go through the ``lavakv`` logger, set up here.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import asdict, fields
from pathlib import Path

from .cache import DEFAULT_DECODE_INTERVAL, CacheConfig
from .methods import PAPER_METHODS, PRESETS, Method, parse_spec, split_specs
from .methods.method import apply_overrides, declared_options

logger = logging.getLogger("lavakv")
SPEC_HELP = "a preset or a method spec such as lava:heads=uniform or score=lava,heads=ada,layers=uniform"


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="lava", help=f"{SPEC_HELP}; presets: {', '.join(PRESETS)} (default lava)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help="prompt tokens kept per KV head per layer, window included")
    size.add_argument("--ratio", type=float, help="budget as a fraction of the prompt, in (0, 1]")
    for name, parts in declared_options().items():
        owners = ", ".join(f"{part.name} {part.kind}" for part in parts)
        parser.add_argument(f"--{name}", metavar="VALUE", help=f"method option of: {owners}")
    parser.add_argument("--model", help="smollm2 (default), gemma3-270m, transformers model directory or .gguf file")


def _method(args) -> Method:
    """The method of ``--method`` with the option flags given routed to its parts (an unused one is an error)."""
    overrides = [(name, getattr(args, name)) for name in declared_options() if getattr(args, name) is not None]
    return apply_overrides(parse_spec(args.method), overrides, args.method)


class _StandardError(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    """Status lines of the ``lavakv`` logger on standard error (warnings only when ``quiet``)."""
    if not any(isinstance(handler, _StandardError) for handler in logger.handlers):
        handler = _StandardError()
        handler.setFormatter(logging.Formatter("lavakv: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _read_prompt(args) -> str:
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        return path.read_text()
    if args.prompt is None:
        raise ValueError("give --prompt TEXT or --prompt-file FILE")
    return args.prompt


def _decode_settings(args) -> dict:
    return {"decode_budget": args.decode_budget, "decode_interval": args.decode_interval}


def cmd_generate(args) -> int:
    from .cache import CompressedCache
    from .generate import generate
    from .models import load_model

    questions = args.question or []
    if args.cache:
        if args.prompt is not None or args.prompt_file:
            raise ValueError("--cache holds the context already: give --question, not --prompt or --prompt-file")
        if not questions:
            raise ValueError("--cache needs at least one --question")
        _refuse_method_flags(args, "--cache brings its own method and budget")
        if not Path(args.cache).is_file():
            raise FileNotFoundError(f"compressed cache file not found: {args.cache}")
        model, tokenizer = load_model(args.model)
        cache = CompressedCache.load(args.cache, model)
        chat = not args.no_chat_template
        if len(questions) == 1:
            outputs = [
                generate(
                    model,
                    tokenizer,
                    cache=cache,
                    question=questions[0],
                    max_new_tokens=args.max_new_tokens,
                    chat_template=chat,
                )
            ]
        else:
            outputs = generate(
                model,
                tokenizer,
                cache=cache,
                questions=questions,
                max_new_tokens=args.max_new_tokens,
                chat_template=chat,
            )
        return _print_outputs(args, outputs, questions)
    prompt = _read_prompt(args)
    method = _method(args)
    budget = args.budget if args.budget is not None or args.ratio is not None or not method.compresses else 128
    CacheConfig.build(method, budget, args.ratio, None, args.decode_budget, args.decode_interval)
    model, tokenizer = load_model(args.model)
    common = dict(
        method=method,
        budget=budget,
        ratio=args.ratio,
        max_new_tokens=args.max_new_tokens,
        chat_template=not args.no_chat_template,
        **_decode_settings(args),
    )
    if len(questions) > 1:
        outputs = generate(model, tokenizer, prompt, questions=questions, **common)
    else:
        outputs = [generate(model, tokenizer, prompt, question=questions[0] if questions else None, **common)]
    return _print_outputs(args, outputs, questions)


def _refuse_method_flags(args, reason: str) -> None:
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("budget", "ratio", "decode_budget", "decode_interval")
        if getattr(args, name) is not None
    ]
    given += [f"--{name}" for name in declared_options() if getattr(args, name) is not None]
    if args.method != "lava":
        given.insert(0, "--method")
    if given:
        raise ValueError(f"{reason}; leave out {', '.join(given)}")


def _print_outputs(args, outputs, questions) -> int:
    if args.json:
        records = []
        for out in outputs:
            stats = asdict(out.stats)
            if not args.positions:
                stats.pop("kept_positions")
            records.append({"text": out.text, "token_ids": out.token_ids, "stats": stats})
        print(json.dumps(records[0] if len(records) == 1 and len(questions) <= 1 else records))
        return 0
    for index, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"Q{index + 1}: {questions[index]}\nA{index + 1}: {out.text}\n")
        else:
            print(out.text)
    s = outputs[0].stats
    answered = f" for {len(outputs)} questions" if len(outputs) > 1 else ""
    print(
        f"\n[{s.method}] prompt {s.prompt_length} tokens, budget {s.budget}/head/layer: kept {s.kept_entries:,} of "
        f"{s.full_entries:,} entries; cache {s.kv_bytes / 2**20:.2f} MiB vs {s.full_kv_bytes / 2**20:.2f} MiB full; "
        f"prefill {s.prefill_seconds:.2f} s, decode {s.decode_seconds:.2f} s{answered}",
        file=sys.stderr,
    )
    return 0


def cmd_compress(args) -> int:
    """Compress a context once into a ``.lkv`` file that ``lavakv generate --cache`` asks questions of."""

    from .generate import compress
    from .models import load_model

    prompt = _read_prompt(args)
    method = _method(args)
    budget = args.budget if args.budget is not None or args.ratio is not None or not method.compresses else 128
    CacheConfig.build(method, budget, args.ratio, None, args.decode_budget, args.decode_interval)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory for --out not found: {out.parent}")
    model, tokenizer = load_model(args.model)
    cache = compress(
        model,
        tokenizer,
        prompt,
        method=method,
        budget=budget,
        ratio=args.ratio,
        chat_template=not args.no_chat_template,
        decode_budget=args.decode_budget,
        decode_interval=args.decode_interval,
    )
    size = cache.save(out)
    stats = cache.stats(positions=False)
    sequence = stats.sequences[0]
    print(
        f"{out}: {size / 2**20:.2f} MiB for a {sequence.prompt_length}-token context ({stats.method}, budget "
        f"{sequence.budget}/head/layer: kept {stats.kept_entries:,} of {stats.full_entries:,} entries); the full "
        f"cache would hold {stats.full_kv_bytes / 2**20:.2f} MiB ({stats.full_kv_bytes / size:.1f}x the file)"
    )
    return 0


DEMO_METHODS = ("full", "streamingllm", "snapkv", "ada-snapkv", "lava")


def cmd_demo(args) -> int:
    """Hide a passkey in ~1,000 tokens of filler and ask for it with the full cache and compressed ones."""
    from .cache import check_budget
    from .generate import generate
    from .models import load_model
    from .passkey import passkey_prompt

    if args.tokens < 100:
        raise ValueError(f"--tokens must be at least 100 (the passkey and its question need room), got {args.tokens}")
    options = {} if args.window is None else {"window": args.window}
    methods = {name: Method.preset(name, **({} if name == "full" else options)) for name in DEMO_METHODS}
    for method in methods.values():
        check_budget(method, None if not method.compresses else args.budget, None)
    model, tokenizer = load_model(args.model)
    prompt = passkey_prompt(tokenizer, args.tokens, depth=0.3, seed=1)
    print(f"Passkey {prompt.passkey} hidden in a {prompt.tokens}-token prompt; budget {args.budget} tokens per head.")
    print(f"{'method':>14}  {'answer':<18} {'kept entries':>14} {'cache MiB':>10}  {'prefill s':>9}")
    for name, method in methods.items():
        out = generate(
            model,
            tokenizer,
            prompt.text,
            method=method,
            budget=args.budget if method.compresses else None,
            max_new_tokens=8,
            chat_template=False,
        )
        s = out.stats
        answer = out.text.strip().splitlines()[0][:18] if out.text.strip() else ""
        print(f"{name:>14}  {answer:<18} {s.kept_entries:>14,} {s.kv_bytes / 2**20:>10.2f}  {s.prefill_seconds:>9.2f}")
    return 0


def _split(text: str | None, kind, name: str) -> list | None:
    """``"a,b,c"`` -> typed list; a bad item is an error naming the option and the item."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise ValueError(f"--{name} takes a comma-separated list of {kind.__name__} values, got {text!r}") from None


def cmd_eval(args) -> int:
    """Evaluate methods x budgets on benchmarks, prefilling each sample once, into a resumable store."""
    from .eval.evaluation import evaluate

    result = evaluate(eval_config(args))
    note = f" ({result.errors} error rows: see lavakv report)" if result.errors else ""
    print(f"{len(result.rows)} results{note} in {result.out}; report with: lavakv report {result.out}")
    return 0


def eval_config(args):
    """``lavakv eval``'s flags as an :class:`~lavakv.eval.evaluation.EvalConfig`.

    Each benchmark takes the flags that are fields of its class; a flag that none of the run's
    benchmarks reads is an error, not a silent no-op.
    """
    from .eval.benchmarks import benchmark_class
    from .eval.evaluation import EvalConfig

    classes = [benchmark_class(name) for name in _split(args.benchmark, str, "benchmark")]
    given = {name: _parsed_option(name, value) for name, value in _benchmark_flags(args).items() if value is not None}
    for name in given:
        if not any(name in cls.options() for cls in classes):
            readers = ", ".join(cls.name for cls in _option_readers(name))
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(args, name)} is read by {readers} only; "
                f"--benchmark {args.benchmark} does not use it"
            )
    benchmarks = tuple(cls(**{k: v for k, v in given.items() if k in cls.options()}) for cls in classes)
    budgets = _split(args.budgets, int, "budgets")
    return EvalConfig(
        benchmarks=benchmarks,
        out=args.out,
        methods=tuple(split_specs(args.methods)),
        budgets=None if budgets is None else tuple(budgets),
        window=args.window,
        model=args.model,
        device=args.device,
        protocol=args.protocol,
        chat_template=args.chat_template,
        max_length=args.max_length,
        shard=args.shard,
        shard_store=args.shard_store,
        retry_errors=args.retry_errors,
        from_scratch=args.from_scratch,
        progress=not args.quiet,
        command=" ".join(sys.argv),
        **({} if args.decode_batch is None else {"decode_batch": args.decode_batch}),
    )


def _benchmark_fields() -> dict[str, list]:
    """Every registered benchmark's option fields by name, in registration order."""
    from .eval.benchmarks import BENCHMARKS

    found: dict[str, list] = {}
    for cls in BENCHMARKS.values():
        for field_ in fields(cls):
            found.setdefault(field_.name, []).append(field_)
    return found


def _option_readers(name: str) -> list:
    from .eval.benchmarks import BENCHMARKS

    return [cls for cls in BENCHMARKS.values() if name in cls.options()]


def _benchmark_flags(args) -> dict[str, object]:
    return {name: getattr(args, name) for name in _benchmark_fields()}


def _parsed_option(name: str, value):
    """A benchmark flag's text parsed as its field declares; a bad value names the flag."""
    parse = _benchmark_fields()[name][0].metadata["parse"]
    if not isinstance(value, str) or parse is str:
        return value
    try:
        return parse(value)
    except ValueError as error:
        raise ValueError(f"--{name.replace('_', '-')} {error}") from None


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per benchmark option field (``lengths`` -> ``--lengths``), its help naming who reads it."""
    for name, found in _benchmark_fields().items():
        readers = [cls.name for cls in _option_readers(name)]
        defaults = sorted({_shown(f.default) for f in found if f.default is not None})
        default = f"; default {' or '.join(defaults)}" if defaults else ""
        kind = int if found[0].metadata["parse"] is int else str
        help_text = f"{found[0].metadata['help']} ({', '.join(readers)}{default})"
        parser.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def cmd_report(args) -> int:
    """Tables (md, csv or json) for one or more run directories; with md, also report.md and PNG plots."""
    from .eval.plots import write_plots
    from .eval.report import Statistics, check_reference, load_runs, render

    runs = load_runs(args.runs)
    if args.resamples < 1:
        raise ValueError(f"--resamples must be an integer >= 1, got {args.resamples}")
    statistics = Statistics(resamples=args.resamples, seed=args.seed)
    reference = None if args.reference is None else check_reference(runs, args.reference)
    target = Path(args.out) if args.out else runs[0].directory
    plots = {}
    if args.format == "md" and not args.no_plots:
        for index, run in enumerate(runs):
            folder = target if len(runs) == 1 else target / "plots" / f"{index}-{Path(run.name).name}"
            plots[run.name] = write_plots(run, folder, statistics)
    text = render(runs, args.format, plots, report_dir=target, reference=reference, statistics=statistics)
    if args.format == "md":
        target.mkdir(parents=True, exist_ok=True)
        (target / "report.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


def cmd_bench(args) -> int:
    """Quick speed and memory table: full cache vs methods at one prompt length and a few budgets."""
    import torch

    from .bench import bench_prompt, check_bench_arguments, format_table, load_bench_model, parse_memory, run_bench

    methods = [parse_spec(spec).spec for spec in split_specs(args.methods)]
    budgets = _split(args.budgets, int, "budgets")
    check_bench_arguments(methods, budgets, args.length, args.decode_tokens)
    memory = None if args.capacity is None else parse_memory(args.capacity)
    if args.generate_tokens < 0:
        raise ValueError(f"--generate-tokens must be >= 0, got {args.generate_tokens}")
    model, tokenizer, name = load_bench_model(args.model)
    limit = model.config.get_text_config().max_position_embeddings
    if args.length + args.decode_tokens > limit:
        raise ValueError(
            f"--length {args.length} plus {args.decode_tokens} decode tokens exceeds the model's context of {limit}"
        )
    input_ids = bench_prompt(tokenizer, args.length, model.config.vocab_size)
    if args.capacity is not None:
        from .bench import format_capacity, measure_capacity

        results = measure_capacity(model, input_ids, memory, methods, budgets, args.generate_tokens)
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(result) for result in results], indent=1))
        print(format_capacity(results))
        return 0

    def progress(result) -> None:
        logger.info("measured %s budget=%s", result.method, result.budget)

    logger.info("bench: %s, %d-token prompt, %d threads", name, args.length, torch.get_num_threads())
    results = run_bench(model, input_ids, methods, budgets, args.decode_tokens, name, on_result=progress)
    if args.json:
        from .bench import ratios

        Path(args.json).write_text(json.dumps(ratios(results), indent=1))
    print(format_table(results))
    return 0


def cmd_calibrate(args) -> int:
    """Measure per-head profiles (HeadKV importance, DuoAttention gates) on the model and write them to a file."""
    from .calibration import calibrate
    from .models import load_model

    lengths = _split(args.lengths, int, "lengths")
    depths = _split(args.depths, float, "depths")
    model, tokenizer = load_model(args.model)
    profile = calibrate(model, tokenizer, args.out, lengths, depths, args.needles)
    procedure = profile["procedure"]
    print(
        f"wrote {args.out}: headkv and duo profiles of {profile['model']['name']} "
        f"({profile['model']['num_layers']} layers x {profile['model']['num_kv_heads']} KV heads) from "
        f"{procedure['prompts']} prompts in {procedure['seconds']} s; use e.g. --methods headkv:profile={args.out}"
    )
    return 0


def _take_dash_values(parser: argparse.ArgumentParser) -> None:
    """Let option values such as ``--shard -1/2`` start with a dash and a digit.

    argparse takes a word starting with ``-`` for an option unless it looks like a plain negative
    number, so ``--shard -1/2`` failed with "expected one argument" before ``parse_shard`` could
    name the rule. No lavakv option starts with a dash and a digit, so such a word is a value (the
    rule newer Pythons use, ``-\\.?\\d``).
    """
    parser._negative_number_matcher = re.compile(r"-\.?\d")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavakv", description="KV-cache compression for transformers models")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate_command(commands)
    _add_compress_command(commands)
    _add_demo_command(commands)
    _add_eval_command(commands)
    _add_report_command(commands)
    _add_bench_command(commands)
    _add_calibrate_command(commands)
    return parser


def _add_calibrate_command(commands) -> None:
    cal = commands.add_parser(
        "calibrate", help="measure per-head profiles (headkv, duo-attention) on a model from needle prompts"
    )
    cal.add_argument("--out", required=True, help="the profile file to write (JSON); name it in a method spec")
    cal.add_argument("--model", help="smollm2 (default), a transformers directory or a .gguf")
    cal.add_argument("--lengths", default="1000,2000", help="prompt lengths in tokens (default 1000,2000)")
    cal.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9", help="needle depths in [0, 1]")
    cal.add_argument("--needles", type=int, default=4, help="how many of the shipped needles (default 4)")
    cal.set_defaults(handler=cmd_calibrate)


def _add_generate_command(commands) -> None:
    gen = commands.add_parser("generate", help="generate with a compressed KV cache")
    gen.add_argument("--prompt", help="the prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from a file")
    gen.add_argument(
        "--question",
        action="append",
        help="query-agnostic protocol: compress the prompt alone, then ask this (repeat it: the context is "
        "compressed once and the questions are answered together)",
    )
    gen.add_argument("--cache", help="a compressed context from lavakv compress (.lkv) to ask --question of")
    gen.add_argument(
        "--decode-budget", type=int, help="bound the cache while generating: tokens per KV head per layer (off)"
    )
    gen.add_argument(
        "--decode-interval", type=int, help=f"decode steps between evictions (default {DEFAULT_DECODE_INTERVAL})"
    )
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--json", action="store_true", help="print text and statistics as JSON")
    gen.add_argument("--positions", action="store_true", help="with --json, include the kept positions")
    _add_method_arguments(gen)
    gen.set_defaults(handler=cmd_generate)


def _add_compress_command(commands) -> None:
    comp = commands.add_parser("compress", help="compress a context once into a file to ask questions of later")
    comp.add_argument("--prompt", help="the context text")
    comp.add_argument("--prompt-file", help="read the context from a file")
    comp.add_argument("--out", required=True, help="the .lkv file to write")
    comp.add_argument("--no-chat-template", action="store_true", help="feed the context as plain text")
    comp.add_argument(
        "--decode-budget", type=int, help="bound the cache while answering: tokens per KV head per layer (off)"
    )
    comp.add_argument(
        "--decode-interval", type=int, help=f"decode steps between evictions (default {DEFAULT_DECODE_INTERVAL})"
    )
    _add_method_arguments(comp)
    comp.set_defaults(handler=cmd_compress)


def _add_demo_command(commands) -> None:
    demo = commands.add_parser("demo", help="passkey demo: full cache vs compressed caches on the embedded model")
    demo.add_argument("--budget", type=int, default=64, help="tokens per KV head per layer (default 64)")
    demo.add_argument("--window", type=int, help="observation window of every method (default 32)")
    demo.add_argument("--tokens", type=int, default=1000, help="prompt length (default 1000)")
    demo.add_argument("--model", help="smollm2 (default), gemma3-270m, transformers model directory or .gguf file")
    demo.set_defaults(handler=cmd_demo)


def _add_eval_command(commands) -> None:
    from .eval.evaluation import DEFAULT_EVAL_BUDGETS

    ev = commands.add_parser("eval", help="score methods x budgets on benchmarks (prefill once, resumable)")
    from .eval.benchmarks import BENCHMARKS

    ev.add_argument("--benchmark", required=True, help=f"{', '.join(BENCHMARKS)} (comma-separated)")
    ev.add_argument(
        "--methods",
        default=",".join(PAPER_METHODS),
        help=f"comma-separated; each {SPEC_HELP} (default: the LAVa paper's {', '.join(PAPER_METHODS)}; "
        f"every preset: {', '.join(PRESETS)})",
    )
    ev.add_argument(
        "--budgets", help=f"comma-separated tokens per KV head per layer (default {_shown(DEFAULT_EVAL_BUDGETS)})"
    )
    ev.add_argument("--out", required=True, help="run directory (results.sqlite); rerunning resumes")
    ev.add_argument("--model", help="smollm2 (default), gemma3-270m, transformers model directory or .gguf file")
    _add_benchmark_arguments(ev)
    ev.add_argument("--protocol", default="query-aware", help="query-aware (default) or query-agnostic")
    ev.add_argument(
        "--chat-template", default="auto", choices=["auto", "on", "off"], help="auto: each benchmark's standard"
    )
    ev.add_argument(
        "--max-length",
        type=int,
        help="cut prompts in the middle to this many tokens, as LongBench's pred.py (default: the model's context "
        "minus 500 for longbench and infinitebench; generated benchmarks are built to fit the model's context)",
    )
    ev.add_argument("--window", type=int, help="observation window for every method (default: min(32, budget/2))")
    ev.add_argument(
        "--shard",
        help="i/N: evaluate every N-th sample from the i-th; auto: from torchrun/accelerate (RANK, WORLD_SIZE) or a "
        "Slurm array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)",
    )
    ev.add_argument(
        "--shard-store",
        choices=["shared", "own"],
        help="shared: every shard writes results.sqlite (one machine or a database all can lock); own: each shard "
        "its own file in --out (default: own with --shard auto, shared otherwise)",
    )
    _take_dash_values(ev)
    ev.add_argument(
        "--decode-batch",
        type=int,
        help="rows decoded together: a sample's (method, budget) pairs of budgets within 4x of each other (default "
        "32; 1 decodes one pair at a time)",
    )
    ev.add_argument("--retry-errors", action="store_true", help="run again the pairs a previous run recorded as errors")
    ev.add_argument(
        "--device", default="auto", help="auto (default: the launcher's GPU, else cuda, else cpu), cpu, cuda:0..."
    )
    ev.add_argument("--from-scratch", action="store_true", help="prefill every (method, budget) anew (for timing)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(handler=cmd_eval)


def _add_report_command(commands) -> None:
    rep = commands.add_parser("report", help="tables and plots from run directories")
    rep.add_argument("runs", nargs="+", help="run directories (several: also a comparison table)")
    rep.add_argument("--format", default="md", choices=["md", "csv", "json"])
    rep.add_argument("--out", help="where report.md and plots go (default: the first run directory)")
    rep.add_argument("--no-plots", action="store_true")
    rep.add_argument(
        "--reference",
        metavar="SPEC",
        help="also show every method's paired difference to this one (full, lava, ...) on the same samples",
    )
    rep.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval (default 2000)")
    rep.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default 0)")
    rep.set_defaults(handler=cmd_report)


def _add_bench_command(commands) -> None:
    bench = commands.add_parser("bench", help="quick speed and memory table: full cache vs compressed caches")
    bench.add_argument("--model", help="smollm2 (default), llama3-layout-1b (random weights), a directory or .gguf")
    bench.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    bench.add_argument("--budgets", default="128,512", help="comma-separated (default 128,512)")
    bench.add_argument("--methods", default="snapkv,ada-snapkv,cake,lava", help=f"comma-separated; each {SPEC_HELP}")
    bench.add_argument("--decode-tokens", type=int, default=64, help="greedy steps timed per configuration")
    bench.add_argument(
        "--capacity",
        metavar="MEM",
        help="instead of timing: how many sequences of --length tokens fit in MEM (e.g. 80GiB) per cache",
    )
    bench.add_argument(
        "--generate-tokens", type=int, default=0, help="with --capacity: tokens each sequence generates (default 0)"
    )
    bench.add_argument("--json", help="also write the measurements and ratios to this JSON file")
    bench.set_defaults(handler=cmd_bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(quiet=bool(getattr(args, "json", False) is True or getattr(args, "quiet", False)))
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as error:  # a bad input or an unsupported request
        print(f"lavakv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
