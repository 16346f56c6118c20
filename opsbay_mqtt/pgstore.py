"""The coordinator's record in PostgreSQL (psycopg 3): the tables, schema versions and guarded
changes of `store` (SQLite), for one or several coordinators sharing one database.

One transaction per batch, READ COMMITTED: what guards a change is the statement itself (insert
on conflict do nothing; update where the row is still in the state it was read in; `lock_job`
takes the job's row FOR UPDATE). PostgreSQL's deadlock and serialization failures become
`record.Contention`, raised from the statement that met them: the caller rolls the batch back.
A connection lost mid-batch raises `StoreUnavailable`: nothing of the batch was committed, the
coordinator stops and its supervisor starts it again (the broker redelivers what it had not
acknowledged). The URL's password never appears in a message (`shown`)."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from opsbay_mqtt import schedrecord, states
from opsbay_mqtt.errors import ConfigError, StoreUnavailable
from opsbay_mqtt.protocol import Execution, Job, fields_of
from opsbay_mqtt.record import Brief, Contention
from opsbay_mqtt.states import TERMINAL

log = logging.getLogger(__name__)

SETTING = "--store / OPSBAY_STORE"
PENDING, RUNNING, OPEN = states.sql("pending"), states.sql("running"), states.sql(*states.OPEN)

# Held (pg_advisory_xact_lock) while a coordinator creates or migrates the schema, so that
# several starting at once against an empty database take turns: b"opsbay\0\1".
MIGRATION_LOCK = 0x6F70736261790001

# As store.SCHEMA, in PostgreSQL's types. Output is BYTEA (UTF-8): a command's output may hold
# NUL, which a TEXT value cannot. Node facts, labels and host facts are JSON (not JSONB, which
# refuses \u0000 too), read back as Python values by psycopg.
SCHEMA = f"""
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    target TEXT NOT NULL,
    command TEXT NOT NULL,
    timeout_s BIGINT NOT NULL,
    start_by_ms BIGINT NOT NULL,
    submitted_ms BIGINT NOT NULL,
    submitted_by TEXT NOT NULL,
    submitted_kid TEXT NOT NULL DEFAULT '',
    reason_code TEXT,
    reason TEXT,
    where_labels JSON NOT NULL DEFAULT '{{}}',
    batch TEXT,
    max_failures TEXT,
    schedule TEXT
);
CREATE INDEX jobs_by_time ON jobs (submitted_ms DESC);
CREATE TABLE executions (
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    node TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    stdout BYTEA NOT NULL DEFAULT '',
    stderr BYTEA NOT NULL DEFAULT '',
    stdout_bytes BIGINT NOT NULL DEFAULT 0,
    stderr_bytes BIGINT NOT NULL DEFAULT 0,
    truncated BOOLEAN NOT NULL DEFAULT false,
    dispatched_ms BIGINT,
    start_by_ms BIGINT,
    started_ms BIGINT,
    finished_ms BIGINT,
    duration_ms BIGINT,
    reason TEXT,
    host JSON NOT NULL DEFAULT '{{}}',
    PRIMARY KEY (job_id, node)
);
CREATE INDEX executions_by_node ON executions (node, job_id);
CREATE INDEX executions_by_state ON executions (state);
CREATE INDEX executions_by_job_state ON executions (job_id, state, dispatched_ms);
CREATE INDEX executions_open ON executions (node, state) WHERE state IN {OPEN};
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL DEFAULT 'unknown',
    session BIGINT NOT NULL DEFAULT 0,
    seq BIGINT NOT NULL DEFAULT 0,
    kid TEXT NOT NULL DEFAULT '',
    last_seen_ms BIGINT NOT NULL DEFAULT 0,
    info JSON NOT NULL DEFAULT '{{}}',
    conflict TEXT,
    conflict_ms BIGINT,
    conflict_session BIGINT
);
CREATE TABLE nonces (
    kid TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (kid, nonce)
);
CREATE INDEX nonces_by_ts ON nonces (ts);
"""

# The schema versions are store.SCHEMA_VERSION's (tests/test_store.py checks that they agree).
# A PostgreSQL record starts at FIRST_VERSION (the version when PostgreSQL came); MIGRATIONS[n]
# holds the statements that take it from version n - 1 to n, for each n above FIRST_VERSION.
FIRST_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: ("ALTER TABLE jobs ADD COLUMN schedule TEXT", *schedrecord.STATEMENTS),
}
SCHEMA_VERSION = FIRST_VERSION + len(MIGRATIONS)

EXEC_COLS = (
    "node", "state", "exit_code", "stdout", "stderr", "stdout_bytes", "stderr_bytes", "truncated",
    "dispatched_ms", "start_by_ms", "started_ms", "finished_ms", "duration_ms", "reason", "host",
)  # fmt: skip
JOB_COLS = (
    "job_id", "state", "target", "command", "timeout_s", "start_by_ms", "submitted_ms",
    "submitted_by", "submitted_kid", "reason_code", "reason", "where_labels", "batch",
    "max_failures", "schedule",
)  # fmt: skip
NODE_COLS = (
    "node", "state", "session", "seq", "kid", "last_seen_ms", "info", "conflict", "conflict_ms",
    "conflict_session",
)  # fmt: skip
NONCE_COLS = ("kid", "nonce", "ts")
TABLES = {
    "jobs": JOB_COLS,
    "executions": ("job_id", *EXEC_COLS),
    "nodes": NODE_COLS,
    "nonces": NONCE_COLS,
    "schedules": schedrecord.SCHEDULE_COLS,
    "schedule_runs": schedrecord.RUN_COLS,
}
_EXEC_SELECT = ", ".join(EXEC_COLS)
_JOB_SELECT = ", ".join(JOB_COLS)

# Set unless the URL says otherwise: a server that vanished is noticed within about a minute
# (keepalives), and an unreachable one is reported after 10 s rather than hanging.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "application_name": "opsbay-coordinator",
}


def is_postgresql(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres") and "://" in url


def _secrets(url: str) -> list[str]:
    """The password of a URL as written and as meant (percent-decoded), and any `password=`
    parameter's: what `shown` and `scrub` hide. The password is what stands between the user
    name's ':' and the last '@' (as `transport` reads a broker URL), so that an unencoded '@'
    or '/' in it never shows its tail."""
    rest = url.partition("://")[2]
    userinfo, at, _ = rest.rpartition("@")
    found = [userinfo.partition(":")[2]] if at else []
    found += re.findall(r"[?&]password=([^&]*)", url)
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def url_password(url: str) -> str | None:
    """The password as written in the URL's user part (to the last '@'), or None."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    _user, colon, password = userinfo.partition(":")
    return password if at and colon else None


