"""PNG plots for reports (matplotlib, headless), from the cells :mod:`lavakv.eval.report` aggregates."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import (  # noqa: E402
    DEFAULT_STATISTICS,
    Cell,
    Run,
    Statistics,
    aggregate,
    benchmark_intervals,
    benchmark_kind,
    keeps_all,
    method_label,
    method_rank,
    parsed_method,
    row_label,
)
from .stats import Interval  # noqa: E402
from .store import ResultRow  # noqa: E402


def _dynamic_layers(spec: str) -> bool:
    method = parsed_method(spec)
    return method is not None and method.progressive


def score_vs_budget(
    benchmark: str, cells: list[Cell], path: Path, intervals: dict[tuple[str, str, int], Interval] | None = None
) -> Path:
    """Benchmark average (mean over datasets) against budget, one line per method; the full cache dashed.

    With ``intervals`` (:func:`~lavakv.eval.report.benchmark_intervals`), each line has its 95%
    bootstrap interval as a band and the full cache's as a grey band.
    """
    per_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        per_method[cell.method][cell.budget].append(cell.score)
    bands = {(m, b): i for (bench, m, b), i in (intervals or {}).items() if bench == benchmark}
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for method in sorted(per_method, key=method_rank):
        values = per_method[method]
        if keeps_all(method):
            style = "--" if method == "full" else ":"
            axes.axhline(mean(values[0]), color="black", linestyle=style, label=row_label(method))
            if (method, 0) in bands:
                axes.axhspan(bands[(method, 0)].low, bands[(method, 0)].high, color="gray", alpha=0.15)
            continue
        budgets = sorted(values)
        (line,) = axes.plot(budgets, [mean(values[b]) for b in budgets], marker="o", label=method_label(method))
        banded = [b for b in budgets if (method, b) in bands]
        if banded:
            axes.fill_between(
                banded,
                [bands[(method, b)].low for b in banded],
                [bands[(method, b)].high for b in banded],
                color=line.get_color(),
                alpha=0.12,
            )
    budgets = sorted({c.budget for c in cells if not keeps_all(c.method)})
    if budgets:
        axes.set_xscale("log", base=2)
        axes.set_xticks(budgets, [str(b) for b in budgets])
    axes.set_xlabel("budget (tokens per KV head per layer)")
    axes.set_ylabel("score (%)")
    axes.set_title(f"{benchmark}: score against budget")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def needle_heatmaps(rows: list[ResultRow], out_dir: Path) -> list[Path]:
    """One figure per budget: a depth x length heat map of the needle score per method (full cache first)."""
    scores: dict[tuple[str, int], dict[tuple[float, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        scores[(row.method, row.budget)][(float(row.extra["depth"]), int(row.extra["length"]))].append(row.score)
    depths = sorted({d for grid in scores.values() for d, _ in grid})
    lengths = sorted({n for grid in scores.values() for _, n in grid})
    budgets = sorted({b for m, b in scores if not keeps_all(m)})
    full = sorted({m for m, _ in scores if keeps_all(m)}, key=method_rank)
    methods = sorted({m for m, _ in scores if not keeps_all(m)}, key=method_rank)
    paths = []
    for budget in budgets or [0]:
        panels = [(m, 0) for m in full] + [(m, budget) for m in methods if (m, budget) in scores]
        columns = min(len(panels), 5)
        rows_count = -(-len(panels) // columns)
        figure, axes = plt.subplots(rows_count, columns, figsize=(2.8 * columns, 2.7 * rows_count), squeeze=False)
        figure.subplots_adjust(hspace=0.45, wspace=0.3)
        for axis in axes.flat:
            axis.set_visible(False)
        image = None
        for index, (axis, (method, b)) in enumerate(zip(axes.flat, panels)):
            grid = scores[(method, b)]
            values = [[100 * mean(grid[(d, n)]) if (d, n) in grid else float("nan") for n in lengths] for d in depths]
            axis.set_visible(True)
            image = axis.imshow(values, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            axis.set_title(row_label(method), fontsize=9)
            axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            axis.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            if index + columns >= len(panels):
                axis.set_xlabel("length (tokens)", fontsize=7)
            if index % columns == 0:
                axis.set_ylabel("depth", fontsize=7)
        if image is not None:
            figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="needle recall (%)")
        figure.suptitle(f"needle in a haystack, budget {budget}" if budget else "needle in a haystack")
        path = out_dir / f"niah_heatmap_b{budget}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def layer_budgets(benchmark: str, rows: list[ResultRow], path: Path) -> Path | None:
    """Mean kept entries per KV head, per layer, for methods whose layer budgets vary (LAVa, CAKE...)."""
    curves: dict[tuple[str, int], list[list[float]]] = defaultdict(list)
    for row in rows:
        if _dynamic_layers(row.method):
            curves[(row.method, row.budget)].append(row.layer_budgets)
    dynamic = sorted({m for m, _ in curves}, key=method_rank)
    if not dynamic:
        return None
    budgets = sorted({b for _, b in curves})
    figure, axes = plt.subplots(1, len(budgets), figsize=(max(6.0, 4 * len(budgets)), 3.6), squeeze=False)
    for axis, budget in zip(axes[0], budgets):
        for method in dynamic:
            samples = curves.get((method, budget))
            if samples:
                per_layer = [mean(values) for values in zip(*samples)]
                axis.plot(range(len(per_layer)), per_layer, marker=".", label=method_label(method))
        axis.axhline(budget, color="gray", linestyle=":", label="uniform")
        axis.set_title(f"budget {budget}", fontsize=9)
        axis.set_xlabel("layer")
        axis.set_ylabel("kept entries per KV head")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"{benchmark}: per-layer budgets chosen (mean over samples)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plots(run: Run, out_dir: Path, statistics: Statistics = DEFAULT_STATISTICS) -> list[Path]:
    """PNG plots for one run: score vs budget, needle heat maps, per-layer budgets of dynamic methods."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = aggregate(run.rows, statistics)
    intervals = benchmark_intervals(run.rows, statistics)
    written = []
    for benchmark in sorted({c.benchmark for c in cells}):
        rows = [r for r in run.rows if r.benchmark == benchmark and r.error is None]
        subset = [c for c in cells if c.benchmark == benchmark]
        written.append(score_vs_budget(benchmark, subset, out_dir / f"{benchmark}_score_vs_budget.png", intervals))
        if benchmark_kind(benchmark).needle_heatmaps:
            written += needle_heatmaps(rows, out_dir)
        layer_plot = layer_budgets(benchmark, rows, out_dir / f"{benchmark}_layer_budgets.png")
        if layer_plot is not None:
            written.append(layer_plot)
    return written
