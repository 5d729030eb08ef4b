"""Reports from one or more run directories: markdown/CSV/JSON tables and PNG plots.

Scores are means over samples, in percent, per ``(benchmark, dataset, method, budget)``, each with
a 95% bootstrap interval over samples (:mod:`lavakv.eval.stats`); a benchmark's average is the
mean of its datasets' scores, as the LongBench papers report it, with an interval that resamples
within each dataset. With a reference method, every other method's paired difference to it on
the same samples is shown with its interval and wins/ties/losses. Error rows are left out of every
score and listed. Methods are stored as method specs and shown as readable labels (``lava with
uniform heads``). Plots are drawn by :mod:`lavakv.eval.plots`, which reads the cells aggregated here.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import mean

from ..methods import PRESETS, Method, parse_spec
from .benchmarks import BENCHMARKS, Benchmark
from .stats import DEFAULT_RESAMPLES, Interval, PairedDifference, bootstrap_mean, key_seed, paired_difference
from .store import ResultRow, read_run

FORMATS = ("md", "csv", "json")
METHOD_ORDER = list(PRESETS)


@dataclass
class Run:
    """One run directory: its identity, the rows of its complete samples, and how many samples are not complete.

    ``rows`` holds only samples that have a row (scored or error) for every ``(method, budget)``
    their dataset has, so that every method is compared on the same samples while a run is still
    going; ``incomplete_samples`` counts the others, which rerunning the eval finishes.
    """

    name: str
    directory: Path
    identity: dict
    rows: list[ResultRow]
    incomplete_samples: int = 0


@dataclass
class Cell:
    """Aggregate of one ``(benchmark, dataset, method, budget)``."""

    benchmark: str
    dataset: str
    method: str
    budget: int
    samples: int
    score: float
    score_low: float
    score_high: float
    kept_fraction: float
    kv_mib: float
    compress_seconds: float
    decode_ms_per_step: float
    truncated: int
    errors: int = 0
    """Rows of this key that could not be run (left out of ``samples`` and the score)."""


def load_runs(directories: list[str | Path]) -> list[Run]:
    """Every run directory's identity and rows; a missing or empty store is a clear error."""
    if not directories:
        raise ValueError("give at least one run directory")
    runs = []
    for directory in directories:
        identity, rows = read_run(directory)
        complete, incomplete = complete_samples(rows)
        runs.append(Run(_run_name(Path(directory)), Path(directory), identity, complete, incomplete))
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.directory)
    if len({run.name for run in runs}) != len(runs):
        raise ValueError(f"the same run directory is given twice: {[str(d) for d in directories]}")
    return runs


def complete_samples(rows: list[ResultRow]) -> tuple[list[ResultRow], int]:
    """The rows of samples that have every ``(method, budget)`` of their dataset, and how many samples do not."""
    pairs: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    held: dict[tuple[str, str, str], set[tuple[str, int]]] = defaultdict(set)
    for row in rows:
        pairs[(row.benchmark, row.dataset)].add((row.method, row.budget))
        held[(row.benchmark, row.dataset, row.sample_id)].add((row.method, row.budget))
    incomplete = {sample for sample, have in held.items() if have != pairs[sample[:2]]}
    return [row for row in rows if (row.benchmark, row.dataset, row.sample_id) not in incomplete], len(incomplete)


def _run_name(directory: Path) -> str:
    return directory.resolve().name or str(directory)