def scrub(text: str, url: str) -> str:
    """`text` with the password of `url` replaced by ***."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def shown(url: str) -> str:
    """The URL as it may be logged: its password as ***."""
    head, sep, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if sep and at:
        user, colon, _ = userinfo.partition(":")
        url = f"{head}://{user}{':***' if colon else ''}@{after}"
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


class PgStore:
    """The record in PostgreSQL (`record.Record`), the same as `store.Store` (SQLite) does.
    `url`: postgresql://[user[:password]@][host][:port][/dbname][?param=value...]; what it
    leaves out comes from libpq's PG* variables (PGHOST, PGUSER, PGPASSWORD, PGPASSFILE,
    ...) and ~/.pgpass, as for psql."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.shown = shown(url)
        self.db = self._connect()
        self.schedules = schedrecord.ScheduleTable(self._x, postgresql=True)
        try:
            version = self._migrate()
        except BaseException:
            self.db.close()
            raise
        log.info("record: PostgreSQL %s (schema version %d)", self.shown, version)

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        try:
            given = conninfo_to_dict(self.url)
        except psycopg.Error:  # its text may quote a piece of the password: not shown
            raise ConfigError(
                f"{SETTING}: {self.shown!r} is not a PostgreSQL URL libpq can read; "
                "percent-encode a user or password holding @ : / ? # % or spaces (@ as %40, "
                "/ as %2F), or give the password by PGPASSWORD or ~/.pgpass"
            ) from None
        # libpq ends the password at the first '@' after it, we at the last: where they do not
        # agree (an unencoded '@' in the password), libpq would take a piece of the password for
        # the host, and its error would show it. Refuse first, quoting nothing.
        written = url_password(self.url)
        if written is not None and unquote(written) != (given.get("password") or ""):
            raise ConfigError(
                f"{SETTING}: {self.shown!r}: percent-encode @ : / ? # % or spaces in the "
                "password (@ as %40, / as %2F), or give it by PGPASSWORD or ~/.pgpass"
            )
        extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        try:
            db = psycopg.connect(make_conninfo(self.url, **extra), autocommit=False)
        except psycopg.Error as e:  # from None: the cause's text is scrubbed here, not there
            raise StoreUnavailable(
                f"{SETTING}: cannot connect to {self.shown}: {scrub(str(e).strip(), self.url)}"
            ) from None
        db.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        return db

    def _migrate(self) -> int:
        """Create the schema in an empty database, or bring it to SCHEMA_VERSION one step at a
        time, in one transaction under MIGRATION_LOCK; refuse a record of a newer schema (it
        may mean things this code does not know). The schema version it had."""
        self._x("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        self._x("CREATE TABLE IF NOT EXISTS opsbay_schema (version INTEGER NOT NULL)")
        row = self._x("SELECT version FROM opsbay_schema").fetchone()
        has_jobs = self._x("SELECT to_regclass('jobs') IS NOT NULL").fetchone()
        if row is None and has_jobs and has_jobs[0]:
            self.db.rollback()
            raise ConfigError(
                f"{SETTING}: {self.shown} has a table `jobs` but no opsbay schema version: "
                "not an opsbay record? Give opsbay a database of its own (or a schema: "
                "?options=-csearch_path%3Dopsbay)"
            )
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            self.db.rollback()
            raise ConfigError(
                f"{SETTING}: {self.shown} is a record of schema version {version}, newer than "
                f"this opsbay knows ({SCHEMA_VERSION}): run the opsbay that wrote it, or a "
                "newer one"
            )
        if row is None:
            self._x(SCHEMA)
            for statement in schedrecord.STATEMENTS:
                self._x(statement)
            self._x("INSERT INTO opsbay_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number]:
                self._x(statement)
            self._x("UPDATE opsbay_schema SET version = %s", (number,))
        self.commit()
        return version

    # -- every statement goes through here: PostgreSQL's errors become ours
    def _x(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> psycopg.Cursor[Any]:
        try:
            return self.db.execute(sql, params)
        except Exception as e:
            raise self._ours(e) from e

    def _many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.db.cursor().executemany(sql, rows)
        except Exception as e:
            raise self._ours(e) from e

    def _ours(self, e: Exception) -> Exception:
        if isinstance(
            e, pgerrors.DeadlockDetected | pgerrors.SerializationFailure | pgerrors.LockNotAvailable
        ):
            return Contention(f"record {self.shown}: {type(e).__name__}: {str(e).strip()}")
        if isinstance(e, psycopg.OperationalError | psycopg.InterfaceError) and (
            self.db.closed or self.db.broken
        ):
            return StoreUnavailable(
                f"record {self.shown}: the connection to PostgreSQL was lost "
                f"({scrub(str(e).strip(), self.url)}); nothing of this batch was committed"
            )
        if isinstance(e, psycopg.OperationalError | psycopg.InternalError):
            # The server's state, not the message's content (a statement timeout, a server
            # shutting down, out of resources): the batch as a whole fails, is not
            # acknowledged, and comes again once the coordinator is restarted.
            return StoreUnavailable(
                f"record {self.shown}: PostgreSQL could not do it now "
                f"({type(e).__name__}: {scrub(str(e).strip(), self.url)}); nothing of this "
                "batch was committed"
            )
        return e

    # -- batches
    @contextmanager
    def atomic(self) -> Iterator[None]:
        """All of the block's writes, or none of them (a savepoint in the open batch)."""
        self._x("SAVEPOINT atomic")
        try:
            yield
        except BaseException:
            self._x("ROLLBACK TO SAVEPOINT atomic")
            raise
        finally:
            if not self.db.broken:
                self._x("RELEASE SAVEPOINT atomic")

    def commit(self) -> None:
        try:
            self.db.commit()
        except Exception as e:
            raise self._ours(e) from e

    def rollback(self) -> None:
        try:
            self.db.rollback()
        except Exception as e:
            raise self._ours(e) from e

    def close(self) -> None:
        try:
            if not self.db.closed and not self.db.broken:
                self.commit()
        finally:
            self.db.close()

    # -- nonces
    def remember_nonce(self, kid: str, nonce: str, ts: int) -> bool:
        """Record a nonce; False if it was already seen."""
        cur = self._x(
            "INSERT INTO nonces (kid, nonce, ts) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (kid, nonce, ts),
        )
        return cur.rowcount == 1

    def forget_nonce(self, kid: str, nonce: str) -> None:
        self._x("DELETE FROM nonces WHERE kid = %s AND nonce = %s", (kid, nonce))

    def forget_nonces_before(self, ts: int) -> None:
        self._x("DELETE FROM nonces WHERE ts < %s", (ts,))

    # -- jobs
    def insert_job(self, job: Job) -> bool:
        cols, marks = ", ".join(JOB_COLS), ", ".join(["%s"] * len(JOB_COLS))
        cur = self._x(
            f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT (job_id) DO NOTHING",
            job_row(job),
        )
        if cur.rowcount != 1:
            return False
        if job.executions:  # all of them in one executemany (a pipeline: no round trip each)
            cols, marks = _EXEC_SELECT, ", ".join(["%s"] * len(EXEC_COLS))
            self._many(
                f"INSERT INTO executions (job_id, {cols}) VALUES (%s, {marks}) "
                "ON CONFLICT (job_id, node) DO NOTHING",
                [(job.job_id, *execution_row(ex)) for ex in job.executions],
            )
        return True

    def claim(self, who: str) -> None:
        """A session advisory lock on `who`, held by this connection until it closes (a
        coordinator that dies lets it go with its connection)."""
        row = self._x("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (who,)).fetchone()
        self.commit()
        if not row or not row[0]:
            raise ConfigError(
                f"another coordinator runs as {who!r} on the record {self.shown}: give each "
                "coordinator of a record its own --name"
            )

    def lock_job(self, job_id: str) -> bool:
        row = self._x("SELECT 1 FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,)).fetchone()
        return row is not None

    def set_job_state(self, job_id: str, state: str) -> None:
        self._x("UPDATE jobs SET state = %s WHERE job_id = %s", (state, job_id))

    def write_execution(self, job_id: str, ex: Execution, before: str | None) -> bool:
        values = execution_row(ex)
        if before is None:
            cols, marks = _EXEC_SELECT, ", ".join(["%s"] * len(EXEC_COLS))
            cur = self._x(
                f"INSERT INTO executions (job_id, {cols}) VALUES (%s, {marks}) "
                "ON CONFLICT (job_id, node) DO NOTHING",
                (job_id, *values),
            )
        else:
            sets = ", ".join(f"{c} = %s" for c in EXEC_COLS)
            cur = self._x(
                f"UPDATE executions SET {sets} WHERE job_id = %s AND node = %s AND state = %s",
                (*values, job_id, ex.node, before),
            )
        return cur.rowcount == 1

    def write_executions(
        self, job_id: str, changes: Sequence[tuple[str | None, Execution]]
    ) -> set[str]:
        """New executions in one statement, changed ones in another (each a pipeline of rows):
        no round trip per execution, whatever the job's size."""
        written: set[str] = set()
        new = [(job_id, *execution_row(ex)) for before, ex in changes if before is None]
        changed = [
            (*execution_row(ex), job_id, ex.node, before)
            for before, ex in changes
            if before is not None
        ]
        if new:
            cols, marks = _EXEC_SELECT, ", ".join(["%s"] * len(EXEC_COLS))
            written |= self._many_returning(
                f"INSERT INTO executions (job_id, {cols}) VALUES (%s, {marks}) "
                "ON CONFLICT (job_id, node) DO NOTHING RETURNING node",
                new,
            )
        if changed:
            sets = ", ".join(f"{c} = %s" for c in EXEC_COLS)
            written |= self._many_returning(
                f"UPDATE executions SET {sets} WHERE job_id = %s AND node = %s AND state = %s "
                "RETURNING node",
                changed,
            )
        return written

    def _many_returning(self, sql: str, rows: Sequence[Sequence[Any]]) -> set[str]:
        """`_many` for a statement that returns one column: every row it returned."""
        try:
            cur = self.db.cursor()
            cur.executemany(sql, rows, returning=True)
            got: set[str] = set()
            while True:
                got.update(row[0] for row in cur.fetchall())
                if not cur.nextset():
                    return got
        except Exception as e:
            raise self._ours(e) from e

    def get_job(self, job_id: str, executions: bool = True) -> Job | None:
        """The job; with `executions=False` without them (cheap for jobs on many nodes)."""
        row = self._x(f"SELECT {_JOB_SELECT} FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        if row is None:
            return None
        if not executions:
            return _job(row, None)
        return self._jobs_with_executions([row])[0]

    def _jobs_with_executions(self, rows: list[tuple[Any, ...]]) -> list[Job]:
        """The jobs of `rows` with their executions, read in one statement."""
        ids = [r[0] for r in rows]
        by_job: dict[str, list[Execution]] = {i: [] for i in ids}
        for r in self._x(
            f"SELECT job_id, {_EXEC_SELECT} FROM executions WHERE job_id = ANY(%s) "
            "ORDER BY job_id, node",
            (ids,),
        ):
            by_job[r[0]].append(_execution(r[1:]))
        return [_job(r, by_job[r[0]]) for r in rows]

    def execution(self, job_id: str, node: str) -> Execution | None:
        row = self._x(
            f"SELECT {_EXEC_SELECT} FROM executions WHERE job_id = %s AND node = %s",
            (job_id, node),
        ).fetchone()
        return _execution(row) if row else None

    def state_counts(self, job_id: str) -> dict[str, int]:
        """How many of the job's executions are in each state."""
        rows = self._x(
            "SELECT state, count(*) FROM executions WHERE job_id = %s GROUP BY state", (job_id,)
        )
        return {state: int(n) for state, n in rows}

    def has_held(self, job_id: str) -> bool:
        """Whether the job's rollout holds any execution back (`rollout.is_held`, in SQL)."""
        row = self._x(
            f"SELECT 1 FROM executions WHERE job_id = %s AND state = {PENDING}"
            " AND dispatched_ms IS NULL LIMIT 1",
            (job_id,),
        ).fetchone()
        return row is not None

    def briefs(self, job_id: str) -> list[Brief]:
        """Node, state and dispatch time of each of a job's executions, without their output."""
        rows = self._x(
            "SELECT node, state, dispatched_ms FROM executions WHERE job_id = %s ORDER BY node",
            (job_id,),
        )
        return [Brief(*r) for r in rows]

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
            where.append("schedule = %s")
            args.append(schedule)
        if node is not None:
            where.append("job_id IN (SELECT job_id FROM executions WHERE node = %s)")
            args.append(node)
        if state is not None:
            where.append("state = %s")
            args.append(state)
        sql = f"SELECT {_JOB_SELECT} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY submitted_ms DESC, job_id LIMIT %s"
        rows = self._x(sql, [*args, limit]).fetchall()
        return self._jobs_with_executions(rows) if rows else []

    def overdue(self, now_ms: int, grace_ms: int) -> list[tuple[str, str]]:
        """(job id, node) of executions past a deadline: sent but not started by start-by +
        grace, or running past start + timeout + grace."""
        rows = self._x(
            "SELECT e.job_id, e.node FROM executions e JOIN jobs j USING (job_id) "
            f"WHERE (e.state = {PENDING} AND e.start_by_ms + %s < %s) "
            f"OR (e.state = {RUNNING} AND e.started_ms + j.timeout_s * 1000 + %s < %s)",
            (grace_ms, now_ms, grace_ms, now_ms),
        )
        return [(j, n) for j, n in rows]

    def redispatchable(self, now_ms: int, node: str | None = None) -> list[tuple[str, str]]:
        """(job id, node) of executions sent to their node (all nodes, or `node`) and not
        started: pending, within their start-by deadline."""
        where = "" if node is None else "node = %s AND "
        rows = self._x(
            f"SELECT job_id, node FROM executions WHERE {where}dispatched_ms IS NOT NULL "
            f"AND state = {PENDING} AND start_by_ms > %s",
            (*(() if node is None else (node,)), now_ms),
        )
        return [(j, n) for j, n in rows]

    def open_count(self, node: str) -> int:
        """Executions for `node` not yet in a terminal state."""
        row = self._x(
            f"SELECT count(*) FROM executions WHERE node = %s AND state IN {OPEN}", (node,)
        ).fetchone()
        return int(row[0]) if row else 0

    def prune(self, *, before_ms: int, keep: int) -> int:
        """Delete finished jobs submitted before `before_ms`, and beyond the newest `keep`
        finished ones. Jobs with an execution still open are never deleted."""
        open_jobs = f"SELECT job_id FROM executions WHERE state IN {OPEN}"
        cur = self._x(
            f"DELETE FROM jobs WHERE job_id NOT IN ({open_jobs}) AND (submitted_ms < %s OR "
            f"job_id IN (SELECT job_id FROM jobs WHERE job_id NOT IN ({open_jobs}) "
            "ORDER BY submitted_ms DESC, job_id OFFSET %s))",
            (before_ms, keep),
        )
        return cur.rowcount

    def count_terminal(self) -> int:
        row = self._x(
            "SELECT count(*) FROM executions WHERE state = ANY(%s)", (sorted(TERMINAL),)
        ).fetchone()
        return int(row[0]) if row else 0

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
        self._x(
            "INSERT INTO nodes (node, last_seen_ms, kid, info) VALUES "
            "(%(node)s, %(now)s, coalesce(%(kid)s::text, ''), coalesce(%(info)s::json, '{}')) "
            "ON CONFLICT (node) DO UPDATE SET last_seen_ms = greatest(nodes.last_seen_ms, "
            "excluded.last_seen_ms), kid = coalesce(%(kid)s::text, nodes.kid), "
            "info = coalesce(%(info)s::json, nodes.info)",
            {"node": node, "now": now_ms, "kid": kid, "info": _json(info)},
        )
        if state is None or session is None:
            return False
        # A status from an older connection than the one we know never wins (late Wills).
        cur = self._x(
            "UPDATE nodes SET state = %s, session = %s, seq = %s WHERE node = %s "
            "AND (session < %s OR (session = %s AND seq <= %s))",
            (state, session, seq, node, session, session, seq),
        )
        applied = cur.rowcount == 1
        if applied and state == "online":  # an agent started after the conflict: resolved
            self._x(
                "UPDATE nodes SET conflict = NULL, conflict_ms = NULL, conflict_session = NULL "
                "WHERE node = %s AND conflict_session < %s",
                (node, session),
            )
        return applied

    def node_conflict(self, node: str, now_ms: int, text: str, session: int) -> None:
        """As `Store.node_conflict`: record what happened, forget the stopped agent's session."""
        self._x(
            "UPDATE nodes SET conflict = %s, conflict_ms = %s, conflict_session = %s, "
            "session = CASE WHEN session = %s THEN 0 ELSE session END, "
            "seq = CASE WHEN session = %s THEN 0 ELSE seq END WHERE node = %s",
            (text, now_ms, session, session, session, node),
        )

    def node_kid(self, node: str) -> str | None:
        """The key id the node last signed with."""
        row = self._x("SELECT kid FROM nodes WHERE node = %s", (node,)).fetchone()
        return row[0] if row and row[0] else None

    def node_labels_all(self) -> dict[str, dict[str, str]]:
        """Every known node and its labels."""
        return {node: _labels(info) for node, info in self._x("SELECT node, info FROM nodes")}

    def node_labels(self, node: str) -> dict[str, str]:
        row = self._x("SELECT info FROM nodes WHERE node = %s", (node,)).fetchone()
        return _labels(row[0]) if row else {}

    def list_nodes(self) -> list[dict[str, Any]]:
        rows = self._x(
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
                **info,
                **({"conflict": conflict, "conflict_ms": conflict_ms} if conflict else {}),
            }
            for n, s, ses, seq, seen, info, conflict, conflict_ms in rows
        ]

    # -- moving a record here (`opsbay store copy`)
    def counts(self) -> dict[str, int]:
        """How many rows each table holds."""
        return {
            t: int(self._x(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore[index]
            for t in TABLES
        }

    def copy_rows(self, table: str, rows: Iterable[Sequence[Any]]) -> int:
        """COPY rows (in TABLES[table]'s column order, as this module writes them) into
        `table`, in the open batch; how many."""
        n = 0
        cols = ", ".join(TABLES[table])
        try:
            with self.db.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    n += 1
        except Exception as e:
            raise self._ours(e) from e
        return n


# -- rows as this module writes and reads them
def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _text(value: bytes) -> str:
    return bytes(value).decode("utf-8", errors="surrogatepass")


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", errors="surrogatepass")


def _labels(info: Any) -> dict[str, str]:
    labels = info.get("labels", {}) if isinstance(info, dict) else {}
    return dict(labels) if isinstance(labels, dict) else {}


def job_row(job: Job) -> tuple[Any, ...]:
    row = fields_of(job)
    row["where_labels"] = _json(row.pop("where"))
    return tuple(row[c] for c in JOB_COLS)


def execution_row(ex: Execution) -> tuple[Any, ...]:
    row = fields_of(ex)
    row["host"] = _json(row["host"])
    row["stdout"], row["stderr"] = _bytes(row["stdout"]), _bytes(row["stderr"])
    row["truncated"] = bool(row["truncated"])
    return tuple(row[c] for c in EXEC_COLS)


def _job(row: tuple[Any, ...], executions: list[Execution] | None) -> Job:
    fields = dict(zip(JOB_COLS, row, strict=True))
    fields["where"] = fields.pop("where_labels")
    if executions is not None:
        fields["executions"] = executions
    return Job(**fields)


def _execution(row: Sequence[Any]) -> Execution:
    fields = dict(zip(EXEC_COLS, row, strict=True))
    fields["stdout"], fields["stderr"] = _text(fields["stdout"]), _text(fields["stderr"])
    return Execution(**fields)


# -- `opsbay store copy`: a SQLite record into an empty PostgreSQL one
def sqlite_rows(db: sqlite3.Connection, table: str) -> Iterator[tuple[Any, ...]]:
    """A SQLite record's rows of `table`, as PgStore writes them (same columns by name)."""
    cols = TABLES[table]
    for row in db.execute(f"SELECT {', '.join(cols)} FROM {table}"):
        if table == "executions":
            fields = dict(zip(cols, row, strict=True))
            fields["stdout"], fields["stderr"] = _bytes(fields["stdout"]), _bytes(fields["stderr"])
            fields["truncated"] = bool(fields["truncated"])
            row = tuple(fields[c] for c in cols)
        yield row


def copy_record(source: Path, target: str) -> dict[str, int]:
    """Copy every job, execution, node, remembered nonce, schedule and schedule run of the
    SQLite record `source` (a
    file) into the PostgreSQL record `target`, which must be empty; all or nothing. How many
    rows of each table were copied. No coordinator may write `source` meanwhile."""
    from opsbay_mqtt.store import SCHEMA_VERSION as SQLITE_VERSION
    from opsbay_mqtt.store import Store

    if not source.is_file():
        raise ConfigError(f"--from: no SQLite record at {source}")
    try:
        Store(source).close()  # brings an older record to the current schema (and checks it)
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"--from: {source} is not an opsbay SQLite record ({e})") from None
    # Read-only, in one read transaction: a consistent picture, and never a write to the source.
    src = sqlite3.connect(f"file:{source.resolve()}?mode=ro", uri=True)
    try:
        version = src.execute("PRAGMA user_version").fetchone()[0]
        if version != SQLITE_VERSION or SQLITE_VERSION != SCHEMA_VERSION:
            raise ConfigError(
                f"--from: {source} is a record of schema version {version}; this opsbay copies "
                f"version {SCHEMA_VERSION}"
            )
        dest = PgStore(target)
        try:
            if any(dest.counts().values()):
                dest.rollback()
                raise ConfigError(
                    f"--to: {dest.shown} already holds a record ("
                    + ", ".join(f"{n} {t}" for t, n in dest.counts().items())
                    + "): copy into an empty one (a new database, or TRUNCATE "
                    + ", ".join(TABLES)
                    + ")"
                )
            src.execute("BEGIN")
            copied = {t: dest.copy_rows(t, sqlite_rows(src, t)) for t in TABLES}
            dest.commit()
            return copied
        finally:
            dest.db.rollback()
            dest.db.close()
    finally:
        src.close()
