"""Reports from one or more run directories: markdown/CSV/JSON tables and PNG plots.

Scores are means over samples, in percent, per ``(benchmark, dataset, method, budget)``; a
benchmark's average is the mean of its datasets' scores, as the LongBench papers report it.
Methods are stored as method specs and shown as readable labels (``lava with uniform heads``).
Plots are drawn by :mod:`lavakv.eval.plots`, which reads the cells aggregated here.
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
from .store import ResultRow, ResultStore

FORMATS = ("md", "csv", "json")
METHOD_ORDER = list(PRESETS)


@dataclass
class Run:
    name: str
    directory: Path
    identity: dict
    rows: list[ResultRow]


@dataclass
class Cell:
    """Aggregate of one ``(benchmark, dataset, method, budget)``."""

    benchmark: str
    dataset: str
    method: str
    budget: int
    samples: int
    score: float
    kept_fraction: float
    kv_mib: float
    compress_seconds: float
    decode_ms_per_step: float
    truncated: int


def load_runs(directories: list[str | Path]) -> list[Run]:
    """Every run directory's identity and rows; a missing or empty store is a clear error."""
    if not directories:
        raise ValueError("give at least one run directory")
    runs = []
    for directory in directories:
        with ResultStore(directory, create=False) as store:
            runs.append(Run(_run_name(Path(directory)), Path(directory), store.identity(), store.rows()))
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.directory)
    if len({run.name for run in runs}) != len(runs):
        raise ValueError(f"the same run directory is given twice: {[str(d) for d in directories]}")
    return runs


def _run_name(directory: Path) -> str:
    return directory.resolve().name or str(directory)


def aggregate(rows: list[ResultRow]) -> list[Cell]:
    groups: dict[tuple, list[ResultRow]] = defaultdict(list)
    for row in rows:
        groups[(row.benchmark, row.dataset, row.method, row.budget)].append(row)
    cells = []
    for (benchmark, dataset, method, budget), group in groups.items():
        steps = sum(max(r.new_tokens - 1, 1) for r in group)
        cells.append(
            Cell(
                benchmark=benchmark,
                dataset=dataset,
                method=method,
                budget=budget,
                samples=len(group),
                score=100 * mean(r.score for r in group),
                kept_fraction=mean(r.kept_entries / r.full_entries for r in group),
                kv_mib=mean(r.kv_bytes for r in group) / 2**20,
                compress_seconds=mean(r.compress_seconds for r in group),
                decode_ms_per_step=1000 * sum(r.decode_seconds for r in group) / steps,
                truncated=sum(r.truncated for r in group),
            )
        )
    return sorted(cells, key=lambda c: (c.benchmark, c.dataset, method_rank(c.method), c.budget))


@lru_cache(maxsize=512)
def parsed_method(spec: str) -> Method | None:
    """The method a stored spec names, or ``None`` for one this installation cannot parse (a missing plugin)."""
    try:
        return parse_spec(spec)
    except (ValueError, TypeError):
        return None


def method_rank(spec: str) -> tuple[int, int, str]:
    """Presets in their listed order, each followed by the variants derived from it."""
    method = parsed_method(spec)
    origin = method.origin if method is not None and method.origin in METHOD_ORDER else None
    if origin is None:
        return (len(METHOD_ORDER), 1, spec)
    return (METHOD_ORDER.index(origin), 0 if spec == origin else 1, spec)


def method_label(spec: str) -> str:
    """A readable label for a stored method spec."""
    method = parsed_method(spec)
    return spec if method is None else method.label


def benchmark_averages(cells: list[Cell]) -> dict[tuple[str, str, int], float]:
    """``(benchmark, method, budget)`` -> mean over datasets of the dataset scores.

    Only for a method and budget that have results on every dataset of the benchmark: an average
    over a subset would not compare with the others.
    """
    datasets: dict[str, set[str]] = defaultdict(set)
    by_key: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
    for cell in cells:
        datasets[cell.benchmark].add(cell.dataset)
        by_key[(cell.benchmark, cell.method, cell.budget)][cell.dataset] = cell.score
    return {key: mean(scores.values()) for key, scores in by_key.items() if set(scores) == datasets[key[0]]}


def _budgets(cells: list[Cell]) -> list[int]:
    return sorted({c.budget for c in cells if c.method != "full"})


def _methods(cells: list[Cell]) -> list[str]:
    return sorted({c.method for c in cells}, key=method_rank)


