"""The coordinator's record: SQLite in WAL mode. The only module that speaks SQL."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opsbay_mqtt import schedrecord, statedir, states
from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.protocol import Execution, Job, fields_of
from opsbay_mqtt.record import Brief
from opsbay_mqtt.states import TERMINAL

# State names in SQL text, from the one list of states (states.sql).
PENDING, RUNNING, OPEN = states.sql("pending"), states.sql("running"), states.sql(*states.OPEN)

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    target TEXT NOT NULL,
    command TEXT NOT NULL,
    timeout_s INTEGER NOT NULL,
    start_by_ms INTEGER NOT NULL,
    submitted_ms INTEGER NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_kid TEXT NOT NULL DEFAULT '',
    reason_code TEXT,
    reason TEXT,
    where_labels TEXT NOT NULL DEFAULT '{}',
    batch TEXT,
    max_failures TEXT,
    schedule TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_ms DESC);
CREATE TABLE IF NOT EXISTS executions (
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT '',
    stdout_bytes INTEGER NOT NULL DEFAULT 0,
    stderr_bytes INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0,
    dispatched_ms INTEGER,
    start_by_ms INTEGER,
    started_ms INTEGER,
    finished_ms INTEGER,
    duration_ms INTEGER,
    reason TEXT,
    host TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, node)
);
CREATE INDEX IF NOT EXISTS executions_by_node ON executions (node, job_id);
CREATE INDEX IF NOT EXISTS executions_by_state ON executions (state);
-- A job's counts per state, and whether its rollout holds any back, without reading its rows.
CREATE INDEX IF NOT EXISTS executions_by_job_state ON executions (job_id, state, dispatched_ms);
CREATE INDEX IF NOT EXISTS executions_open ON executions (node, state)
    WHERE state IN $OPEN;
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'unknown',
    session INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0,
    kid TEXT NOT NULL DEFAULT '',
    last_seen_ms INTEGER NOT NULL DEFAULT 0,
    info TEXT NOT NULL DEFAULT '{}',
    conflict TEXT,
    conflict_ms INTEGER,
    conflict_session INTEGER
);
CREATE TABLE IF NOT EXISTS nonces (
    kid TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (kid, nonce)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_by_ts ON nonces (ts);
""".replace("$OPEN", states.sql(*states.OPEN))
    + schedrecord.SCHEMA
)

_EXEC_COLS = (
    "node", "state", "exit_code", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "truncated",
    "dispatched_ms", "start_by_ms", "started_ms", "finished_ms", "duration_ms", "reason", "host",
)  # fmt: skip
_JOB_COLS = (
    "job_id", "state", "target", "command", "timeout_s", "start_by_ms", "submitted_ms",
    "submitted_by", "submitted_kid", "reason_code", "reason", "where_labels", "batch",
    "max_failures", "schedule",
)  # fmt: skip


def _add_columns(db: sqlite3.Connection, wanted: dict[str, dict[str, str]]) -> None:
    """Add the columns a table lacks (records from before a column was added)."""
    for table, columns in wanted.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, decl in columns.items():
            if name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")


def _v1_columns_since_0_1_0(db: sqlite3.Connection) -> None:
    _add_columns(
        db,
        {
            "jobs": {
                "submitted_kid": "TEXT NOT NULL DEFAULT ''",
                "where_labels": "TEXT NOT NULL DEFAULT '{}'",
                "batch": "TEXT",
                "max_failures": "TEXT",
            },
            "executions": {"start_by_ms": "INTEGER"},
            "nodes": {"kid": "TEXT NOT NULL DEFAULT ''"},
        },
    )


def _v2_node_conflicts(db: sqlite3.Connection) -> None:
    _add_columns(
        db,
        {"nodes": {"conflict": "TEXT", "conflict_ms": "INTEGER", "conflict_session": "INTEGER"}},
    )


def _v3_schedules(db: sqlite3.Connection) -> None:
    _add_columns(db, {"jobs": {"schedule": "TEXT"}})  # the tables: schedrecord.SCHEMA


# The record's schema versions (PRAGMA user_version): MIGRATIONS[n - 1] takes a record from
# version n - 1 to n. Version 0 is a record from before versions were counted (0.1.0 and what
# followed it), whatever columns it has: each step adds only what is missing.
MIGRATIONS = (_v1_columns_since_0_1_0, _v2_node_conflicts, _v3_schedules)
SCHEMA_VERSION = len(MIGRATIONS)


