"""NVIDIA's kvpress as an evaluation engine: its presses on ``lavakv eval``'s samples, as ordinary result rows.

    bash benchmarks/kvpress/setup_venv.sh                          # once: kvpress's own venv
    lavakv eval --benchmark niah --lengths 1000 --limit 4 --methods snapkv --budgets 128 --out RUN
    OMP_NUM_THREADS=2 python benchmarks/kvpress/engine.py --out RUN --presses snapkv --budgets 128
    lavakv report RUN --reference kvpress:snapkv                   # or --reference snapkv

Run with lavakv's Python. kvpress 0.5.5 pins transformers<5.3, under which lavakv does not import,
so the work is split in two processes: this one builds the very samples ``lavakv eval`` builds
(same benchmarks, prompt cut, chat template and token ids), writes them as requests, starts
``generate.py`` with the kvpress venv's Python, follows the generations it appends, and decodes,
scores and stores each one as lavakv's runner does (stop ids dropped, first line for the datasets
answered in one line, :func:`lavakv.eval.metrics.score`). Rows carry the method ``kvpress:PRESS``
(``kvpress:snapkv``, ``kvpress:pyramidkv``, ``kvpress:ada-snapkv``, ``kvpress:full``), so they sit
in the same run directory as lavakv's rows and ``lavakv report`` pairs them sample by sample.

The run directory's identity (model, protocol, chat template, prompt cut, seed...) is built as
``lavakv eval`` builds it and must agree with the one recorded there. Options left out are taken
from the last invocation recorded in the directory, so the engine evaluates the samples of the
``lavakv eval`` run it joins; a fresh directory takes ``lavakv eval``'s defaults. Rows already
stored are skipped (error rows too, unless ``--retry-errors``); a pair kvpress fails on, or one
left undone when its process dies, is an error row and the others go on. A budget B keeps B prompt
tokens per KV head per layer, observation window included, on both engines; kvpress's window is
its own default (64 for SnapKV), recorded in each row.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lavakv.cli import build_parser as lavakv_parser
from lavakv.cli import eval_config
from lavakv.eval.evaluation import EvalConfig, logged_config, recorded_config, run_identity, settle_lengths
from lavakv.eval.metrics import score
from lavakv.eval.runner import error_row, first_line, plan, prepare, protocol_ids
from lavakv.eval.samples import Sample, interleave_datasets
from lavakv.eval.store import ResultRow, ResultStore

logger = logging.getLogger("lavakv.kvpress")

HERE = Path(__file__).resolve().parent
GENERATE = HERE / "generate.py"
KVPRESS_PYTHON = HERE / ".venv" / "bin" / "python"
ENGINE = "kvpress"
PRESSES = ("full", "snapkv", "pyramidkv", "ada-snapkv")
"""The presses ``generate.py`` runs (its ``PRESSES``)."""
DEFAULT_PRESSES = "snapkv,pyramidkv,ada-snapkv"
DEFAULT_BUDGETS = "32,64,128,256"
OVERRIDES = ("protocol", "chat_template", "max_length", "model", "window")
"""Identity settings the engine's own flags may set over the recorded config."""
"""The ``lavakv eval`` options that choose the samples or enter the run's identity, with eval's defaults.

``window`` only enters the identity: kvpress's presses keep their own window."""


@dataclass(frozen=True)
class PressPair:
    """One kvpress press at one budget (0 for ``full``), with the key lavakv's runner gives its pairs."""

    press: str
    budget: int

    @property
    def spec(self) -> str:
        return f"{ENGINE}:{self.press}"

    @property
    def tokens(self) -> int:
        return self.budget

    @property
    def window(self) -> None:
        """Unknown before kvpress builds the press; a scored row records the window it used."""
        return None

    @property
    def key(self) -> tuple[str, int]:
        return (self.spec, self.budget)


def press_pairs(presses: Iterable[str], budgets: Iterable[int]) -> list[PressPair]:
    """Every press at every budget, ``full`` once; names and budgets are checked before any work."""
    pairs: list[PressPair] = []
    budgets = list(budgets)
    for press in presses:
        if press not in PRESSES:
            raise ValueError(f"unknown kvpress press {press!r}; valid: {', '.join(PRESSES)}")
        if press == "full":
            pairs.append(PressPair(press, 0))
            continue
        if not budgets:
            raise ValueError(f"press {press!r} needs at least one budget (--budgets)")
        for budget in budgets:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"budgets must be integers >= 1 (tokens per KV head per layer), got {budget!r}")
            pairs.append(PressPair(press, budget))
    return list(dict.fromkeys(pairs))