@dataclass(frozen=True)
class Statistics:
    """How intervals are drawn: bootstrap ``resamples`` from generators seeded by ``seed``."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0


DEFAULT_STATISTICS = Statistics()


def scored(rows: list[ResultRow]) -> list[ResultRow]:
    """The rows that hold a score (error rows left out)."""
    return [row for row in rows if row.error is None]


def aggregate(rows: list[ResultRow], statistics: Statistics = DEFAULT_STATISTICS) -> list[Cell]:
    """One cell per ``(benchmark, dataset, method, budget)`` of the scored rows, with its interval."""
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    errors: dict[tuple, int] = defaultdict(int)
    for row in rows:
        key = (row.benchmark, row.dataset, row.method, row.budget)
        if row.error is None:
            groups[key].append(row)
        else:
            errors[key] += 1
    cells = []
    for key, group in groups.items():
        benchmark, dataset, method, budget = key
        steps = sum(max(r.new_tokens - 1, 1) for r in group)
        interval = bootstrap_mean(
            [[100 * r.score for r in group]], key_seed(statistics.seed, key), statistics.resamples
        )
        cells.append(
            Cell(
                benchmark=benchmark,
                dataset=dataset,
                method=method,
                budget=budget,
                samples=len(group),
                score=interval.mean,
                score_low=interval.low,
                score_high=interval.high,
                kept_fraction=mean(r.kept_entries / r.full_entries for r in group),
                kv_mib=mean(r.kv_bytes for r in group) / 2**20,
                compress_seconds=mean(r.compress_seconds for r in group),
                decode_ms_per_step=1000 * sum(r.decode_seconds for r in group) / steps,
                truncated=sum(r.truncated for r in group),
                errors=errors[key],
            )
        )
    return sorted(cells, key=lambda c: (c.benchmark, c.dataset, method_rank(c.method), c.budget))


def _scores_by_dataset(rows: list[ResultRow]) -> dict[tuple[str, str, int], dict[str, dict[str, float]]]:
    """``(benchmark, method, budget)`` -> dataset -> sample id -> score in percent."""
    table: dict[tuple[str, str, int], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in scored(rows):
        table[(row.benchmark, row.method, row.budget)][row.dataset][row.sample_id] = 100 * row.score
    return table


def benchmark_intervals(
    rows: list[ResultRow], statistics: Statistics = DEFAULT_STATISTICS
) -> dict[tuple[str, str, int], Interval]:
    """``(benchmark, method, budget)`` -> mean over datasets of the dataset scores, with its interval.

    Only for a method and budget that have results on every dataset of the benchmark: an average
    over a subset would not compare with the others.
    """
    datasets: dict[str, set[str]] = defaultdict(set)
    for row in scored(rows):
        datasets[row.benchmark].add(row.dataset)
    out = {}
    for key, by_dataset in _scores_by_dataset(rows).items():
        if set(by_dataset) != datasets[key[0]]:
            continue
        groups = [list(by_dataset[d].values()) for d in sorted(by_dataset)]
        out[key] = bootstrap_mean(groups, key_seed(statistics.seed, key), statistics.resamples)
    return out


def paired_differences(
    rows: list[ResultRow], reference: str, statistics: Statistics = DEFAULT_STATISTICS
) -> dict[tuple[str, str, str, int], PairedDifference]:
    """Each method's score minus ``reference``'s on the samples both hold, in points.

    Keys are ``(benchmark, dataset, method, budget)`` and ``(benchmark, "", method, budget)`` for
    the benchmark average (mean over datasets of the mean differences, resampled within each
    dataset; only where the method has paired samples on every dataset). A compressing
    reference is compared at each method's budget; a full cache (:func:`keeps_all`) at every budget.
    """
    table = _scores_by_dataset(rows)
    datasets: dict[str, set[str]] = defaultdict(set)
    for row in scored(rows):
        datasets[row.benchmark].add(row.dataset)
    out = {}
    for (benchmark, method, budget), by_dataset in table.items():
        if method == reference:
            continue
        theirs = table.get((benchmark, reference, 0 if keeps_all(reference) else budget))
        if theirs is None:
            continue
        groups = {}
        for dataset, scores in by_dataset.items():
            pairs = [(scores[i], theirs[dataset][i]) for i in sorted(scores) if i in theirs.get(dataset, {})]
            if pairs:
                groups[dataset] = pairs
                key = (benchmark, dataset, method, budget)
                out[key] = paired_difference([pairs], key_seed(statistics.seed, key), statistics.resamples)
        if groups and set(groups) == datasets[benchmark]:
            key = (benchmark, "", method, budget)
            ordered = [groups[d] for d in sorted(groups)]
            out[key] = paired_difference(ordered, key_seed(statistics.seed, key), statistics.resamples)
    return out


@lru_cache(maxsize=512)
def parsed_method(spec: str) -> Method | None:
    """The method a stored spec names, or ``None`` for one this installation cannot parse (a missing plugin)."""
    try:
        return parse_spec(spec)
    except (ValueError, TypeError):
        return None


def foreign_method(spec: str) -> tuple[str, str] | None:
    """``(engine, method)`` of a row another engine wrote (``kvpress:snapkv``), ``None`` for a lavakv spec.

    An engine adapter (``benchmarks/kvpress/engine.py``) stores its methods as ``ENGINE:NAME``,
    with a name before ``:`` that is no lavakv preset and no ``=`` after it, so that they are never
    read as a lavakv method with overrides.
    """
    engine, separator, name = spec.partition(":")
    if not separator or not engine or not name or engine in PRESETS or "=" in name:
        return None
    return engine, name


def keeps_all(spec: str) -> bool:
    """Whether the method keeps the whole prompt: lavakv's ``full``, or another engine's (``kvpress:full``).

    Its rows have budget 0; tables show them at every budget, and other methods are compared
    against them at every budget.
    """
    foreign = foreign_method(spec)
    return spec == "full" or (foreign is not None and foreign[1] == "full")


def row_label(spec: str) -> str:
    """:func:`method_label`, with lavakv's ``full`` written as "full cache"."""
    return "full cache" if spec == "full" else method_label(spec)


