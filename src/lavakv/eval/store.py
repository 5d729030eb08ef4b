"""The results store: SQLite files in a run directory, safe to resume and to share between processes.

Every finished ``(sample, method, budget)`` is one row, committed on its own, so a run killed at
any point (``kill -9`` included) loses at most the pairs it was computing, and rerunning the same
command skips every committed row. A sample or pair that failed is an error row carrying its
message; a later successful row for the same key replaces it.

A run directory holds ``results.sqlite`` (SQLite's write-ahead log and a busy timeout let several
processes on one machine, ``--shard i/N``, write to it) and may hold one file per shard,
``results.shard-<i>-of-<N>.sqlite``, for nodes that share no database. Resuming and reporting
read every store file of the directory (:func:`run_done_keys`, :func:`read_run`). The run's
identity (model, protocol, prompt format, seed, window rule, scoring) is stored in each file and
must agree across them; a rerun that differs in any of them is refused rather than mixed into the
same results.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 2
"""Version of the results table; a store written by a newer lavakv is refused, not misread.

Version 2 added ``decode_rows`` and ``error``; a version-1 store is upgraded when opened for
writing and read as rows decoded alone without errors otherwise."""
ADDED_IN_2 = {"decode_rows": "INTEGER NOT NULL DEFAULT 1", "error": "TEXT"}


def shard_store_name(index: int, count: int) -> str:
    """The store file of shard ``index`` of ``count`` when shards keep their own files."""
    return f"results.shard-{index}-of-{count}.sqlite"


def store_paths(directory: str | Path) -> list[Path]:
    """Every store file of a run directory: ``results.sqlite`` and the shard files, in name order."""
    root = Path(directory)
    return sorted(path for path in root.glob("results*.sqlite") if path.is_file())


@dataclass
class ResultRow:
    """One scored ``(sample, method, budget)``; ``method`` is a method spec, ``budget`` 0 for the full cache.

    ``kv_bytes`` are the key/value bytes of the compressed prompt (before the answer is decoded,
    so that it does not depend on how long the answer ran). ``decode_rows`` is how many
    ``(method, budget)`` rows were decoded together as one batch with this one, and
    ``decode_seconds`` this row's share of that batch's time. ``error`` is the message of a sample
    or pair that could not be built or run (its scores and figures are then 0 and mean nothing);
    ``None`` for a scored row.
    """

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
    decode_rows: int = 1
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.benchmark, self.dataset, self.sample_id, self.method, self.budget)


KEY_COLUMNS = ("benchmark", "dataset", "sample_id", "method", "budget")
_COLUMNS = [f.name for f in fields(ResultRow)]
_SQL_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}
_JSON_FIELDS = tuple(f.name for f in fields(ResultRow) if f.type.split("[")[0] in ("list", "dict"))


ADDED_DEFAULTS = {"decode_rows": "1", "error": "NULL"}


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


def _when_unlocked(statement, seconds: float = 60.0):
    """Run ``statement``, retrying while another process holds a lock SQLite does not wait for itself.

    Switching a new file to write-ahead logging needs it alone; a second shard opening the file at
    that moment gets "database is locked" at once, whatever the busy timeout.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ResultStore:
    """Rows of one store file of a run directory (``<dir>/results.sqlite`` unless ``name`` says otherwise)."""

    def __init__(self, directory: str | Path, create: bool = True, name: str = STORE_NAME):
        self.directory = Path(directory)
        self.path = self.directory / name
        self._missing: set[str] = set()
        self._empty = False
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
            _when_unlocked(lambda: self.connection.execute("PRAGMA journal_mode = WAL"))
            self.connection.execute("PRAGMA synchronous = FULL")
            # One transaction: a shard reading the directory sees no tables or all of them. IMMEDIATE takes
            # the write lock first, under the busy timeout: a deferred one that reads, then writes after
            # another shard committed, fails at once with "database is locked".
            self.connection.executescript(
                f"BEGIN IMMEDIATE;\n{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;\n"
            )
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
        if not tables and (writable or version == 0):
            # Read-only, a file without tables is a store another shard is creating: no rows yet.
            self._empty = not writable
            return
        missing = {"identity", "results"} - tables
        if missing:
            raise ValueError(f"{self.path} is not a lavakv results store (no {', '.join(sorted(missing))} table)")
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(results)")}
        expected = set(_COLUMNS) | {"created"}
        if columns == expected - set(ADDED_IN_2) and version <= 1:
            if writable:
                for name, sql in ADDED_IN_2.items():
                    self.connection.execute(f"ALTER TABLE results ADD COLUMN {name} {sql}")
            else:
                self._missing = set(ADDED_IN_2)
        elif columns != expected:
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
        (a typo in a setting) does not lock its directory. A store with results whose identity lacks
        one of the keys (recorded by an earlier lavakv) is refused too, not silently extended.
        """
        with self._transaction():
            held = self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 0
            if not held:
                self.connection.execute("DELETE FROM identity")
            recorded = {row[0] for row in self.connection.execute("SELECT key FROM identity")}
            unrecorded = sorted(set(identity) - recorded) if held else []
            if unrecorded:
                raise ValueError(
                    f"{self.directory} holds a run recorded without {unrecorded[0]} (an earlier lavakv, whose "
                    f"rows may have been made otherwise); resume it with that version, or use another --out directory"
                )
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
        others = [ResultStore(self.directory, create=False, name=path.name) for path in store_paths(self.directory)]
        try:
            check_same_identity([self] + [other for other in others if other.path != self.path])
        finally:
            for other in others:
                other.close()

    def identity(self) -> dict[str, object]:
        if self._empty:
            return {}
        rows = self.connection.execute("SELECT key, value FROM identity").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def log_invocation(self, command: str, config: dict) -> None:
        self.connection.execute(
            "INSERT INTO invocations VALUES (?, ?, ?)", (time.time(), command, json.dumps(config, sort_keys=True))
        )

    def invocations(self) -> list[tuple[float, str, dict]]:
        """Every logged ``(start time, command, config)``, oldest first."""
        if self._empty:
            return []
        found = self.connection.execute("SELECT started, command, config FROM invocations ORDER BY started")
        return [(started, command, json.loads(config)) for started, command, config in found]

    def done_keys(self, errors: bool = True) -> set[tuple[str, str, str, str, int]]:
        """Keys of the rows held; ``errors=False`` leaves out error rows (to run them again)."""
        if self._empty:
            return set()
        where = "" if errors or "error" in self._missing else " WHERE error IS NULL"
        rows = self.connection.execute(f"SELECT benchmark, dataset, sample_id, method, budget FROM results{where}")
        return {tuple(row) for row in rows}

    def add(self, row: ResultRow) -> bool:
        """Commit one row; ``False`` if the key is already held by a scored row (another process wrote it).

        A row replaces an error row of the same key, so a sample that failed can be run again.
        """
        values = asdict(row)
        for name in _JSON_FIELDS:
            values[name] = json.dumps(values[name])
        values["truncated"] = int(row.truncated)
        columns = _COLUMNS + ["created"]
        placeholders = ", ".join("?" for _ in columns)
        updates = ", ".join(f"{name} = excluded.{name}" for name in columns if name not in KEY_COLUMNS)
        with self._transaction():
            cursor = self.connection.execute(
                f"INSERT INTO results ({', '.join(columns)}) VALUES ({placeholders}) "
                f"ON CONFLICT ({', '.join(KEY_COLUMNS)}) DO UPDATE SET {updates} WHERE results.error IS NOT NULL",
                [values[name] for name in _COLUMNS] + [time.time()],
            )
        return cursor.rowcount == 1

    def rows(self) -> list[ResultRow]:
        if self._empty:
            return []
        selected = [f"{ADDED_DEFAULTS[name]} AS {name}" if name in self._missing else name for name in _COLUMNS]
        cursor = self.connection.execute(f"SELECT {', '.join(selected)} FROM results ORDER BY rowid")
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


def open_run(directory: str | Path) -> list[ResultStore]:
    """Every store file of a run directory, opened read-only; a directory without one is a clear error."""
    paths = store_paths(directory)
    if not paths:
        raise FileNotFoundError(
            f"no results store in {directory} (expected {Path(directory) / STORE_NAME} or shard files)"
        )
    return [ResultStore(directory, create=False, name=path.name) for path in paths]


def read_run(directory: str | Path) -> tuple[dict[str, object], list[ResultRow]]:
    """The identity and rows of every store file of a run directory, as one run.

    The files must record the same identity. A key held by several files (a sample run again
    under another sharding) is read once, a scored row winning over an error row.
    """
    stores = open_run(directory)
    try:
        identity = check_same_identity(stores)
        merged: dict[tuple, ResultRow] = {}
        for store in stores:
            for row in store.rows():
                held = merged.get(row.key)
                if held is None or (held.error is not None and row.error is None):
                    merged[row.key] = row
        return identity, list(merged.values())
    finally:
        for store in stores:
            store.close()


def run_done_keys(directory: str | Path, errors: bool = True) -> set[tuple[str, str, str, str, int]]:
    """Keys held by any store file of a run directory (``errors=False``: scored rows only)."""
    if not store_paths(directory):
        return set()
    stores = open_run(directory)
    try:
        done: set[tuple[str, str, str, str, int]] = set()
        for store in stores:
            done |= store.done_keys(errors=errors)
        return done
    finally:
        for store in stores:
            store.close()


def check_same_identity(stores: list[ResultStore]) -> dict[str, object]:
    """The identity the store files of one run share; files that disagree are an error naming both."""
    first, identity = None, {}
    for store in stores:
        theirs = store.identity()
        if not theirs:
            continue
        if first is None:
            first, identity = store, theirs
            continue
        differ = sorted(key for key in set(identity) | set(theirs) if identity.get(key) != theirs.get(key))
        if differ:
            key = differ[0]
            raise ValueError(
                f"the store files of {store.directory} belong to different runs: {first.path.name} has "
                f"{key}={identity.get(key)!r}, {store.path.name} has {key}={theirs.get(key)!r}"
            )
    return identity