def sample_key(sample: Sample) -> tuple[str, str, str]:
    return (sample.benchmark, sample.dataset, sample.sample_id)


def request_of(prepared, pairs: list[PressPair], protocol: str, stop_ids: set[int]) -> dict:
    """One line of the requests file: the ids to prefill and to feed after it, how to stop, the pairs to run.

    The query-aware protocol prefills the whole prompt, the query-agnostic one the context and then
    feeds the question, as :func:`lavakv.eval.runner.evaluate_sample` does (and refuses a sample
    whose question the middle cut reached into, as it does).
    """
    sample = prepared.sample
    prefill_ids, after_prefill_ids = protocol_ids(prepared, protocol)
    return {
        "key": list(sample_key(sample)),
        "prefill_ids": prefill_ids,
        "after_prefill_ids": after_prefill_ids,
        "stop_ids": sorted(stop_ids),
        "max_new_tokens": sample.max_new_tokens,
        "stop_at_newline": sample.stop_at_newline,
        "pairs": [[pair.press, pair.budget] for pair in pairs],
    }


def message_row(sample: Sample, pair: PressPair, message: str, prepared=None) -> ResultRow:
    """The error row of a pair, carrying ``message`` as it was written (kvpress's error names its own type)."""
    return dataclasses.replace(error_row(sample, pair, RuntimeError(message), prepared), error=message)


def generation_row(
    sample: Sample, prepared, pair: PressPair, generation: dict, tokenizer, stop_ids: set[int]
) -> ResultRow:
    """The result row of one generation line: decoded and scored as ``lavakv eval`` decodes and scores its answers.

    Stop ids are dropped and special tokens skipped; for a sample answered on one line the
    prediction ends at its first line break (``generate.py`` stops there too). ``prefill_seconds``
    is kvpress's prefill, which compresses as it goes (``compress_seconds`` is 0); ``decode_seconds``
    the question, if fed after compression, and the answer.
    """
    if "error" in generation:
        return message_row(sample, pair, str(generation["error"]), prepared)
    tokens = [int(token) for token in generation["tokens"]]
    prediction = tokenizer.decode([t for t in tokens if t not in stop_ids], skip_special_tokens=True)
    if sample.stop_at_newline:
        prediction = first_line(prediction)
    return ResultRow(
        benchmark=sample.benchmark,
        dataset=sample.dataset,
        sample_id=sample.sample_id,
        method=pair.spec,
        budget=pair.tokens,
        window=generation.get("window"),
        prediction=prediction,
        score=float(score(sample, prediction)),
        answers=list(sample.answers),
        prompt_tokens=len(prepared.prompt),
        truncated=prepared.truncated,
        kept_entries=int(generation["kept_entries"]),
        full_entries=int(generation["full_entries"]),
        kv_bytes=int(generation["kv_bytes"]),
        new_tokens=len(tokens),
        prefill_seconds=float(generation["prefill_seconds"]),
        compress_seconds=0.0,
        decode_seconds=float(generation["decode_seconds"]),
        layer_budgets=[round(float(value), 3) for value in generation.get("layer_budgets", [])],
        extra=sample.extra,
        decode_rows=1,
    )


@dataclass
class _Job:
    sample: Sample
    prepared: object
    pairs: dict[tuple[str, int], PressPair]


class _StderrTail(threading.Thread):
    """Passes the kvpress process's standard error on (unless quiet) and keeps its last lines for error rows."""

    def __init__(self, stream, quiet: bool) -> None:
        super().__init__(daemon=True)
        self.stream, self.quiet = stream, quiet
        self.lines: collections.deque[str] = collections.deque(maxlen=20)

    def run(self) -> None:
        for line in self.stream:
            self.lines.append(line.rstrip("\n"))
            if not self.quiet:
                print(line, end="", file=sys.stderr, flush=True)

    def last(self) -> str:
        meaningful = [line for line in self.lines if line.strip()]
        return meaningful[-1][:300] if meaningful else "no output"