def method_rank(spec: str) -> tuple[int, int, str]:
    """Presets in their listed order, each followed by the variants derived from it, then other engines' same method."""
    method = parsed_method(spec)
    origin = method.origin if method is not None and method.origin in METHOD_ORDER else None
    foreign = foreign_method(spec) if method is None else None
    if foreign is not None and foreign[1] in METHOD_ORDER:
        return (METHOD_ORDER.index(foreign[1]), 2, spec)
    if origin is None:
        return (len(METHOD_ORDER), 1, spec)
    return (METHOD_ORDER.index(origin), 0 if spec == origin else 1, spec)


def method_label(spec: str) -> str:
    """A readable label for a stored method spec (``kvpress snapkv`` for another engine's)."""
    method = parsed_method(spec)
    if method is not None:
        return method.label
    foreign = foreign_method(spec)
    return spec if foreign is None else " ".join(foreign)


def _budgets(cells: list[Cell]) -> list[int]:
    return sorted({c.budget for c in cells if not keeps_all(c.method)})


def _methods(cells: list[Cell]) -> list[str]:
    return sorted({c.method for c in cells}, key=method_rank)


def _table(title_column: str, lines: list[tuple[str, dict[int, float]]], budgets: list[int]) -> str:
    header = f"| {title_column} | " + " | ".join(f"B={b}" if b else "score" for b in budgets) + " |"
    rule = "|---|" + "---:|" * len(budgets)
    body = []
    for label, values in lines:
        body.append(f"| {label} | " + " | ".join(_fmt(values.get(b)) for b in budgets) + " |")
    return "\n".join([header, rule, *body])


def _fmt(value: float | Interval | PairedDifference | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, PairedDifference):
        i = value.interval
        return f"{i.mean:+.1f} [{i.low:+.1f}, {i.high:+.1f}] {value.wins}/{value.ties}/{value.losses}"
    if isinstance(value, Interval):
        return f"{value.mean:.1f} [{value.low:.1f}, {value.high:.1f}]"
    return f"{value:.1f}"


