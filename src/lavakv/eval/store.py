"""The results store: one SQLite file per run directory, safe to resume and to share between processes.

Every finished ``(sample, method, budget)`` is one row, committed on its own, so a run killed at
any point (``kill -9`` included) loses at most the pair it was computing, and rerunning the same
command skips every committed row. SQLite's write-ahead log and a busy timeout let several
processes (``--shard i/N``) write to one file. The run's identity (model, protocol, prompt format,
seed, window rule) is stored once; a rerun that differs in any of them is refused rather than
mixed into the same results.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
"""Version of the results table; a store written by a newer lavakv is refused, not misread."""


@dataclass
class ResultRow:
    """One scored ``(sample, method, budget)``; ``method`` is a method spec, ``budget`` 0 for the full cache."""

    benchmark: str
    dataset: str
    sample_id: str
    method: str
    budget: int
    window: int | None
    prediction: str
    score: float
    answers: list[str]
    prompt_tokens: int
    truncated: bool
    kept_entries: int
    full_entries: int
    kv_bytes: int
    new_tokens: int
    prefill_seconds: float
    compress_seconds: float
    decode_seconds: float
    layer_budgets: list[float]
    extra: dict

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.benchmark, self.dataset, self.sample_id, self.method, self.budget)


KEY_COLUMNS = ("benchmark", "dataset", "sample_id", "method", "budget")
_COLUMNS = [f.name for f in fields(ResultRow)]
_SQL_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}
_JSON_FIELDS = tuple(f.name for f in fields(ResultRow) if f.type.split("[")[0] in ("list", "dict"))


def _column(row_field) -> str:
    """The SQL column of one :class:`ResultRow` field: JSON text for lists and dicts, NULL allowed for optionals."""
    kind = row_field.type.replace(" ", "")
    optional = kind.endswith("|None")
    sql = "TEXT" if row_field.name in _JSON_FIELDS else _SQL_TYPES[kind.removesuffix("|None")]
    return f"{row_field.name} {sql}" + ("" if optional else " NOT NULL")


SCHEMA = (
    "CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"
    "CREATE TABLE IF NOT EXISTS invocations (started REAL, command TEXT, config TEXT);\n"
    "CREATE TABLE IF NOT EXISTS results (\n    "
    + ",\n    ".join([_column(f) for f in fields(ResultRow)] + ["created REAL NOT NULL"])
    + f",\n    PRIMARY KEY ({', '.join(KEY_COLUMNS)})\n);\n"
)


class ResultStore:
    """Rows of one run directory (``<dir>/results.sqlite``)."""

    def __init__(self, directory: str | Path, create: bool = True):
        self.directory = Path(directory)
        self.path = self.directory / STORE_NAME
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no results store in {self.directory} (expected {self.path})")
        try:
            if not create:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self.connection = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None)
                self.connection.execute("PRAGMA busy_timeout = 60000")
                self._check_schema(writable=False)
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self.connection.execute("PRAGMA busy_timeout = 60000")
            self._check_schema(writable=True)
            self.connection.execute("PRAGMA journal_mode = WAL")
            self.connection.execute("PRAGMA synchronous = FULL")
            self.connection.executescript(SCHEMA)
            self.connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise ValueError(f"{self.path} is not a lavakv results store ({error})") from None

    def _check_schema(self, writable: bool) -> None:
        """Refuse a file of another program or of a newer schema; an older store of the same columns is read."""
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{self.path} was written with results schema {version}; this lavakv reads schema {SCHEMA_VERSION} "
                "(upgrade lavakv)"
            )
        if not tables and writable:
            return
        missing = {"identity", "results"} - tables
        if missing:
            raise ValueError(f"{self.path} is not a lavakv results store (no {', '.join(sorted(missing))} table)")
        columns = [row[1] for row in self.connection.execute("PRAGMA table_info(results)")]
        if columns != _COLUMNS + ["created"]:
            raise ValueError(f"{self.path} holds a results table with other columns than schema {SCHEMA_VERSION}")

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def claim_identity(self, identity: dict[str, object]) -> None:
        """Record the run's identity, or check it against the one recorded (first writer wins).

        A store without results yet takes the new identity, so a run refused at its first sample
        (a typo in a setting) does not lock its directory.
        """
        with self._transaction():
            if self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0:
                self.connection.execute("DELETE FROM identity")
            for key, value in identity.items():
                self.connection.execute(
                    "INSERT OR IGNORE INTO identity (key, value) VALUES (?, ?)", (key, json.dumps(value))
                )
        stored = self.identity()
        for key, value in identity.items():
            if stored.get(key) != json.loads(json.dumps(value)):
                raise ValueError(
                    f"{self.directory} holds a run with {key}={stored.get(key)!r}, not {value!r}; "
                    "use another --out directory to run with different settings"
                )

    def identity(self) -> dict[str, object]:
        rows = self.connection.execute("SELECT key, value FROM identity").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def log_invocation(self, command: str, config: dict) -> None:
        self.connection.execute(
            "INSERT INTO invocations VALUES (?, ?, ?)", (time.time(), command, json.dumps(config, sort_keys=True))
        )

    def done_keys(self) -> set[tuple[str, str, str, str, int]]:
        rows = self.connection.execute("SELECT benchmark, dataset, sample_id, method, budget FROM results")
        return {tuple(row) for row in rows}

    def add(self, row: ResultRow) -> bool:
        """Commit one row; ``False`` if another process had already written the same key."""
        values = asdict(row)
        for name in _JSON_FIELDS:
            values[name] = json.dumps(values[name])
        values["truncated"] = int(row.truncated)
        columns = _COLUMNS + ["created"]
        placeholders = ", ".join("?" for _ in columns)
        with self._transaction():
            cursor = self.connection.execute(
                f"INSERT OR IGNORE INTO results ({', '.join(columns)}) VALUES ({placeholders})",
                [values[name] for name in _COLUMNS] + [time.time()],
            )
        return cursor.rowcount == 1

    def rows(self) -> list[ResultRow]:
        cursor = self.connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM results ORDER BY rowid")
        rows = []
        for record in cursor:
            values = dict(zip(_COLUMNS, record))
            for name in _JSON_FIELDS:
                values[name] = json.loads(values[name])
            values["truncated"] = bool(values["truncated"])
            rows.append(ResultRow(**values))
        return rows

    def _transaction(self):
        return _Transaction(self.connection)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front so concurrent writers queue."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def __enter__(self) -> None:
        self.connection.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")
