"""The worker's on-disk ledger of job ids it has started, so a redelivered dispatch never runs
a command twice. SQLite, one file in the worker's state directory."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

DEFAULT_MAX_ENTRIES = 10_000


class Ledger:
    def __init__(self, path: Path | str, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._finished_since_prune = 0
        self._lock = threading.Lock()
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # Only a start must be on disk before its command runs (see start()); the rest may
        # trail: losing a finish to a power cut reports the job lost, never runs it again.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS ledger (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, "
            "result BLOB, updated_ms INTEGER NOT NULL, pid INTEGER, pid_started REAL)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS ledger_by_time ON ledger (updated_ms)")
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(ledger)")}
        for name, kind in (("pid", "INTEGER"), ("pid_started", "REAL")):  # ledgers from 0.1.0
            if name not in columns:
                self.db.execute(f"ALTER TABLE ledger ADD COLUMN {name} {kind}")

    def get(self, job_id: str) -> tuple[str, bytes | None] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT state, result FROM ledger WHERE job_id = ?", (job_id,)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def start(self, job_id: str, now_ms: int) -> bool:
        """Record that `job_id` is about to run; False if it was already in the ledger."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=FULL")
            try:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO ledger (job_id, state, updated_ms) "
                    "VALUES (?, 'running', ?)",
                    (job_id, now_ms),
                )
            finally:
                self.db.execute("PRAGMA synchronous=NORMAL")
            return cur.rowcount == 1

    def set_pid(self, job_id: str, pid: int, started_at: float) -> None:
        """Remember the job's process group, so a restarted worker can end what is left of it."""
        with self._lock:
            self.db.execute(
                "UPDATE ledger SET pid = ?, pid_started = ? WHERE job_id = ?",
                (pid, started_at, job_id),
            )

    def finish(self, job_id: str, state: str, result: bytes, now_ms: int) -> None:
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO ledger (job_id, state, result, updated_ms) "
                "VALUES (?, ?, ?, ?)",
                (job_id, state, result, now_ms),
            )
            self._finished_since_prune += 1
            if self._finished_since_prune >= 100:
                self._finished_since_prune = 0
                self._prune()

    def interrupted(self) -> list[tuple[str, int | None, float | None]]:
        """(job id, pid, pid start time) of jobs running when the previous worker ended."""
        with self._lock:
            rows = self.db.execute(
                "SELECT job_id, pid, pid_started FROM ledger WHERE state = 'running'"
            )
            return [(r[0], r[1], r[2]) for r in rows]

    def _prune(self) -> None:
        self.db.execute(
            "DELETE FROM ledger WHERE state != 'running' AND job_id IN (SELECT job_id FROM ledger "
            "WHERE state != 'running' ORDER BY updated_ms DESC LIMIT -1 OFFSET ?)",
            (self.max_entries,),
        )

    def close(self) -> None:
        with self._lock:
            self.db.close()