def _method_lines(values: dict[tuple[str, int], float], methods: list[str], budgets: list[int]):
    lines = []
    for method in methods:
        if keeps_all(method):
            full = values.get((method, 0))
            lines.append((row_label(method), {b: full for b in budgets} if full is not None else {}))
        else:
            lines.append((method_label(method), {b: values[(method, b)] for b in budgets if (method, b) in values}))
    return lines


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return path.name
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def markdown(
    runs: list[Run],
    plots: dict[str, list[Path]] | None = None,
    report_dir: Path | None = None,
    reference: str | None = None,
    statistics: Statistics = DEFAULT_STATISTICS,
) -> str:
    """Tables per run (benchmark averages, then each dataset), then a comparison when several runs are given.

    Scores show their 95% bootstrap interval as ``mean [low, high]``; with ``reference``, paired
    differences to it follow each benchmark's table.
    """
    parts = []
    for run in runs:
        cells = aggregate(run.rows, statistics)
        parts.append(f"## Run `{run.name}`\n")
        parts.append(_identity_line(run))
        parts.append(
            f"Scores in % with 95% bootstrap intervals over samples ({statistics.resamples} resamples, seed "
            f"{statistics.seed}); a benchmark's average is the mean of its datasets' scores.\n"
        )
        if run.incomplete_samples:
            parts.append(
                f"{run.incomplete_samples} sample(s) without a row for every (method, budget) of their dataset yet "
                "are left out, so that all methods are compared on the same samples; running the eval again finishes "
                "them.\n"
            )
        if not cells:
            parts.append("No results yet.\n")
            parts.append(_errors_section(run.rows))
            continue
        budgets = _budgets(cells) or [0]
        averages = benchmark_intervals(run.rows, statistics)
        differences = paired_differences(run.rows, reference, statistics) if reference else {}
        for benchmark in sorted({c.benchmark for c in cells}):
            parts += _benchmark_section(
                benchmark, run, cells, averages, differences, budgets, reference, statistics, plots, report_dir
            )
        incomplete = _incomplete(cells)
        if incomplete:
            parts.append("Cells with fewer samples than the rest of their dataset: " + ", ".join(incomplete) + ".\n")
        parts.append(_errors_section(run.rows))
    if len(runs) > 1:
        parts.append(comparison(runs, statistics))
    return "\n".join(parts)


def _benchmark_section(benchmark, run, cells, averages, differences, budgets, reference, statistics, plots, report_dir):
    """One benchmark of a run: its average table, paired differences, groups, notes, then each dataset."""
    parts: list[str] = []
    subset = [c for c in cells if c.benchmark == benchmark]
    datasets = sorted({c.dataset for c in subset})
    methods = _methods(subset)
    values = {(m, b): v for (bench, m, b), v in averages.items() if bench == benchmark}
    samples: dict[str, int] = defaultdict(int)
    for c in subset:
        samples[c.dataset] = max(samples[c.dataset], c.samples)
    parts.append(
        f"### {benchmark}: average over {len(datasets)} dataset(s), score in %\n\n"
        f"Samples per dataset: {', '.join(f'{d} {n}' for d, n in sorted(samples.items()))}.\n"
    )
    parts.append(_table("method", _method_lines(values, methods, budgets), budgets) + "\n")
    if reference:
        parts.append(_paired_section(benchmark, datasets, differences, reference, methods, budgets))
    for grouped in (_category_section, _length_section):
        section = grouped(benchmark, run.rows, methods, budgets, reference, statistics)
        if section:
            parts.append(section)
    missing = sorted({(c.method, c.budget) for c in subset} - set(values))
    if missing:
        parts.append(
            "No average (results missing on some datasets) for: "
            + ", ".join(f"{method_label(m)}@{b}" if b else method_label(m) for m, b in missing)
            + ".\n"
        )
    parts.append(_memory_line(subset, budgets))
    truncated = {c.dataset: c.truncated for c in subset if keeps_all(c.method) and c.truncated}
    if truncated:
        parts.append(
            "Prompts cut in the middle to fit the context: "
            + ", ".join(f"{d} {n}" for d, n in sorted(truncated.items()))
            + ".\n"
        )
    if len(datasets) > 1:
        for dataset in datasets:
            in_dataset = {
                (c.method, c.budget): Interval(c.score, c.score_low, c.score_high)
                for c in subset
                if c.dataset == dataset
            }
            parts.append(f"#### {benchmark} / {dataset}\n")
            parts.append(_table("method", _method_lines(in_dataset, methods, budgets), budgets) + "\n")
    for path in (plots or {}).get(run.name, []):
        if path.name.startswith(benchmark):
            parts.append(f"![{path.stem}]({_relative(path, report_dir)})\n")
    return parts