class Store:
    """The record in SQLite (`record.Record`): jobs, executions, nodes and seen nonces. Writes
    are batched: call `commit()`."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        # One process writes a SQLite record: a second coordinator on the same --data-dir
        # would fight the first over it (several coordinators share a PostgreSQL record).
        self._lock = statedir.hold(
            Path(self.path + ".lock"),
            "coordinator",
            setting="--data-dir / OPSBAY_DATA_DIR",
            busy=f"the record {self.path} is in use by another coordinator ({{holder}}): one "
            "SQLite record serves one coordinator; several share a PostgreSQL record (--store)",
        )
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self.schedules = schedrecord.ScheduleTable(self.db.execute, postgresql=False)
        self.db.execute("BEGIN")

    def _migrate(self) -> None:
        """Bring the record to SCHEMA_VERSION, one versioned step at a time, each in its own
        transaction; refuse a record written by a newer opsbay (its schema may mean things
        this code does not know)."""
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            self.db.close()
            self._lock.close()
            raise ConfigError(
                f"--data-dir / OPSBAY_DATA_DIR: {self.path} is a record of schema version "
                f"{version}, newer than this opsbay knows ({SCHEMA_VERSION}): run the opsbay "
                "that wrote it, or a newer one"
            )
        fresh = (
            self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'"
            ).fetchone()
            is None
        )
        if fresh:
            self.db.executescript(SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        for number, step in enumerate(MIGRATIONS, 1):
            if number > version:
                self.db.execute("BEGIN IMMEDIATE")
                step(self.db)
                self.db.execute(f"PRAGMA user_version = {number}")
                self.db.execute("COMMIT")
        self.db.executescript(SCHEMA)  # tables and indexes added since, if any

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """All of the block's writes, or none of them (a savepoint in the open batch)."""
        self.db.execute("SAVEPOINT atomic")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK TO atomic")
            raise
        finally:
            self.db.execute("RELEASE atomic")

    def commit(self) -> None:
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.execute("BEGIN")

    def close(self) -> None:
        try:
            self.db.execute("COMMIT")
            self.db.close()
        finally:
            self._lock.close()

    # -- nonces
    def remember_nonce(self, kid: str, nonce: str, ts: int) -> bool:
        """Record a nonce; False if it was already seen."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO nonces (kid, nonce, ts) VALUES (?, ?, ?)", (kid, nonce, ts)
        )
        return cur.rowcount == 1

    def forget_nonce(self, kid: str, nonce: str) -> None:
        self.db.execute("DELETE FROM nonces WHERE kid = ? AND nonce = ?", (kid, nonce))

    def forget_nonces_before(self, ts: int) -> None:
        self.db.execute("DELETE FROM nonces WHERE ts < ?", (ts,))

    # -- jobs
    def insert_job(self, job: Job) -> bool:
        row = fields_of(job)
        row["where_labels"] = json.dumps(row.pop("where"), sort_keys=True)
        cols, marks = ", ".join(_JOB_COLS), ", ".join("?" * len(_JOB_COLS))
        cur = self.db.execute(
            f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT (job_id) DO NOTHING",
            [row[c] for c in _JOB_COLS],
        )
        if cur.rowcount != 1:
            return False
        for ex in job.executions:
            self.write_execution(job.job_id, ex, None)
        return True

    def claim(self, who: str) -> None:
        return None  # the record's lock file (`__init__`): one coordinator at a time

    def lock_job(self, job_id: str) -> bool:
        # One coordinator per SQLite record (its data-dir is locked): a write transaction
        # already holds the whole record; only whether the job exists is left to say.
        return (
            self.db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is not None
        )

    def set_job_state(self, job_id: str, state: str) -> None:
        self.db.execute("UPDATE jobs SET state = ? WHERE job_id = ?", (state, job_id))

    def write_execution(self, job_id: str, ex: Execution, before: str | None) -> bool:
        row = fields_of(ex)
        row["host"] = json.dumps(row["host"], sort_keys=True)
        row["truncated"] = int(row["truncated"])
        values = [row[c] for c in _EXEC_COLS]
        if before is None:
            cols, marks = ", ".join(_EXEC_COLS), ", ".join("?" * len(_EXEC_COLS))
            cur = self.db.execute(
                f"INSERT INTO executions (job_id, {cols}) VALUES (?, {marks}) "
                "ON CONFLICT (job_id, node) DO NOTHING",
                [job_id, *values],
            )
        else:
            sets = ", ".join(f"{c} = ?" for c in _EXEC_COLS)
            cur = self.db.execute(
                f"UPDATE executions SET {sets} WHERE job_id = ? AND node = ? AND state = ?",
                [*values, job_id, ex.node, before],
            )
        return cur.rowcount == 1

    def write_executions(
        self, job_id: str, changes: Sequence[tuple[str | None, Execution]]
    ) -> set[str]:
        # SQLite in this process: a statement costs no round trip.
        return {ex.node for before, ex in changes if self.write_execution(job_id, ex, before)}

    def get_job(self, job_id: str, executions: bool = True) -> Job | None:
        """The job; with `executions=False` without them (cheap for jobs on many nodes)."""
        row = self.db.execute(
            f"SELECT {', '.join(_JOB_COLS)} FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        if row is None:
            return None
        return self._job(row, executions)

    def _job(self, row: tuple[Any, ...], executions: bool = True) -> Job:
        fields = dict(zip(_JOB_COLS, row, strict=True))
        fields["where"] = json.loads(fields.pop("where_labels"))
        if executions:
            ex_rows = self.db.execute(
                f"SELECT {', '.join(_EXEC_COLS)} FROM executions WHERE job_id = ? ORDER BY node",
                (fields["job_id"],),
            ).fetchall()
            fields["executions"] = [self._execution(r) for r in ex_rows]
        return Job(**fields)

    def execution(self, job_id: str, node: str) -> Execution | None:
        row = self.db.execute(
            f"SELECT {', '.join(_EXEC_COLS)} FROM executions WHERE job_id = ? AND node = ?",
            (job_id, node),
        ).fetchone()
        return self._execution(row) if row else None

    def state_counts(self, job_id: str) -> dict[str, int]:
        """How many of the job's executions are in each state."""
        rows = self.db.execute(
            "SELECT state, count(*) FROM executions WHERE job_id = ? GROUP BY state", (job_id,)
        )
        return dict(rows.fetchall())

    def has_held(self, job_id: str) -> bool:
        """Whether the job's rollout holds any execution back (`rollout.is_held`, in SQL)."""
        row = self.db.execute(
            f"SELECT 1 FROM executions WHERE job_id = ? AND state = {PENDING}"
            " AND dispatched_ms IS NULL LIMIT 1",
            (job_id,),
        ).fetchone()
        return row is not None

    def briefs(self, job_id: str) -> list[Brief]:
        """Node, state and dispatch time of each of a job's executions, without their output."""
        rows = self.db.execute(
            "SELECT node, state, dispatched_ms FROM executions WHERE job_id = ? ORDER BY node",
            (job_id,),
        )
        return [Brief(*r) for r in rows]

    @staticmethod
    def _execution(row: tuple[Any, ...]) -> Execution:
        fields = dict(zip(_EXEC_COLS, row, strict=True))
        fields["host"] = json.loads(fields["host"])
        fields["truncated"] = bool(fields["truncated"])
        return Execution(**fields)

    def list_jobs(
        self,
        *,
        node: str | None = None,
        state: str | None = None,
        schedule: str | None = None,
        limit: int = 20,
    ) -> list[Job]:
        where, args = [], []
        if schedule is not None:
            where.append("schedule = ?")
            args.append(schedule)
        if node is not None:
            where.append("job_id IN (SELECT job_id FROM executions WHERE node = ?)")
            args.append(node)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        sql = f"SELECT {', '.join(_JOB_COLS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY submitted_ms DESC, job_id LIMIT ?"
        rows = self.db.execute(sql, [*args, limit]).fetchall()
        return [self._job(r) for r in rows]

    def overdue(self, now_ms: int, grace_ms: int) -> list[tuple[str, str]]:
        """(job id, node) of executions past a deadline: sent but not started by start-by +
        grace, or running past start + timeout + grace."""
        return self.db.execute(
            "SELECT e.job_id, e.node FROM executions e JOIN jobs j USING (job_id) "
            f"WHERE (e.state = {PENDING} AND e.start_by_ms + ? < ?) "
            f"OR (e.state = {RUNNING} AND e.started_ms + j.timeout_s * 1000 + ? < ?)",
            (grace_ms, now_ms, grace_ms, now_ms),
        ).fetchall()

    def redispatchable(self, now_ms: int, node: str | None = None) -> list[tuple[str, str]]:
        """(job id, node) of executions sent to their node (all nodes, or `node`) and not
        started: pending, within their start-by deadline."""
        where = "" if node is None else "node = ? AND "
        return self.db.execute(
            f"SELECT job_id, node FROM executions WHERE {where}dispatched_ms IS NOT NULL "
            f"AND state = {PENDING} AND start_by_ms > ?",
            (*(() if node is None else (node,)), now_ms),
        ).fetchall()

    def open_count(self, node: str) -> int:
        """Executions for `node` not yet in a terminal state."""
        row = self.db.execute(
            f"SELECT count(*) FROM executions WHERE node = ? AND state IN {OPEN}",
            (node,),
        ).fetchone()
        return int(row[0])

    def prune(self, *, before_ms: int, keep: int) -> int:
        """Delete finished jobs submitted before `before_ms`, and beyond the newest `keep`
        finished ones. Jobs with an execution still open are never deleted."""
        open_jobs = f"SELECT job_id FROM executions WHERE state IN {OPEN}"
        cur = self.db.execute(
            f"DELETE FROM jobs WHERE job_id NOT IN ({open_jobs}) AND (submitted_ms < ? OR "
            f"job_id IN (SELECT job_id FROM jobs WHERE job_id NOT IN ({open_jobs}) "
            "ORDER BY submitted_ms DESC LIMIT -1 OFFSET ?))",
            (before_ms, keep),
        )
        return cur.rowcount

    def count_terminal(self) -> int:
        marks = ", ".join("?" * len(TERMINAL))
        return int(
            self.db.execute(
                f"SELECT count(*) FROM executions WHERE state IN ({marks})", sorted(TERMINAL)
            ).fetchone()[0]
        )

    # -- nodes
    def node_seen(
        self,
        node: str,
        now_ms: int,
        *,
        state: str | None = None,
        session: int | None = None,
        seq: int = 0,
        info: dict[str, Any] | None = None,
        kid: str | None = None,
    ) -> bool:
        """Record that the node was heard from; True if `state` was recorded (a status is
        recorded unless an older connection's than the one we know)."""
        self.db.execute(
            "INSERT INTO nodes (node, last_seen_ms, kid) VALUES (?, ?, coalesce(?, '')) "
            "ON CONFLICT (node) DO UPDATE SET last_seen_ms = max(last_seen_ms, "
            "excluded.last_seen_ms), kid = coalesce(?, kid)",
            (node, now_ms, kid, kid),
        )
        applied = False
        if state is not None and session is not None:
            # A status from an older connection than the one we know never wins (late Wills).
            cur = self.db.execute(
                "UPDATE nodes SET state = ?, session = ?, seq = ? WHERE node = ? "
                "AND (session < ? OR (session = ? AND seq <= ?))",
                (state, session, seq, node, session, session, seq),
            )
            applied = cur.rowcount == 1
            if applied and state == "online":  # an agent started after the conflict: resolved
                self.db.execute(
                    "UPDATE nodes SET conflict = NULL, conflict_ms = NULL, conflict_session = NULL "
                    "WHERE node = ? AND conflict_session < ?",
                    (node, session),
                )
        if info is not None:
            self.db.execute(
                "UPDATE nodes SET info = ? WHERE node = ?", (json.dumps(info, sort_keys=True), node)
            )
        return applied

    def node_conflict(self, node: str, now_ms: int, text: str, session: int) -> None:
        """Two agents used this node's name and the one of `session` stopped; `text` says what
        happened (shown by `nodes` until an agent started later comes online). The stopped
        agent's session is forgotten, so that the statuses of the one that stays, an older
        session, are recorded again."""
        self.db.execute(
            "UPDATE nodes SET conflict = ?, conflict_ms = ?, conflict_session = ? WHERE node = ?",
            (text, now_ms, session, node),
        )
        self.db.execute(
            "UPDATE nodes SET session = 0, seq = 0 WHERE node = ? AND session = ?", (node, session)
        )

    def node_kid(self, node: str) -> str | None:
        """The key id the node last signed with."""
        row = self.db.execute("SELECT kid FROM nodes WHERE node = ?", (node,)).fetchone()
        return row[0] if row and row[0] else None

    def node_labels_all(self) -> dict[str, dict[str, str]]:
        """Every known node and its labels."""
        out = {}
        for node, info in self.db.execute("SELECT node, info FROM nodes"):
            labels = json.loads(info).get("labels", {})
            out[node] = dict(labels) if isinstance(labels, dict) else {}
        return out

    def node_labels(self, node: str) -> dict[str, str]:
        row = self.db.execute("SELECT info FROM nodes WHERE node = ?", (node,)).fetchone()
        labels = json.loads(row[0]).get("labels", {}) if row else {}
        return dict(labels) if isinstance(labels, dict) else {}

    def list_nodes(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT node, state, session, seq, last_seen_ms, info, conflict, conflict_ms "
            "FROM nodes ORDER BY node"
        ).fetchall()
        return [
            {
                "node": n,
                "state": s,
                "session": ses,
                "seq": seq,
                "last_seen_ms": seen,
                **json.loads(info),
                **({"conflict": conflict, "conflict_ms": conflict_ms} if conflict else {}),
            }
            for n, s, ses, seq, seen, info, conflict, conflict_ms in rows
        ]
