"""The schedules and what became of their due times, in the coordinator's record: one SQL text
for both backends (SQLite's `?` becomes psycopg's `%s`), as `store.Store.schedules` and
`pgstore.PgStore.schedules`.

Each due time is handled once whatever the number of coordinators: the coordinator that handles
it holds the schedule's row (PostgreSQL: FOR UPDATE SKIP LOCKED, so that several split the due
schedules between them), records what became of the due time (`add_run`: once per schedule and
due time) and moves the schedule on from exactly that due time (`advance`: only if no one else
did), all in one transaction. A removed schedule stays as a tombstone (`removed_ms`) for a
retention period: its runs keep their name, and a retried removal is answered as it was.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from opsbay_mqtt.protocol import Schedule, ScheduleRun, ScheduleSpec, fields_of, record
from opsbay_mqtt.states import sql as _sql

SCHEMA = """
CREATE TABLE IF NOT EXISTS schedules (
    name TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    owner TEXT NOT NULL,
    owner_kid TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    removed_ms BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    next_due_ms BIGINT NOT NULL,
    next_fire_ms BIGINT NOT NULL,
    last_job_id TEXT,
    change_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (next_fire_ms)
    WHERE paused = 0 AND removed_ms IS NULL;
CREATE TABLE IF NOT EXISTS schedule_runs (
    name TEXT NOT NULL,
    due_ms BIGINT NOT NULL,
    recorded_ms BIGINT NOT NULL,
    job_id TEXT,
    code TEXT NOT NULL,
    reason TEXT,
    count BIGINT NOT NULL DEFAULT 1,
    last_due_ms BIGINT,
    PRIMARY KEY (name, due_ms)
);
CREATE INDEX IF NOT EXISTS schedule_runs_by_time ON schedule_runs (recorded_ms);
CREATE INDEX IF NOT EXISTS jobs_by_schedule ON jobs (schedule, submitted_ms);
"""
STATEMENTS = tuple(s.strip() for s in SCHEMA.split(";") if s.strip())

SCHEDULE_COLS = (
    "name", "spec", "owner", "owner_kid", "paused", "removed_ms", "created_ms", "updated_ms",
    "next_due_ms", "next_fire_ms", "last_job_id", "change_id",
)  # fmt: skip
RUN_COLS = ("name", "due_ms", "recorded_ms", "job_id", "code", "reason", "count", "last_due_ms")
_SELECT = ", ".join(SCHEDULE_COLS)
_LIVE = "removed_ms IS NULL"
PENDING = _sql("pending")


class _Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class ScheduleTable:
    """The schedules of one record. `execute` runs one statement in the record's open batch."""

    def __init__(self, execute: Callable[..., Any], *, postgresql: bool) -> None:
        self._execute = execute
        self._pg = postgresql

    def _x(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        cur: _Cursor = self._execute(sql.replace("?", "%s") if self._pg else sql, params)
        return cur

    # -- the schedules
    def get(self, name: str, *, lock: bool = False) -> Schedule | None:
        """The schedule (not a removed one); with `lock`, held until the batch ends
        (PostgreSQL: against the other coordinators)."""
        sql = f"SELECT {_SELECT} FROM schedules WHERE name = ? AND {_LIVE}"
        if lock and self._pg:
            sql += " FOR UPDATE"
        row = self._x(sql, (name,)).fetchone()
        return None if row is None else _schedule(row)

    def add(self, s: Schedule, next_fire_ms: int) -> bool:
        """Record a new schedule, over the tombstone of a removed one of the same name; False
        if a schedule of that name exists."""
        row = schedule_row(s, next_fire_ms)
        cols, marks = ", ".join(SCHEDULE_COLS), ", ".join("?" * len(SCHEDULE_COLS))
        sets = ", ".join(f"{c} = excluded.{c}" for c in SCHEDULE_COLS if c != "name")
        cur = self._x(
            f"INSERT INTO schedules ({cols}) VALUES ({marks}) ON CONFLICT (name) DO UPDATE "
            f"SET {sets} WHERE schedules.removed_ms IS NOT NULL",
            row,
        )
        return cur.rowcount == 1

    def set_paused(self, name: str, paused: bool, change_id: str, now_ms: int, **due: int) -> bool:
        """Pause or resume (with `next_due_ms` and `next_fire_ms` from now on)."""
        sets = "paused = ?, change_id = ?, updated_ms = ?"
        args: list[Any] = [int(paused), change_id, now_ms]
        for col in ("next_due_ms", "next_fire_ms"):
            if col in due:
                sets += f", {col} = ?"
                args.append(due[col])
        cur = self._x(f"UPDATE schedules SET {sets} WHERE name = ? AND {_LIVE}", (*args, name))
        return cur.rowcount == 1

    def remove(self, name: str, change_id: str, now_ms: int) -> bool:
        cur = self._x(
            f"UPDATE schedules SET removed_ms = ?, change_id = ?, updated_ms = ? "
            f"WHERE name = ? AND {_LIVE}",
            (now_ms, change_id, now_ms, name),
        )
        return cur.rowcount == 1

    def listing(self) -> list[Schedule]:
        rows = self._x(f"SELECT {_SELECT} FROM schedules WHERE {_LIVE} ORDER BY name").fetchall()
        return [_schedule(r) for r in rows]

    def due(self, now_ms: int, limit: int) -> list[Schedule]:
        """Schedules whose next run is to start by `now_ms`, earliest first, held until the
        batch ends; with PostgreSQL, none that another coordinator holds (it is handling them)."""
        sql = (
            f"SELECT {_SELECT} FROM schedules WHERE paused = 0 AND {_LIVE} "
            "AND next_fire_ms <= ? ORDER BY next_fire_ms, name LIMIT ?"
        )
        if self._pg:
            sql += " FOR UPDATE SKIP LOCKED"
        return [_schedule(r) for r in self._x(sql, (now_ms, limit)).fetchall()]

    def next_fire(self) -> int | None:
        """When the next run of any schedule is to start (None: none is active)."""
        row = self._x(
            f"SELECT min(next_fire_ms) FROM schedules WHERE paused = 0 AND {_LIVE}"
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def advance(
        self, name: str, from_due_ms: int, next_due_ms: int, next_fire_ms: int, job_id: str | None
    ) -> bool:
        """Move the schedule on from `from_due_ms` (only if that is still its next due time:
        whether this coordinator is the one that handled it); `job_id`: the run it started."""
        cur = self._x(
            "UPDATE schedules SET next_due_ms = ?, next_fire_ms = ?, last_job_id = "
            f"coalesce(?, last_job_id) WHERE name = ? AND next_due_ms = ? AND {_LIVE}",
            (next_due_ms, next_fire_ms, job_id, name, from_due_ms),
        )
        return cur.rowcount == 1

    def set_last_job(self, name: str, job_id: str) -> None:
        self._x("UPDATE schedules SET last_job_id = ? WHERE name = ?", (job_id, name))

    # -- what became of each due time
    def add_run(self, run: ScheduleRun) -> bool:
        """Record what became of a due time; False if it is recorded already."""
        row = fields_of(run)
        marks = ", ".join("?" * len(RUN_COLS))
        cur = self._x(
            f"INSERT INTO schedule_runs ({', '.join(RUN_COLS)}) VALUES ({marks}) "
            "ON CONFLICT (name, due_ms) DO NOTHING",
            [row[c] for c in RUN_COLS],
        )
        return cur.rowcount == 1

    def unstarted_runs(self, since_ms: int, before_ms: int) -> list[str]:
        """Job ids of runs recorded between `since_ms` and `before_ms` that have an execution
        dispatched and not started: whoever started them may have died before sending."""
        rows = self._x(
            "SELECT DISTINCT r.job_id FROM schedule_runs r JOIN executions e "
            "ON e.job_id = r.job_id WHERE r.recorded_ms >= ? AND r.recorded_ms < ? "
            f"AND e.state = {PENDING} AND e.dispatched_ms IS NOT NULL",
            (since_ms, before_ms),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def runs(self, name: str, limit: int, since_ms: int = 0) -> list[ScheduleRun]:
        """The latest runs and skips of `name` (recorded since `since_ms`: those of the
        schedule that has the name now, not of one removed before it), newest first, with
        their job's state."""
        cols = ", ".join(f"r.{c}" for c in RUN_COLS)
        rows = self._x(
            f"SELECT {cols}, j.state FROM schedule_runs r LEFT JOIN jobs j "
            "ON j.job_id = r.job_id WHERE r.name = ? AND r.recorded_ms >= ? "
            "ORDER BY r.due_ms DESC LIMIT ?",
            (name, since_ms, limit),
        ).fetchall()
        return [_run(r) for r in rows]

    def last_runs(self) -> dict[str, ScheduleRun]:
        """Each live schedule's latest run or skip (not a removed namesake's), with its job's
        state."""
        cols = ", ".join(f"r.{c}" for c in RUN_COLS)
        rows = self._x(
            f"SELECT {cols}, j.state FROM schedules s JOIN schedule_runs r ON r.name = s.name "
            "LEFT JOIN jobs j ON j.job_id = r.job_id WHERE s.removed_ms IS NULL AND r.due_ms = "
            "(SELECT max(due_ms) FROM schedule_runs l WHERE l.name = s.name "
            "AND l.recorded_ms >= s.created_ms)"
        ).fetchall()
        return {r[0]: _run(r) for r in rows}

    def prune(self, before_ms: int, keep: int) -> int:
        """Forget runs older than `before_ms` or beyond each schedule's newest `keep`, and
        tombstones older than `before_ms`; how many runs."""
        cur = self._x(
            "DELETE FROM schedule_runs WHERE due_ms < ? OR (name, due_ms) IN (SELECT name, "
            "due_ms FROM (SELECT name, due_ms, row_number() OVER (PARTITION BY name ORDER BY "
            "due_ms DESC) AS n FROM schedule_runs) AS ranked WHERE n > ?)",
            (before_ms, keep),
        )
        self._x("DELETE FROM schedules WHERE removed_ms < ?", (before_ms,))
        return max(0, cur.rowcount)


def schedule_row(s: Schedule, next_fire_ms: int) -> tuple[Any, ...]:
    fields = fields_of(s)
    spec = {name: fields.pop(name) for name in _SPEC}
    fields.update(spec=json.dumps(spec, sort_keys=True), paused=int(s.paused), removed_ms=None)
    fields["next_fire_ms"] = next_fire_ms
    return tuple(fields[c] for c in SCHEDULE_COLS)


_SPEC = tuple(f.name for f in dataclasses.fields(ScheduleSpec))


def _schedule(row: Sequence[Any]) -> Schedule:
    fields = dict(zip(SCHEDULE_COLS, row, strict=True))
    spec = json.loads(fields.pop("spec"))
    del fields["removed_ms"], fields["next_fire_ms"]
    fields["paused"] = bool(fields["paused"])
    return record(Schedule, {**spec, **fields})


def _run(row: Sequence[Any]) -> ScheduleRun:
    fields = dict(zip((*RUN_COLS, "state"), row, strict=True))
    return ScheduleRun(**fields)