def _paired_section(benchmark, datasets, differences, reference, methods, budgets) -> str:
    """The benchmark's paired differences to ``reference``, its average first, then each dataset's."""
    others = [m for m in methods if m != reference]

    def lines(dataset: str):
        out = []
        for method in others:
            values = {
                b: differences[(benchmark, dataset, method, b)]
                for b in budgets
                if (benchmark, dataset, method, b) in differences
            }
            if keeps_all(method) and (benchmark, dataset, method, 0) in differences:
                values = {b: differences[(benchmark, dataset, method, 0)] for b in budgets}
            if values:
                out.append((row_label(method), values))
        return out

    label = row_label(reference)
    text = [
        f"Paired difference to {label} on the same samples, in points: mean [95% interval] wins/ties/losses"
        + (" (against the full cache at every budget)" if keeps_all(reference) else " (at the same budget)")
        + ".\n",
        _table("method", lines(""), budgets) + "\n",
    ]
    if len(datasets) > 1:
        text.append(f"<details><summary>{benchmark}: paired differences per dataset</summary>\n")
        for dataset in datasets:
            text.append(f"{dataset}\n\n" + _table("method", lines(dataset), budgets) + "\n")
        text.append("</details>\n")
    return "\n".join(text)


def benchmark_kind(name: str) -> type[Benchmark]:
    """The registered class of a row's benchmark; rows of an unregistered one get the base class's answers."""
    return BENCHMARKS.get(name, Benchmark)


def dataset_categories(benchmark: str, datasets: set[str]) -> dict[str, list[str]]:
    """The benchmark's task categories over ``datasets`` (LongBench's six); empty for benchmarks without them."""
    return benchmark_kind(benchmark).categories(datasets)


def sample_lengths(benchmark: str, rows: list[ResultRow]) -> dict[int, list[ResultRow]]:
    """The benchmark's rows by the prompt length their sample was built to (NIAH, RULER); empty with one length.

    File benchmarks are left out: their ``length`` is the record's own word count, not a setting.
    """
    if benchmark_kind(benchmark).reads_files:
        return {}
    found: dict[int, list[ResultRow]] = defaultdict(list)
    for row in rows:
        length = row.extra.get("length") if row.benchmark == benchmark else None
        if isinstance(length, int):
            found[length].append(row)
    return dict(sorted(found.items())) if len(found) > 1 else {}


def _category_section(benchmark, rows, methods, budgets, reference, statistics) -> str:
    """Per LongBench category: each method's mean over its datasets and, with ``reference``, the paired difference."""
    rows = [row for row in rows if row.benchmark == benchmark]
    categories = dataset_categories(benchmark, {row.dataset for row in rows})
    if len(categories) < 2:
        return ""
    groups = [
        (name, f"{name} ({', '.join(members)})", [row for row in rows if row.dataset in members])
        for name, members in categories.items()
    ]
    return _grouped_section(
        benchmark,
        f"{benchmark}: by category (mean of its datasets' scores)",
        groups,
        methods,
        budgets,
        reference,
        statistics,
    )


def _length_section(benchmark, rows, methods, budgets, reference, statistics) -> str:
    """Per prompt length: each method's mean over the benchmark's datasets and the paired difference."""
    lengths = sample_lengths(benchmark, rows)
    if not lengths:
        return ""
    groups = [(f"{length} tokens", f"{length} tokens", inside) for length, inside in lengths.items()]
    return _grouped_section(
        benchmark,
        f"{benchmark}: by prompt length (mean of its datasets' scores)",
        groups,
        methods,
        budgets,
        reference,
        statistics,
    )


def _grouped_section(benchmark, summary, groups, methods, budgets, reference, statistics) -> str:
    """A folded section with, per ``(name, heading, rows)`` group, the mean table and the paired table."""
    text = [f"<details><summary>{summary}</summary>\n"]
    for name, heading, inside in groups:
        values = {(m, b): v for (_, m, b), v in benchmark_intervals(inside, statistics).items()}
        text.append(f"{heading}\n\n" + _table("method", _method_lines(values, methods, budgets), budgets))
        if reference:
            differences = paired_differences(inside, reference, statistics)
            lines = []
            for method in methods:
                keys = {b: (benchmark, "", method, 0 if keeps_all(method) else b) for b in budgets}
                found = {b: differences[key] for b, key in keys.items() if key in differences}
                if found:
                    lines.append((row_label(method), found))
            text.append(
                f"\n{name}: paired difference to {method_label(reference)}, in points\n\n"
                + _table("method", lines, budgets)
            )
        text.append("")
    text.append("</details>\n")
    return "\n".join(text)


