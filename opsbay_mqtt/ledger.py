"""The worker's on-disk ledger of job ids it has started, so a redelivered dispatch never runs
a command twice. SQLite, one file in the worker's state folder. Every entry belongs to one node,
so a ledger never answers one node's dispatch with another node's result, even in a shared file.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.states import sql
from opsbay_mqtt.topics import NODE_NAME_RE

DEFAULT_MAX_ENTRIES = 10_000
RUNNING = sql("running")  # a job started and not ended, in SQL text

# PRAGMA user_version of the file. 1: one table keyed by job id (0.1.0, which left
# user_version at 0); 2: keyed by (node, job id).
SCHEMA_VERSION = 2

_CREATE = (
    "CREATE TABLE ledger (node TEXT NOT NULL, job_id TEXT NOT NULL, state TEXT NOT NULL, "
    "result BLOB, updated_ms INTEGER NOT NULL, pid INTEGER, pid_started REAL, "
    "PRIMARY KEY (node, job_id))",
    "CREATE INDEX ledger_by_time ON ledger (node, updated_ms)",
)


class Ledger:
    """The jobs `node` has started and their results; the file may hold other nodes' too."""

    def __init__(
        self, path: Path | str, *, node: str, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> None:
        self.node = node
        self.max_entries = max_entries
        self._finished_since_prune = 0
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            # Only a start must be on disk before its command runs (see start()); the rest may
            # trail: losing a finish to a power cut reports the job lost, never runs it again.
            self.db.execute("PRAGMA synchronous=NORMAL")
            _upgrade(self.db, path, node)
        except BaseException:
            self.db.close()
            raise

    def get(self, job_id: str) -> tuple[str, bytes | None] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT state, result FROM ledger WHERE node = ? AND job_id = ?",
                (self.node, job_id),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def start(self, job_id: str, now_ms: int) -> bool:
        """Record that `job_id` is about to run; False if it was already in the ledger."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO ledger (node, job_id, state, updated_ms) "
                    f"VALUES (?, ?, {RUNNING}, ?)",
                    (self.node, job_id, now_ms),
                )
            finally:
                self.db.execute("PRAGMA synchronous=NORMAL")
            return cur.rowcount == 1

    def claim(self, job_id: str, state: str, result: bytes, now_ms: int) -> bool:
        """Record `job_id` as already ended (`state`, with its result) unless the ledger knows
        it; False if it did. One statement: a worker that dies right after it never reports a
        job it did not run as `lost`."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO ledger (node, job_id, state, result, updated_ms) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (self.node, job_id, state, result, now_ms),
                )
            finally:
                self.db.execute("PRAGMA synchronous=NORMAL")
            return cur.rowcount == 1

    def set_pid(self, job_id: str, pid: int, started_at: float) -> None:
        """Remember the job's process group, so a restarted worker can end what is left of it."""
        with self._lock:
            self.db.execute(
                "UPDATE ledger SET pid = ?, pid_started = ? WHERE node = ? AND job_id = ?",
                (pid, started_at, self.node, job_id),
            )

    def finish(self, job_id: str, state: str, result: bytes, now_ms: int) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO ledger (node, job_id, state, result, updated_ms) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.node, job_id, state, result, now_ms),
            )
            self._finished_since_prune += 1
            if self._finished_since_prune >= 100:
                self._finished_since_prune = 0
                self._prune()

    def interrupted(self) -> list[tuple[str, int | None, float | None]]:
        """(job id, pid, pid start time) of jobs running when the previous worker ended."""
        with self._lock:
            rows = self.db.execute(
                f"SELECT job_id, pid, pid_started FROM ledger WHERE node = ? AND state = {RUNNING}",
                (self.node,),
            )
            return [(r[0], r[1], r[2]) for r in rows]

    def _prune(self) -> None:
        self.db.execute(
            f"DELETE FROM ledger WHERE node = ? AND state != {RUNNING} AND job_id IN ("
            f"SELECT job_id FROM ledger WHERE node = ? AND state != {RUNNING} "
            "ORDER BY updated_ms DESC LIMIT -1 OFFSET ?)",
            (self.node, self.node, self.max_entries),
        )

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _upgrade(db: sqlite3.Connection, path: Path | str, node: str) -> None:
    """Bring the file to SCHEMA_VERSION, one version at a time, all in one transaction (which
    also keeps two workers from migrating the same file at once)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: this ledger has schema version {version}, newer than this opsbay knows "
                f"({SCHEMA_VERSION}): upgrade opsbay on this node, or give the worker another "
                "--state-dir"
            )
        if version == 0 and not _has_table(db, "ledger"):
            for statement in _CREATE:
                db.execute(statement)
        else:
            for step in _MIGRATIONS[max(version, 1) - 1 :]:
                step(db, node)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None


def _v1_to_v2(db: sqlite3.Connection, node: str) -> None:
    """Key every entry by node: the node its stored result names, else the node opening it."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
    pid = ", ".join(c if c in columns else "NULL" for c in ("pid", "pid_started"))  # 0.1.0
    db.execute("DROP INDEX IF EXISTS ledger_by_time")
    db.execute("ALTER TABLE ledger RENAME TO ledger_v1")
    for statement in _CREATE:
        db.execute(statement)
    rows = db.execute(f"SELECT job_id, state, result, updated_ms, {pid} FROM ledger_v1")
    db.executemany(
        "INSERT INTO ledger (node, job_id, state, result, updated_ms, pid, pid_started) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(_node_of(r[2], node), *r) for r in rows.fetchall()],
    )
    db.execute("DROP TABLE ledger_v1")


def _node_of(result: bytes | None, default: str) -> str:
    """The node a stored result (a signed JSON message) names, or `default`."""
    try:
        body = json.loads(result or b"")
    except (ValueError, RecursionError):
        return default
    name = body.get("node") if isinstance(body, dict) else None
    return name if isinstance(name, str) and NODE_NAME_RE.fullmatch(name) else default


# _MIGRATIONS[n - 1] brings a file from version n to n + 1.
_MIGRATIONS: tuple[Callable[[sqlite3.Connection, str], None], ...] = (_v1_to_v2,)