def _table(title_column: str, lines: list[tuple[str, dict[int, float]]], budgets: list[int]) -> str:
    header = f"| {title_column} | " + " | ".join(f"B={b}" if b else "score" for b in budgets) + " |"
    rule = "|---|" + "---:|" * len(budgets)
    body = []
    for label, values in lines:
        body.append(f"| {label} | " + " | ".join(_fmt(values.get(b)) for b in budgets) + " |")
    return "\n".join([header, rule, *body])


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _method_lines(values: dict[tuple[str, int], float], methods: list[str], budgets: list[int]):
    lines = []
    for method in methods:
        if method == "full":
            full = values.get(("full", 0))
            lines.append(("full cache", {b: full for b in budgets} if full is not None else {}))
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


def markdown(runs: list[Run], plots: dict[str, list[Path]] | None = None, report_dir: Path | None = None) -> str:
    """Tables per run (benchmark averages, then each dataset), then a comparison when several runs are given."""
    parts = []
    for run in runs:
        cells = aggregate(run.rows)
        parts.append(f"## Run `{run.name}`\n")
        parts.append(_identity_line(run))
        if not cells:
            parts.append("No results yet.\n")
            continue
        budgets = _budgets(cells) or [0]
        averages = benchmark_averages(cells)
        for benchmark in sorted({c.benchmark for c in cells}):
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
            missing = sorted({(c.method, c.budget) for c in subset} - set(values))
            if missing:
                parts.append(
                    "No average (results missing on some datasets) for: "
                    + ", ".join(f"{method_label(m)}@{b}" if b else method_label(m) for m, b in missing)
                    + ".\n"
                )
            parts.append(_memory_line(subset, budgets))
            truncated = {c.dataset: c.truncated for c in subset if c.method == "full" and c.truncated}
            if truncated:
                parts.append(
                    "Prompts cut in the middle to fit the context: "
                    + ", ".join(f"{d} {n}" for d, n in sorted(truncated.items()))
                    + ".\n"
                )
            if len(datasets) > 1:
                for dataset in datasets:
                    in_dataset = {(c.method, c.budget): c.score for c in subset if c.dataset == dataset}
                    parts.append(f"#### {benchmark} / {dataset}\n")
                    parts.append(_table("method", _method_lines(in_dataset, methods, budgets), budgets) + "\n")
            for path in (plots or {}).get(run.name, []):
                if path.name.startswith(benchmark):
                    parts.append(f"![{path.stem}]({_relative(path, report_dir)})\n")
        incomplete = _incomplete(cells)
        if incomplete:
            parts.append("Cells with fewer samples than the rest of their dataset: " + ", ".join(incomplete) + ".\n")
    if len(runs) > 1:
        parts.append(comparison(runs))
    return "\n".join(parts)


def _identity_line(run: Run) -> str:
    if not run.identity:
        return ""
    return "Settings: " + ", ".join(f"{k}={v}" for k, v in sorted(run.identity.items())) + ".\n"


def _memory_line(cells: list[Cell], budgets: list[int]) -> str:
    full = [c for c in cells if c.method == "full"]
    lines = []
    for budget in budgets:
        kept = [c.kept_fraction for c in cells if c.budget == budget and c.method != "full"]
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


def comparison(runs: list[Run]) -> str:
    """Benchmark averages of several runs side by side: one line per (run, method)."""
    all_cells = {run.name: aggregate(run.rows) for run in runs}
    budgets = sorted({b for cells in all_cells.values() for b in _budgets(cells)}) or [0]
    parts = ["## Comparison of runs\n"]
    benchmarks = sorted({c.benchmark for cells in all_cells.values() for c in cells})
    for benchmark in benchmarks:
        lines = []
        for run in runs:
            averages = benchmark_averages([c for c in all_cells[run.name] if c.benchmark == benchmark])
            values = {(m, b): v for (_, m, b), v in averages.items()}
            methods = sorted({m for m, _ in values}, key=method_rank)
            lines += [(f"{run.name}: {label}", vals) for label, vals in _method_lines(values, methods, budgets)]
        parts.append(f"### {benchmark}\n\n" + _table("run: method", lines, budgets) + "\n")
    return "\n".join(parts)


def records(runs: list[Run]) -> list[dict]:
    """One flat record per run and cell (for CSV and JSON)."""
    out = []
    for run in runs:
        for cell in aggregate(run.rows):
            out.append({"run": run.name, **cell.__dict__})
    return out


def render(
    runs: list[Run], fmt: str, plots: dict[str, list[Path]] | None = None, report_dir: Path | None = None
) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "md":
        return markdown(runs, plots, report_dir)
    table = records(runs)
    if fmt == "json":
        return json.dumps(table, indent=2)
    buffer = io.StringIO()
    columns = ["run", *Cell.__dataclass_fields__]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()