def _errors_section(rows: list[ResultRow]) -> str:
    """Error rows, counted per benchmark and dataset, with the first messages (they are left out of the scores)."""
    errors = [row for row in rows if row.error is not None]
    if not errors:
        return ""
    counts: dict[str, int] = defaultdict(int)
    for row in errors:
        counts[f"{row.benchmark}/{row.dataset}"] += 1
    listed = sorted({(r.benchmark, r.dataset, r.sample_id, r.error) for r in errors})
    lines = [f"- {b}/{d}/{i}: {message}" for b, d, i, message in listed[:20]]
    more = f"\n- ... and {len(listed) - 20} more" if len(listed) > 20 else ""
    return (
        f"**Errors**: {len(errors)} rows could not be run and are left out of the scores ("
        + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
        + "):\n\n"
        + "\n".join(lines)
        + more
        + "\n"
    )


def _identity_line(run: Run) -> str:
    if not run.identity:
        return ""
    return "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(run.identity.items())) + ".\n"


def _memory_line(cells: list[Cell], budgets: list[int]) -> str:
    full = [c for c in cells if keeps_all(c.method)]
    lines = []
    for budget in budgets:
        kept = [c.kept_fraction for c in cells if c.budget == budget and not keeps_all(c.method)]
        if kept:
            lines.append(f"B={budget}: {100 * mean(kept):.1f}%")
    parts = []
    if lines:
        parts.append("Kept prompt entries as a share of the full cache's (mean over datasets): " + ", ".join(lines))
    if full:
        parts.append(f"the full cache holds {mean(c.kv_mib for c in full):.1f} MiB per sample on average")
    return ("; ".join(parts) + ".\n") if parts else ""


def _incomplete(cells: list[Cell]) -> list[str]:
    most: dict[tuple[str, str], int] = defaultdict(int)
    for c in cells:
        most[(c.benchmark, c.dataset)] = max(most[(c.benchmark, c.dataset)], c.samples)
    return [
        f"{c.benchmark}/{c.dataset} {method_label(c.method)}@{c.budget} ({c.samples}/{most[(c.benchmark, c.dataset)]})"
        for c in cells
        if c.samples < most[(c.benchmark, c.dataset)]
    ]


def comparison(runs: list[Run], statistics: Statistics = DEFAULT_STATISTICS) -> str:
    """Benchmark averages of several runs side by side, with their intervals: one line per (run, method)."""
    all_intervals = {run.name: benchmark_intervals(run.rows, statistics) for run in runs}
    budgets = sorted({b for found in all_intervals.values() for (_, m, b) in found if not keeps_all(m)}) or [0]
    parts = ["## Comparison of runs\n"]
    benchmarks = sorted({bench for found in all_intervals.values() for (bench, _, _) in found})
    for benchmark in benchmarks:
        lines = []
        for run in runs:
            values = {(m, b): v for (bench, m, b), v in all_intervals[run.name].items() if bench == benchmark}
            methods = sorted({m for m, _ in values}, key=method_rank)
            lines += [(f"{run.name}: {label}", vals) for label, vals in _method_lines(values, methods, budgets)]
        parts.append(f"### {benchmark}\n\n" + _table("run: method", lines, budgets) + "\n")
    return "\n".join(parts)