def evaluate(
    store: ResultStore,
    tokenizer,
    stop_ids: set[int],
    model_dir: str | Path,
    work: list[tuple[Sample, list[PressPair], int]],
    protocol: str,
    chat_template: str,
    python: str | Path = KVPRESS_PYTHON,
    script: str | Path = GENERATE,
    quiet: bool = False,
    on_row: Callable[[ResultRow], None] | None = None,
) -> int:
    """Run every ``(sample, pending pairs, max_length)`` of ``work`` through kvpress into ``store``; rows written.

    Samples that cannot be prepared get error rows at once. The others go to one ``script``
    process (``python script MODEL_DIR REQUESTS GENERATIONS``, the files in ``<run>/kvpress/``),
    whose generations are turned into rows and committed as they arrive, so that a stopped run
    keeps what it finished. Pairs the process did not write before it exited are error rows
    naming its exit status and last line of output; an interrupt stops it and records nothing more.
    """
    written = 0

    def add(row: ResultRow) -> None:
        nonlocal written
        written += store.add(row)
        if on_row is not None:
            on_row(row)

    jobs: dict[tuple[str, str, str], _Job] = {}
    requests = []
    for sample, pending, max_length in work:
        prepared = None
        try:
            prepared = prepare(tokenizer, sample, chat_template, max_length)
            requests.append(request_of(prepared, pending, protocol, stop_ids))
        except Exception as error:  # noqa: BLE001 - one bad sample never stops a run
            for pair in pending:
                add(error_row(sample, pair, error, prepared))
            continue
        jobs[sample_key(sample)] = _Job(sample, prepared, {(pair.press, pair.budget): pair for pair in pending})
    if not requests:
        return written
    folder = store.directory / ENGINE
    folder.mkdir(parents=True, exist_ok=True)
    requests_path, generations_path = folder / "requests.jsonl", folder / "generations.jsonl"
    requests_path.write_text("".join(json.dumps(request) + "\n" for request in requests), encoding="utf-8")
    generations_path.write_text("", encoding="utf-8")
    command = [str(python), str(script), str(model_dir), str(requests_path), str(generations_path)]
    logger.info("kvpress: %d pairs of %d samples: %s", sum(len(job.pairs) for job in jobs.values()), len(jobs), command)
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = _StderrTail(process.stderr, quiet)
    tail.start()

    def take(line: str) -> None:
        generation = json.loads(line)
        job = jobs.get(tuple(generation.get("key", ())))
        pair = None if job is None else job.pairs.pop((generation.get("press"), generation.get("budget")), None)
        if pair is None:
            logger.warning("kvpress: a generation for no pending pair: %s", line[:200])
            return
        try:
            row = generation_row(job.sample, job.prepared, pair, generation, tokenizer, stop_ids)
        except Exception as error:  # noqa: BLE001 - a generation that cannot be scored is that pair's error
            row = error_row(job.sample, pair, error, job.prepared)
        add(row)

    try:
        _follow(process, generations_path, take)
    except BaseException:
        process.terminate()
        process.wait()
        raise
    tail.join(timeout=5)
    status = process.returncode
    for job in jobs.values():
        for pair in job.pairs.values():
            why = f"exited with status {status}" if status else "exited without it"
            add(
                message_row(
                    job.sample, pair, f"the kvpress process {why} before this pair: {tail.last()}", job.prepared
                )
            )
    return written


def _follow(process: subprocess.Popen, path: Path, take: Callable[[str], None], every: float = 0.5) -> None:
    """Hand each complete line appended to ``path`` to ``take`` until ``process`` has exited and all is read."""
    buffer = ""
    with path.open(encoding="utf-8") as handle:
        while True:
            running = process.poll() is None
            buffer += handle.read()
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.strip():
                    take(line)
            if not running:
                return
            time.sleep(every)


