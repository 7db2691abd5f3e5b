"""A batch's journal: one SQLite row per job, written before each step it guards.

The journal is what makes a batch safe to kill: a job is marked `submitting` before its POST
goes out and `submitted` (with the task handle) the moment BFL answers, so a rerun knows
which jobs are paid for, which are certainly not, and which nobody can know (`submitting`
left behind: BFL has no idempotency key). WAL mode with full sync: a committed step survives
a killed process and a power cut.

Every call is a short transaction run in a worker thread, one at a time, so the event loop
never waits on the disk; it works under asyncio and trio alike. One run at a time: an open
journal holds an OS lock on `.<journal>.lock` beside it (released when the process dies, so
a crash leaves none behind), and a second run is refused rather than paying for the same jobs.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import anyio
import anyio.to_thread
from filelock import FileLock, Timeout

from ._errors import BatchInUseError

__all__ = ["JOURNAL_NAME", "JobRow", "JobState", "Journal"]

JOURNAL_NAME = "bfl-batch.sqlite"

JobState = Literal[
    "queued",  # known, nothing sent
    "submitting",  # the POST may be on its way: outcome unknown if found after a crash
    "submitted",  # BFL accepted it: `task` holds the paid handle
    "ready",  # the task is Ready: `sample` holds its signed URL, not yet downloaded
    "downloaded",  # the image is at `path`
    "failed",  # ended without an image; `error_type` and `error` say why
    "uncertain",  # the submit may or may not have created a task: never resent silently
    "skipped",  # not submitted: it would have taken the batch past its budget
    "expired",  # the result URL expired before it could be downloaded
]
"""Where a batch job stands (`JobRecord.state`, the manifest's `state`).

`downloaded`, `failed`, `uncertain`, `skipped` and `expired` are final for a run; `queued`,
`submitting`, `submitted` and `ready` are steps a stopped or killed run resumes from.
"""
STATES: tuple[str, ...] = get_args(JobState)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    name TEXT,
    model TEXT NOT NULL,
    estimate REAL NOT NULL,
    state TEXT NOT NULL,
    task TEXT,
    cost REAL,
    sample TEXT,
    seed TEXT,
    path TEXT,
    error_type TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    risk REAL NOT NULL DEFAULT 0
)
"""


_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


@dataclass(frozen=True)
class JobRow:
    """One job as the journal holds it."""

    key: str
    position: int
    name: str | None
    model: str
    estimate: float
    """The catalog's price of the job's request, as of its latest submit (a named job's
    request may change between runs)."""
    state: JobState
    task: str | None = None
    """The Task handle as JSON, once BFL accepted the submit."""
    cost: float | None = None
    sample: str | None = field(default=None, repr=False)
    """The signed result URL (its signature is a credential: left out of the repr)."""
    seed: str | None = None
    """The image's seed, as text: seeds may not fit SQLite's integers."""
    path: str | None = None
    error_type: str | None = None
    error: str | None = None
    attempts: int = 0
    """How many times a submit of this job was started."""
    updated_at: float = 0.0
    risk: float = 0.0
    """Credits of this job's submits that may have created (and been charged for) a task
    nobody knows of: its estimate once for each `uncertain` submit, resubmitted or not."""


_COLUMNS = tuple(f.name for f in fields(JobRow))
_UPDATABLE = frozenset(_COLUMNS) - {"key", "position", "name", "model"}


class Journal:
    """The SQLite journal of one batch; open it with `await Journal.open(path)`."""

    def __init__(self, connection: sqlite3.Connection, path: Path, owner: FileLock) -> None:
        self._db = connection
        self.path = path
        self._owner = owner  # held while open: one run at a time
        self._lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)

    def __repr__(self) -> str:
        return f"Journal({str(self.path)!r})"

    @classmethod
    async def open(cls, path: Path) -> Journal:
        """Open (or create) the journal at `path`."""
        return await anyio.to_thread.run_sync(cls._open_sync, path)

    @classmethod
    def _open_sync(cls, path: Path) -> Journal:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = path.with_name(f".{path.name}.lock")
        # A directory that takes no files says so here; FileLock would only time out, as
        # if another run held the lock.
        lock.touch()
        # Released from whichever worker thread closes the journal, hence not thread-local.
        owner = FileLock(lock, thread_local=False)
        try:
            owner.acquire(timeout=0)
        except Timeout:
            raise BatchInUseError(str(path)) from None
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute(_SCHEMA)
                db.execute(_META)
                _add_risk(db)
            except sqlite3.Error:
                db.close()
                raise
        except BaseException:
            owner.release()
            raise
        return cls(db, path, owner)

    async def _run(self, function: Callable[..., T], *args: Any) -> T:
        # Shielded: `to_thread.run_sync` is cancellable while it waits for a worker (or the
        # limiter), so a cancelled caller could skip a step. Once asked for, it is recorded.
        with anyio.CancelScope(shield=True):
            result = await anyio.to_thread.run_sync(
                functools.partial(self._locked, function, *args), limiter=self._limiter
            )
        return result

    def _locked(self, function: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return function(*args)

    async def api(self, base_url: str) -> str:
        """The API the journal's tasks belong to: `base_url`, if this is its first run."""
        return await self._run(self._api, base_url)

    def _api(self, base_url: str) -> str:
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('api', ?)", (base_url,))
            [(recorded,)] = self._db.execute("SELECT value FROM meta WHERE key = 'api'")
        return str(recorded)

    async def load(self) -> dict[str, JobRow]:
        """Every job the journal knows, by key."""
        return await self._run(self._load)

    def _load(self) -> dict[str, JobRow]:
        cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs")
        rows = [JobRow(**dict(zip(_COLUMNS, values, strict=True))) for values in cursor]
        return {row.key: row for row in rows}

    async def add(self, rows: Iterable[JobRow]) -> None:
        """Record new jobs (in one transaction); keys already known are left as they are."""
        await self._run(self._add, list(rows))

    def _add(self, rows: list[JobRow]) -> None:
        now = time.time()
        placeholders = ", ".join("?" for _ in _COLUMNS)
        with self._transaction():
            self._db.executemany(
                f"INSERT OR IGNORE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
                [
                    tuple(now if c == "updated_at" else getattr(row, c) for c in _COLUMNS)
                    for row in rows
                ],
            )

    async def update(self, key: str, **values: Any) -> None:
        """Change some fields of one job (state, task, cost, sample, path, error...)."""
        unknown = set(values) - _UPDATABLE
        if unknown:
            raise ValueError(f"not journal fields: {', '.join(sorted(unknown))}")
        state = values.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        await self._run(self._update, key, values)

    def _update(self, key: str, values: dict[str, Any]) -> None:
        values = {**values, "updated_at": time.time()}
        assignments = ", ".join(f"{column} = ?" for column in values)
        with self._transaction():
            self._db.execute(
                f"UPDATE jobs SET {assignments} WHERE key = ?", (*values.values(), key)
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    async def aclose(self) -> None:
        """Close the database (every step is already committed) and let the next run in."""
        await self._run(self._close)

    def _close(self) -> None:
        try:
            self._db.close()
        finally:
            self._owner.release()


def _add_risk(db: sqlite3.Connection) -> None:
    """Give a journal from before the `risk` column one: each `uncertain` job's submit
    is at risk (a `submitting` one is counted when the batch resumes it)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if "risk" in columns:
        return
    with _Transaction(db):
        db.execute("ALTER TABLE jobs ADD COLUMN risk REAL NOT NULL DEFAULT 0")
        db.execute("UPDATE jobs SET risk = estimate WHERE state = 'uncertain'")


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # A COMMIT refused (busy, say) leaves the transaction open, and every later
                # BEGIN would fail: the step is dropped, and the COMMIT's error says why.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        elif self._db.in_transaction:  # SQLite rolls some failures back itself (a full disk):
            self._db.execute("ROLLBACK")  # a ROLLBACK then would hide the error behind its own
