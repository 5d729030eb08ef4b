"""Evaluation harness: benchmarks, metrics, the prefill-once runner, the results store and reports."""