def records(runs: list[Run], reference: str | None = None, statistics: Statistics = DEFAULT_STATISTICS) -> list[dict]:
    """One flat record per run and cell (for CSV and JSON).

    A dataset's record names its task ``category`` (LongBench's six; ``""`` elsewhere). Averages
    have dataset ``""``: a category's average has its ``category``, the benchmark's average has
    category ``""``. With ``reference``, each record also has the paired difference to it
    (``diff``, ``diff_low``, ``diff_high``, ``wins``, ``ties``, ``losses``; empty where there is none).
    """
    out = []
    for run in runs:
        scoring = run.identity.get("scoring", "")
        groups: list[tuple[str, list[ResultRow]]] = [("", run.rows)]
        for benchmark in sorted({row.benchmark for row in run.rows}):
            inside = [row for row in run.rows if row.benchmark == benchmark]
            categories = dataset_categories(benchmark, {row.dataset for row in inside})
            if len(categories) >= 2:
                groups += [(name, [r for r in inside if r.dataset in members]) for name, members in categories.items()]
        for category, rows in groups:
            differences = paired_differences(rows, reference, statistics) if reference else {}
            cells = [] if category else [cell.__dict__ for cell in aggregate(rows, statistics)] + _error_cells(rows)
            for (benchmark, method, budget), interval in benchmark_intervals(rows, statistics).items():
                cells.append(
                    {
                        **{name: "" for name in Cell.__dataclass_fields__},
                        "benchmark": benchmark,
                        "dataset": "",
                        "method": method,
                        "budget": budget,
                        "score": interval.mean,
                        "score_low": interval.low,
                        "score_high": interval.high,
                    }
                )
            for cell in cells:
                found_category = category or _category_of(cell["benchmark"], cell["dataset"])
                record = {"run": run.name, **cell, "category": found_category, "scoring": scoring}
                if reference:
                    found = differences.get((cell["benchmark"], cell["dataset"], cell["method"], cell["budget"]))
                    record.update(_difference_fields(found))
                out.append(record)
    return out


def _error_cells(rows: list[ResultRow]) -> list[dict]:
    """Records for the keys whose every row is an error row: no score, ``samples`` 0, and the error count."""
    held = {(r.benchmark, r.dataset, r.method, r.budget) for r in scored(rows)}
    errors: dict[tuple, int] = defaultdict(int)
    for row in rows:
        key = (row.benchmark, row.dataset, row.method, row.budget)
        if row.error is not None and key not in held:
            errors[key] += 1
    return [
        {
            **{name: "" for name in Cell.__dataclass_fields__},
            **dict(zip(("benchmark", "dataset", "method", "budget"), key)),
            "samples": 0,
            "errors": count,
        }
        for key, count in sorted(errors.items())
    ]


def _category_of(benchmark: str, dataset: str) -> str:
    return (benchmark_kind(benchmark).category(dataset) or "") if dataset else ""


def _difference_fields(found: PairedDifference | None) -> dict:
    if found is None:
        return dict.fromkeys(DIFFERENCE_FIELDS, "")
    i = found.interval
    return dict(zip(DIFFERENCE_FIELDS, (i.mean, i.low, i.high, found.wins, found.ties, found.losses)))


DIFFERENCE_FIELDS = ("diff", "diff_low", "diff_high", "wins", "ties", "losses")


def render(
    runs: list[Run],
    fmt: str,
    plots: dict[str, list[Path]] | None = None,
    report_dir: Path | None = None,
    reference: str | None = None,
    statistics: Statistics = DEFAULT_STATISTICS,
) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if reference is not None:
        reference = check_reference(runs, reference)
    if fmt == "md":
        return markdown(runs, plots, report_dir, reference, statistics)
    table = records(runs, reference, statistics)
    if fmt == "json":
        return json.dumps(table, indent=2)
    buffer = io.StringIO()
    columns = ["run", *Cell.__dataclass_fields__, "category", "scoring", *(DIFFERENCE_FIELDS if reference else ())]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def check_reference(runs: list[Run], reference: str) -> str:
    """``reference`` as the runs store it (its canonical spec); one no run holds is an error naming those held.

    Another engine's method (:func:`foreign_method`) is taken as written, not parsed as a lavakv spec.
    """
    spec = reference if foreign_method(reference) is not None else parse_spec(reference).spec
    held = sorted({row.method for run in runs for row in scored(run.rows)}, key=method_rank)
    if spec not in held:
        raise ValueError(
            f"--reference {reference!r} ({spec}) has no results in these runs; methods held: {', '.join(held)}"
        )
    return spec
