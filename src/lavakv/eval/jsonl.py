"""Reading benchmark JSONL directories, with errors that name the file, the line and the field.

A directory or dataset name that is wrong fails at once; a bad record becomes an error sample, so
that one malformed line never stops a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from lavakv.eval.samples import Sample, error_sample

logger = logging.getLogger(__name__)


def check_dir(data_dir: str | Path, benchmark: str) -> Path:
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"{benchmark} data directory {root} does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{benchmark} data directory {root} is not a directory")
    return root


def resolve_names(root: Path, requested: Iterable[str] | str | None, known: list[str], kind: str) -> list[str]:
    """The dataset names to read: the requested ones (checked), or every known one present."""
    present = [name for name in known if (root / f"{name}.jsonl").is_file()]
    if requested is None:
        if not present:
            raise FileNotFoundError(
                f"no {kind} file found in {root}; expected one or more of: {', '.join(f'{n}.jsonl' for n in known)}"
            )
        return present
    names = [requested] if isinstance(requested, str) else list(dict.fromkeys(requested))
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(known)}")
        path = root / f"{name}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{kind} file {path} not found; {kind} files present in {root}: {', '.join(present) or 'none'}"
            )
    return names


SampleBuilder = Callable[[dict[str, Any], str, str], "Sample | None"]
"""Builds one record's sample from ``(record, where, sample_id)``; ``None`` leaves the record out."""


def read_samples(
    path: Path, benchmark: str, dataset: str, id_field: str, build: SampleBuilder, limit: int | None
) -> list[Sample]:
    """The samples of one JSONL file, at most ``limit``; a record that cannot be built is kept as an error.

    Blank lines are skipped. A line that is not a JSON object, a duplicate id, or a record ``build``
    rejects with a :class:`ValueError` becomes an error sample (:func:`error_sample`) whose message
    names ``file:line``, so that the run records it as an error row and goes on with the others.
    A record's id is its ``id_field``, else ``<dataset>-<line>``.
    """
    samples: list[Sample] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if limit is not None and len(samples) >= limit:
                break
            where = f"{path}:{line_no}"
            sample_id = f"{dataset}-{line_no}"
            try:
                record = _record(line, where)
                if record.get(id_field) is not None:
                    sample_id = str(record[id_field])
                if sample_id in seen:
                    duplicate, sample_id = sample_id, f"{dataset}-{line_no}"
                    raise ValueError(f"{where}: duplicate sample id {duplicate!r} (ids key the results store)")
                sample = build(record, where, sample_id)
            except ValueError as error:
                logger.warning("%s; it is recorded as an error row of every pair", error)
                sample = error_sample(benchmark, dataset, sample_id, str(error))
            if sample is not None:
                seen.add(sample.sample_id)
                samples.append(sample)
    return samples


def _record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def string_field(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise ValueError(f"{where}: missing required field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value
