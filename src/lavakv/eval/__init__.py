"""Evaluation harness: benchmarks, metrics, the prefill-once runner, the results store and reports.

``lavakv.eval.evaluate(EvalConfig(...))`` runs an evaluation (:mod:`lavakv.eval.evaluation`);
they are loaded on first use, so that reading benchmarks or reports does not import the model code.
"""

from __future__ import annotations

__all__ = ["EvalConfig", "EvalResult", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from . import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
