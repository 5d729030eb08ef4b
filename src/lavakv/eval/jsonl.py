"""Reading benchmark JSONL directories, with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


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


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, record)``, skipping blank lines; bad lines fail with ``file:line``."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def string_field(record: Mapping[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise ValueError(f"{where}: missing required field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def check_unique(sample_id: str, seen: set[str], where: str) -> None:
    if sample_id in seen:
        raise ValueError(f"{where}: duplicate sample id {sample_id!r} (ids key the results store)")
    seen.add(sample_id)