def engine_config(args: argparse.Namespace, sample_flags: list[str]) -> EvalConfig:
    """The run's :class:`EvalConfig`: ``--benchmark`` and the sample flags as ``lavakv eval`` parses them,
    else the one the run directory recorded; ``--protocol``, ``--chat-template``, ``--max-length``,
    ``--model`` and ``--window`` given here override it.
    """
    if args.benchmark is not None:
        parsed = lavakv_parser().parse_args(
            ["eval", "--benchmark", args.benchmark, "--out", str(args.out), *sample_flags]
        )
        config = eval_config(parsed)
    else:
        if sample_flags:
            raise ValueError(f"{' '.join(sample_flags)}: sample options go with --benchmark")
        config = recorded_config(args.out)
        if config is None:
            raise ValueError("give --benchmark (the run directory records no lavakv eval run to take it from)")
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    return dataclasses.replace(config, **overrides)


def model_directory(model: str | None) -> Path:
    """The transformers directory of ``--model`` that kvpress loads: the one ``lavakv.load_model`` reads."""
    from lavakv.models import DEFAULT_MODEL, MODELS, convert_gguf

    name = DEFAULT_MODEL if model is None else model
    if name in MODELS:
        return convert_gguf(MODELS[name].gguf_path())
    path = Path(name)
    return convert_gguf(path) if path.is_file() else path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="run directory (a lavakv eval run to join, or new)")
    parser.add_argument("--presses", default=DEFAULT_PRESSES, help=f"comma-separated, of {', '.join(PRESSES)}")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated tokens per KV head per layer")
    parser.add_argument("--kvpress-python", type=Path, default=Path(os.environ.get("KVPRESS_PYTHON", KVPRESS_PYTHON)))
    parser.add_argument("--retry-errors", action="store_true", help="run again the pairs stored as errors")
    parser.add_argument("--quiet", action="store_true", help="no kvpress progress lines")
    group = parser.add_argument_group(
        "samples and identity (default: as recorded in --out); --benchmark takes lavakv eval's sample flags "
        "(--lengths, --limit, --data...) after it"
    )
    group.add_argument("--benchmark")
    group.add_argument("--protocol")
    group.add_argument("--chat-template", choices=["auto", "on", "off"])
    group.add_argument("--max-length", type=int)
    group.add_argument("--model")
    group.add_argument("--window", type=int, help="only to match a lavakv eval run made with --window")
    return parser


def main(argv: list[str] | None = None) -> int:
    from lavakv.models import load_model
    from lavakv.prompting import stop_token_ids

    args, sample_flags = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    pairs = press_pairs([p for p in args.presses.split(",") if p], [int(b) for b in args.budgets.split(",") if b])
    python = args.kvpress_python
    if not python.is_file():
        raise FileNotFoundError(f"no kvpress Python at {python}: run bash benchmarks/kvpress/setup_venv.sh first")
    config = engine_config(args, sample_flags)
    model, tokenizer = load_model(config.model)
    lengths, stop_ids = settle_lengths(config, model), stop_token_ids(model, tokenizer)
    del model
    work = []
    with ResultStore(args.out) as store:
        store.claim_identity(run_identity(config, lengths.max_length, lengths.generated_max_length))
        logged = {"engine": ENGINE, "presses": args.presses, "budgets": args.budgets, **logged_config(config)}
        store.log_invocation(" ".join(sys.argv), logged)
        for benchmark in config.benchmarks:
            samples = benchmark.samples(None if benchmark.reads_files else tokenizer, config.chat_template != "off")
            pending = plan(interleave_datasets(samples), pairs, store, retry_errors=args.retry_errors)
            work += [(sample, todo, lengths.of(benchmark, config)) for sample, todo in pending]
        logger.info(
            "%d rows to do (%d samples x up to %d pairs)", sum(len(p) for _, p, _ in work), len(work), len(pairs)
        )

        def report(row: ResultRow) -> None:
            outcome = f"error {row.error}" if row.error else f"score {row.score:.3f} {row.prediction[:40]!r}"
            logger.info(
                "%s/%s/%s %s@%d: %s", row.benchmark, row.dataset, row.sample_id, row.method, row.budget, outcome
            )

        written = evaluate(
            store,
            tokenizer,
            stop_ids,
            model_directory(config.model),
            work,
            config.protocol,
            config.chat_template,
            python=python,
            quiet=args.quiet,
            on_row=report,
        )
    print(f"{written} kvpress rows written in {args.out}; report with: lavakv report {args.out} --reference snapkv")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as error:
        print(f"kvpress engine: error: {error}", file=sys.stderr)
        sys.exit(2)
