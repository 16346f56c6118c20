"""The record, on every backend (SQLite `store`, PostgreSQL `pgstore`): jobs and executions,
listing with filters, node status ordering, nonces, atomic(); SQLite's files and schema
versions."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from opsbay_mqtt import pgstore
from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.pgstore import PgStore, StoreUnavailable
from opsbay_mqtt.protocol import Execution, Job, replace
from opsbay_mqtt.record import Contention, Record
from opsbay_mqtt.store import SCHEMA_VERSION, Store
from tests.harness import wait_until

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_server, pg_url, own_pg

MS = 1_700_000_000_000


def jid(n: int) -> str:
    return str(uuid.UUID(int=n))


def make_job(
    n: int, submitted_ms: int = MS, state: str = "pending", nodes: tuple[str, ...] = ("web",)
) -> Job:
    return Job(
        job_id=jid(n),
        state=state,  # type: ignore[arg-type]
        target=nodes[0] if len(nodes) == 1 else "all",
        command=f"echo {n}",
        timeout_s=60,
        start_by_ms=submitted_ms + 60_000,
        submitted_ms=submitted_ms,
        submitted_by="default",
        executions=[Execution(node=node, state="pending") for node in nodes],
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "opsbay.db"


# Every backend of the record runs every test below that takes `store`, through the interface
# (record.Record) only; the SQLite-only ones (files, schema versions) open a `Store` themselves,
# the PostgreSQL-only ones (at the end) `PgStore`s. Each opener gets the test's
# record file and its fixtures (PostgreSQL: a new database on the suite's server, tests/pg.py).
BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Record]] = {
    "sqlite": lambda path, _: Store(path),
    "postgresql": lambda _, request: PgStore(request.getfixturevalue("pg_url")),
}


@pytest.fixture(params=sorted(BACKENDS))
def store(path: Path, request: pytest.FixtureRequest) -> Iterator[Record]:
    s = BACKENDS[request.param](path, request)
    yield s
    s.close()


def put(store: Record, job_id: str, ex: Execution) -> None:
    """Write `ex` over whatever the execution is now (a test's set-up, not a guarded change)."""
    now = store.execution(job_id, ex.node)
    assert store.write_execution(job_id, ex, None if now is None else now.state)


def test_a_job_is_inserted_once(store: Record) -> None:
    assert store.insert_job(make_job(1, nodes=("a",)))
    assert not store.insert_job(make_job(1, nodes=("a", "b"), submitted_ms=MS + 1))
    got = store.get_job(jid(1))
    assert got is not None and [x.node for x in got.executions] == ["a"]
    assert got.submitted_ms == MS


def test_an_execution_changes_only_from_the_state_it_was_read_in(store: Record) -> None:
    store.insert_job(make_job(1, nodes=("a",)))
    running = Execution(node="a", state="running", started_ms=MS)
    assert store.write_execution(jid(1), running, "pending")
    # Another coordinator read it as pending too: its change is refused, the record unchanged.
    late = Execution(node="a", state="expired", finished_ms=MS + 1)
    assert not store.write_execution(jid(1), late, "pending")
    assert store.execution(jid(1), "a") == running
    assert not store.write_execution(jid(1), running, None)  # new only if there is none
    done = Execution(node="a", state="succeeded", exit_code=0, finished_ms=MS + 2)
    assert store.write_execution(jid(1), done, "running")
    assert store.execution(jid(1), "a") == done


def test_lock_job_says_whether_the_job_exists(store: Record) -> None:
    store.insert_job(make_job(1, nodes=("a",)))
    assert store.lock_job(jid(1))
    assert not store.lock_job(jid(2))


def test_insert_and_get(store: Record) -> None:
    j = replace(make_job(1, nodes=("web-02", "web-01")), reason_code="x", reason="why")
    store.insert_job(j)
    got = store.get_job(j.job_id)
    assert got is not None
    # executions come back ordered by node
    assert got == replace(j, executions=sorted(j.executions, key=lambda e: e.node))
    assert store.get_job(jid(2)) is None


def test_execution_round_trip_and_upsert(store: Record) -> None:
    store.insert_job(make_job(1))
    ex = Execution(
        node="web",
        state="failed",
        exit_code=3,
        stdout="out \u00e9",
        stderr="err",
        stdout_bytes=7,
        stderr_bytes=3,
        truncated=True,
        dispatched_ms=MS,
        started_ms=MS + 1,
        finished_ms=MS + 2,
        duration_ms=1,
        reason="exit 3",
        host={"hostname": "web", "load_x100": [1, 2, 3]},
    )
    put(store, jid(1), ex)
    store.set_job_state(jid(1), "failed")
    got = store.get_job(jid(1))
    assert got is not None
    assert got.state == "failed"
    assert got.executions == [ex]


def test_rows_survive_a_reopen(path: Path) -> None:
    s = Store(path)
    s.insert_job(make_job(1))
    s.commit()
    s.insert_job(make_job(2))
    s.close()
    s = Store(path)
    try:
        assert [j.job_id for j in s.list_jobs()] == [jid(1), jid(2)]
    finally:
        s.close()


def test_list_newest_first_with_limit(store: Record) -> None:
    for n, at in [(1, MS + 10), (2, MS + 30), (3, MS + 20), (4, MS + 40)]:
        store.insert_job(make_job(n, submitted_ms=at))
    assert [j.job_id for j in store.list_jobs()] == [jid(4), jid(2), jid(3), jid(1)]
    assert [j.job_id for j in store.list_jobs(limit=2)] == [jid(4), jid(2)]
    assert [j.job_id for j in store.list_jobs(limit=1)] == [jid(4)]


def test_list_ties_are_ordered_by_job_id(store: Record) -> None:
    for n in (3, 1, 2):
        store.insert_job(make_job(n, submitted_ms=MS))
    assert [j.job_id for j in store.list_jobs()] == [jid(1), jid(2), jid(3)]


@pytest.mark.parametrize(
    ("node", "state", "expected"),
    [
        (None, None, [5, 4, 3, 2, 1]),
        ("web", None, [5, 3, 1]),
        ("db", None, [5, 4, 2]),
        ("web-01", None, []),
        ("we", None, []),
        (None, "failed", [4, 1]),
        (None, "succeeded", [5, 2]),
        ("web", "failed", [1]),
        ("db", "succeeded", [5, 2]),
        ("db", "pending", []),
        (None, "running", [3]),
    ],
)
def test_list_filters(
    store: Record, node: str | None, state: str | None, expected: list[int]
) -> None:
    rows = [
        (1, "failed", ("web",)),
        (2, "succeeded", ("db",)),
        (3, "running", ("web",)),
        (4, "failed", ("db",)),
        (5, "succeeded", ("web", "db")),
    ]
    for n, st, nodes in rows:
        store.insert_job(make_job(n, submitted_ms=MS + n, state=st, nodes=nodes))
    got = store.list_jobs(node=node, state=state)
    assert [j.job_id for j in got] == [jid(n) for n in expected]
    assert [j.job_id for j in store.list_jobs(node=node, state=state, limit=1)] == [
        jid(n) for n in expected[:1]
    ]


def test_overdue_and_redispatchable(store: Record) -> None:
    store.insert_job(make_job(1, nodes=("a", "b", "h")))  # timeout 60 s
    sent = Execution(node="a", state="pending", dispatched_ms=1_000, start_by_ms=10_000)
    put(store, jid(1), sent)
    put(store, jid(1), Execution(node="b", state="succeeded", exit_code=0))
    store.insert_job(make_job(2, nodes=("c",)))
    running = Execution(
        node="c", state="running", dispatched_ms=4_000, start_by_ms=6_000, started_ms=5_000
    )
    put(store, jid(2), running)
    # h is held back (never dispatched): no deadline runs for it yet
    assert store.overdue(10_000, 500) == []
    assert store.overdue(10_501, 500) == [(jid(1), "a")]
    assert sorted(store.overdue(65_501, 500)) == [(jid(1), "a"), (jid(2), "c")]
    # Sent and not started: pending within start-by (never running: a node without its
    # ledger would run it again).
    assert store.redispatchable(9_999) == [(jid(1), "a")]
    assert store.redispatchable(10_000) == []
    assert store.redispatchable(9_999, node="a") == [(jid(1), "a")]
    assert store.redispatchable(9_999, node="h") == []
    assert store.count_terminal() == 1


def node(store: Record, name: str = "web") -> dict[str, object]:
    [row] = [n for n in store.list_nodes() if n["node"] == name]
    return row


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        # (state, session, seq) in arrival order
        ([("online", 2000, 0), ("offline", 1000, 9)], ("online", 2000, 0)),  # a late Will
        ([("online", 2000, 5), ("offline", 2000, 4)], ("online", 2000, 5)),
        ([("online", 2000, 5), ("offline", 2000, 6)], ("offline", 2000, 6)),
        ([("online", 1000, 5), ("offline", 2000, 0)], ("offline", 2000, 0)),
        ([("offline", 1000, 3), ("online", 2000, 0)], ("online", 2000, 0)),
        ([("online", 2000, 1), ("offline", 1000, 0), ("offline", 1999, 99)], ("online", 2000, 1)),
        ([("offline", 2000, 1), ("online", 2000, 0)], ("offline", 2000, 1)),
        ([("online", 2000, 1), ("online", 3000, 0), ("offline", 2000, 2)], ("online", 3000, 0)),
    ],
)
def test_node_status_ordering(
    store: Record, updates: list[tuple[str, int, int]], expected: tuple[str, int, int]
) -> None:
    for i, (state, session, seq) in enumerate(updates):
        store.node_seen("web", MS + i, state=state, session=session, seq=seq)
    row = node(store)
    assert (row["state"], row["session"], row["seq"]) == expected


def test_node_seen_without_status(store: Record) -> None:
    store.node_seen("web", MS)
    assert node(store) == {
        "node": "web",
        "state": "unknown",
        "session": 0,
        "seq": 0,
        "last_seen_ms": MS,
    }
    store.node_seen("web", MS + 5, state="online")  # no session: the status is not applied
    assert node(store)["state"] == "unknown"
    assert node(store)["last_seen_ms"] == MS + 5


def test_node_last_seen_never_goes_back(store: Record) -> None:
    store.node_seen("web", MS + 100)
    store.node_seen("web", MS)
    assert node(store)["last_seen_ms"] == MS + 100


def test_node_info_and_listing(store: Record) -> None:
    info = {"labels": {"role": "db"}, "agent_version": "0.1.0", "facts": {"cpu_count": 2}}
    store.node_seen("db", MS, info=info)
    store.node_seen("web", MS, state="online", session=5, seq=1)
    rows = store.list_nodes()
    assert [r["node"] for r in rows] == ["db", "web"]
    assert rows[0] == {
        "node": "db",
        "state": "unknown",
        "session": 0,
        "seq": 0,
        "last_seen_ms": MS,
        **info,
    }
    assert rows[1]["state"] == "online"


def test_remember_nonce(store: Record) -> None:
    assert store.remember_nonce("default", "a" * 32, MS) is True
    assert store.remember_nonce("default", "a" * 32, MS) is False
    assert store.remember_nonce("default", "a" * 32, MS + 1) is False
    assert store.remember_nonce("other", "a" * 32, MS) is True
    assert store.remember_nonce("default", "b" * 32, MS) is True


def test_remember_nonce_after_reopening(path: Path) -> None:
    s = Store(path)
    assert s.remember_nonce("default", "a" * 32, MS) is True
    s.commit()
    assert s.remember_nonce("default", "b" * 32, MS) is True
    s.close()
    s = Store(path)
    try:
        assert s.remember_nonce("default", "a" * 32, MS) is False
        assert s.remember_nonce("default", "b" * 32, MS) is False
        assert s.remember_nonce("default", "c" * 32, MS) is True
    finally:
        s.close()


def test_forget_nonces_before(store: Record) -> None:
    store.remember_nonce("k", "old", 100)
    store.remember_nonce("k", "edge", 200)
    store.forget_nonces_before(200)
    assert store.remember_nonce("k", "old", 100) is True
    assert store.remember_nonce("k", "edge", 200) is False


def test_atomic_rolls_back_on_exception(store: Record) -> None:
    store.insert_job(make_job(1))
    with pytest.raises(RuntimeError, match="boom"), store.atomic():
        store.insert_job(make_job(2))
        store.set_job_state(jid(1), "failed")
        store.remember_nonce("k", "n" * 16, MS)
        store.node_seen("web", MS)
        raise RuntimeError("boom")
    assert store.get_job(jid(2)) is None
    job1 = store.get_job(jid(1))
    assert job1 is not None and job1.state == "pending"
    assert store.remember_nonce("k", "n" * 16, MS) is True
    assert store.list_nodes() == []
    # the batch goes on: later writes commit and survive
    with store.atomic():
        store.insert_job(make_job(3))
    store.commit()
    assert store.get_job(jid(3)) is not None


def test_atomic_keeps_writes_without_exception(path: Path) -> None:
    s = Store(path)
    with s.atomic():
        s.insert_job(make_job(1))
    s.close()
    s = Store(path)
    try:
        assert s.get_job(jid(1)) is not None
    finally:
        s.close()


def test_atomic_failure_after_reopen_leaves_nothing(path: Path) -> None:
    s = Store(path)
    with pytest.raises(ValueError), s.atomic():
        s.insert_job(make_job(1))
        raise ValueError
    s.close()
    s = Store(path)
    try:
        assert s.get_job(jid(1)) is None
    finally:
        s.close()


def test_nested_atomic_rolls_back_only_the_inner_block(store: Record) -> None:
    with store.atomic():
        store.insert_job(make_job(1))
        with pytest.raises(KeyError), store.atomic():
            store.insert_job(make_job(2))
            raise KeyError
    assert store.get_job(jid(1)) is not None
    assert store.get_job(jid(2)) is None


def test_atomic_undoes_all_of_a_block_that_fails(store: Record) -> None:
    store.insert_job(make_job(1))
    with pytest.raises(RuntimeError), store.atomic():
        store.insert_job(make_job(2))
        raise RuntimeError("the message could not be handled")
    assert store.get_job(jid(2)) is None
    assert store.get_job(jid(1)) is not None


def seed_for_pruning(store: Record) -> None:
    """Jobs 1-6, submitted in that order; 3 is running, 5 pending, the rest finished."""
    for n in range(1, 7):
        store.insert_job(make_job(n, submitted_ms=MS + n, state="succeeded"))
        put(store, jid(n), Execution(node="web", state="succeeded", exit_code=0))
    put(store, jid(3), Execution(node="web", state="running"))
    put(store, jid(5), Execution(node="web", state="pending"))


def test_open_count(store: Record) -> None:
    seed_for_pruning(store)
    store.insert_job(make_job(7, nodes=("db",)))
    assert store.open_count("web") == 2
    assert store.open_count("db") == 1
    assert store.open_count("nope") == 0


@pytest.mark.parametrize(
    ("before", "keep", "deleted", "left"),
    [
        (MS, 1000, 0, [6, 5, 4, 3, 2, 1]),
        (MS + 2, 1000, 1, [6, 5, 4, 3, 2]),
        (MS, 2, 2, [6, 5, 4, 3]),
        (MS + 2, 2, 2, [6, 5, 4, 3]),
        (MS, 0, 4, [5, 3]),
        (MS + 100, 1000, 4, [5, 3]),
        (MS + 100, 0, 4, [5, 3]),
    ],
)
def test_prune(store: Record, before: int, keep: int, deleted: int, left: list[int]) -> None:
    seed_for_pruning(store)
    assert store.prune(before_ms=before, keep=keep) == deleted
    assert [j.job_id for j in store.list_jobs(limit=100)] == [jid(n) for n in left]
    # executions go with their job
    assert store.count_terminal() == len([n for n in left if n not in (3, 5)])
    gone = {n for n in range(1, 7)} - set(left)
    assert all(store.execution(jid(n), "web") is None for n in gone)
    assert store.open_count("web") == 2  # jobs 3 and 5, open, are never pruned


def test_a_new_record_has_the_latest_schema_version(tmp_path: Path) -> None:
    Store(tmp_path / "new.db").close()
    con = sqlite3.connect(tmp_path / "new.db")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_a_record_from_before_versions_is_migrated_step_by_step_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    s = Store(path)
    s.insert_job(make_job(1, nodes=("a",)))
    s.node_seen("web", 5, state="online", session=1, seq=1)
    s.commit()
    s.close()
    # As 0.1.0 left it: no version, and none of the columns added since.
    con = sqlite3.connect(path)
    for table, column in (("jobs", "submitted_kid"), ("jobs", "where_labels"),
                          ("jobs", "batch"), ("jobs", "max_failures"),
                          ("executions", "start_by_ms"), ("nodes", "kid"),
                          ("nodes", "conflict"), ("nodes", "conflict_ms"),
                          ("nodes", "conflict_session")):  # fmt: skip
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("PRAGMA user_version = 0")
    con.commit()
    con.close()
    s = Store(path)
    assert s.get_job(jid(1)) is not None
    assert node(s)["state"] == "online"
    s.node_conflict("web", 9, "two agents", 1)  # a column of version 2, there again
    s.commit()
    s.close()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_a_record_from_a_newer_opsbay_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(ConfigError, match="newer than this opsbay knows"):
        Store(path)
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    con.close()


def test_a_second_writer_of_one_sqlite_record_is_refused(path: Path) -> None:
    """Two coordinators on one --data-dir would fight over the record: the second is refused,
    naming the first; once the first closes, the record can be opened again."""
    first = Store(path)
    try:
        with pytest.raises(
            ConfigError, match=rf"in use by another coordinator \(pid {os.getpid()}"
        ):
            Store(path)
    finally:
        first.close()
    Store(path).close()


def test_both_backends_count_the_same_schema_versions() -> None:
    # A migration added to store.MIGRATIONS needs its PostgreSQL step in pgstore.MIGRATIONS.
    assert pgstore.SCHEMA_VERSION == SCHEMA_VERSION


def test_output_with_nul_and_odd_text_round_trips(store: Record) -> None:
    # PostgreSQL's TEXT cannot hold NUL, and a command's output may (`cat /proc/1/cmdline`).
    store.insert_job(make_job(1))
    ex = Execution(node="web", state="succeeded", stdout="a\x00b\u00e9\U0001f600", stderr="\x00",
                   host={"k": "\x00"})  # fmt: skip
    put(store, jid(1), ex)
    store.commit()
    assert store.execution(jid(1), "web") == ex


# -- PostgreSQL only: several coordinators on one record, its schema, its connection, secrets
@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[PgStore, PgStore]]:
    """Two coordinators' records on one database, and a pool to run one of them in."""
    a, b = PgStore(pg_url), PgStore(pg_url)
    yield a, b
    for s in (a, b):
        s.db.close()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as p:
        yield p


def blocked(pg_url: str, store: PgStore, what: str) -> None:
    """Wait until `store`'s connection waits on a lock another transaction holds."""
    pid = store.db.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as watcher:

        def waiting() -> bool:
            row = watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            return row is not None and row[0] == "Lock"

        wait_until(waiting, 10, what)


def test_a_second_coordinator_waits_for_a_locked_job_until_the_first_commits(
    two: tuple[PgStore, PgStore], pool: ThreadPoolExecutor, pg_url: str
) -> None:
    a, b = two
    a.insert_job(make_job(1))
    a.commit()
    assert a.lock_job(jid(1))
    locked: Future[bool] = pool.submit(b.lock_job, jid(1))
    blocked(pg_url, b, "b's lock_job to wait on a's")
    assert not locked.done()
    put(a, jid(1), Execution(node="web", state="running", started_ms=MS))
    a.commit()
    assert locked.result(timeout=10)
    running = b.execution(jid(1), "web")  # read after the lock: a's change
    assert running is not None and running.state == "running"


@pytest.mark.parametrize("first_commits", [True, False])
def test_two_coordinators_changing_an_execution_from_the_same_state_one_wins(
    two: tuple[PgStore, PgStore], pool: ThreadPoolExecutor, pg_url: str, first_commits: bool
) -> None:
    a, b = two
    a.insert_job(make_job(1))
    a.commit()
    started = Execution(node="web", state="running", started_ms=MS)
    expired = Execution(node="web", state="expired", finished_ms=MS)
    assert a.write_execution(jid(1), started, "pending")
    late: Future[bool] = pool.submit(b.write_execution, jid(1), expired, "pending")
    blocked(pg_url, b, "b's guarded update to wait on a's row")
    if first_commits:
        a.commit()
        assert late.result(timeout=10) is False  # re-read after a's commit: no longer pending
    else:
        a.rollback()
        assert late.result(timeout=10) is True
    b.commit()
    check = PgStore(pg_url)
    assert check.execution(jid(1), "web") == (started if first_commits else expired)
    check.close()


def test_two_coordinators_inserting_one_job_one_inserts_it(
    two: tuple[PgStore, PgStore], pool: ThreadPoolExecutor, pg_url: str
) -> None:
    a, b = two
    assert a.insert_job(make_job(1, nodes=("a", "b")))
    second: Future[bool] = pool.submit(b.insert_job, make_job(1, nodes=("c",)))
    blocked(pg_url, b, "b's insert to wait on a's uncommitted one")
    a.commit()
    assert second.result(timeout=10) is False
    b.commit()
    got = b.get_job(jid(1))
    assert got is not None and [x.node for x in got.executions] == ["a", "b"]


def test_a_deadlock_between_two_batches_is_contention_in_one_of_them(
    two: tuple[PgStore, PgStore], pool: ThreadPoolExecutor, pg_url: str
) -> None:
    a, b = two
    for n in (1, 2):
        a.insert_job(make_job(n))
    a.commit()
    assert a.lock_job(jid(1)) and b.lock_job(jid(2))

    def lock_then_settle(store: PgStore, job: str) -> str:
        try:
            store.lock_job(job)
        except Contention:
            store.rollback()  # what the coordinator does: its locks go, the other goes on
            return "contention"
        return "locked"

    a_side: Future[str] = pool.submit(lock_then_settle, a, jid(2))
    blocked(pg_url, a, "a to wait for job 2, which b holds")
    b_side = lock_then_settle(b, jid(1))  # closes the cycle: PostgreSQL breaks it
    if b_side == "locked":  # a was the one rolled back
        assert a_side.result(timeout=10) == "contention"
    else:
        b.commit()  # nothing held: a's wait ends
        assert a_side.result(timeout=10) == "locked"
    assert sorted([a_side.result(), b_side]) == ["contention", "locked"]
    a.commit()
    b.commit()


def test_a_new_database_gets_the_schema_once_when_coordinators_start_at_once(
    pg_url: str,
) -> None:
    # Hold the migration lock so that both processes are at the same point, then let go.
    holder = psycopg.connect(pg_url, autocommit=True)
    holder.execute("SELECT pg_advisory_lock(%s)", (pgstore.MIGRATION_LOCK,))
    code = "import sys; from opsbay_mqtt.pgstore import PgStore; PgStore(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, pg_url], stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    try:

        def both_wait() -> int:
            row = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            return row is not None and row[0] == 2

        wait_until(both_wait, 30, "both coordinators to wait for the migration lock")
        holder.execute("SELECT pg_advisory_unlock(%s)", (pgstore.MIGRATION_LOCK,))
        outcomes = [(p.communicate(timeout=60)[1], p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        holder.close()
    assert outcomes == [(b"", 0), (b"", 0)]
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM opsbay_schema").fetchall() == [(SCHEMA_VERSION,)]
        tables = db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
            "ORDER BY 1"
        ).fetchall()
    assert [t for (t,) in tables] == [
        "executions",
        "jobs",
        "nodes",
        "nonces",
        "opsbay_schema",
        "schedule_runs",
        "schedules",
    ]


def test_a_database_of_a_newer_schema_is_refused_and_left_alone(own_pg: PgServer) -> None:
    db = own_pg.create_database(owner=own_pg.password_user)
    url = own_pg.url(db, own_pg.password_user, own_pg.password)
    PgStore(url).close()
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("UPDATE opsbay_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="newer than this opsbay knows") as refused:
        PgStore(url)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(refused.value)
    assert f"{own_pg.password_user}:***@" in str(refused.value)
    secret_free(str(refused.value), own_pg.password)
    with psycopg.connect(url) as con:
        assert con.execute("SELECT version FROM opsbay_schema").fetchone() == (SCHEMA_VERSION + 1,)
    own_pg.drop_database(db)


def test_a_database_that_holds_other_tables_named_jobs_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute("CREATE TABLE jobs (id int)")
    with pytest.raises(ConfigError, match="not an opsbay record"):
        PgStore(pg_url)


def test_a_connection_lost_mid_batch_says_so_and_keeps_nothing_of_the_batch(
    pg_url: str,
) -> None:
    s = PgStore(pg_url)
    s.insert_job(make_job(1))
    s.commit()
    s.insert_job(make_job(2))
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (s.db.info.backend_pid,))
    with pytest.raises(StoreUnavailable, match="connection to PostgreSQL was lost"):
        s.set_job_state(jid(1), "failed")
    with pytest.raises(StoreUnavailable, match="nothing of this batch was committed"):
        s.commit()
    s.close()  # and closing it raises nothing more
    again = PgStore(pg_url)
    assert [j.job_id for j in again.list_jobs()] == [jid(1)]
    assert again.get_job(jid(1)).state == "pending"  # type: ignore[union-attr]
    again.close()


def secret_free(text: str, password: str) -> None:
    from urllib.parse import quote

    for form in (password, quote(password, safe="")):
        assert form not in text


def test_the_password_is_never_shown(own_pg: PgServer, caplog: pytest.LogCaptureFixture) -> None:
    db = own_pg.create_database(owner=own_pg.password_user)
    caplog.set_level(logging.DEBUG)
    url = own_pg.url(db, own_pg.password_user, own_pg.password)
    PgStore(url).close()  # logs where the record is
    assert f"{own_pg.password_user}:***@" in caplog.text
    wrong = own_pg.url(db, own_pg.password_user, own_pg.password + "x")
    unreachable = url.replace(f":{own_pg.port}/", ":1/")
    errors: list[str] = []
    unencoded = f"postgresql://{own_pg.password_user}:{own_pg.password}@{own_pg.host}/x"
    for bad in (wrong, unreachable, url + "?sslmode=nonsense", unencoded):
        with pytest.raises((StoreUnavailable, ConfigError)) as e:
            PgStore(bad)
        errors.append(str(e.value))
        assert e.value.__cause__ is None  # no untouched psycopg error chained to it
    assert "password authentication failed" in errors[0]
    assert all(f"{own_pg.password_user}:***@" in text for text in errors), errors
    for text in [*errors, caplog.text]:
        secret_free(text, own_pg.password)
    own_pg.drop_database(db)


def test_a_url_without_password_uses_pgpassword_or_a_password_file(
    own_pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = own_pg.create_database(owner=own_pg.password_user)
    url = own_pg.url(db, own_pg.password_user)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(StoreUnavailable, match="password"):
        PgStore(url)  # none given anywhere: refused by the server
    monkeypatch.setenv("PGPASSWORD", own_pg.password)
    PgStore(url).close()
    monkeypatch.delenv("PGPASSWORD")
    passfile = tmp_path / "pgpass"
    who = f"{own_pg.host}:{own_pg.port}:{db}:{own_pg.password_user}"
    escaped = own_pg.password.replace("\\", "\\\\").replace(":", "\\:")  # .pgpass's quoting
    passfile.write_text(f"{who}:{escaped}\n")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    PgStore(url).close()
    own_pg.drop_database(db)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgres://u:p%40ss@h:5/db?sslmode=require", "postgres://u:***@h:5/db?sslmode=require"),
        ("postgresql://u@h/db?password=pw&sslmode=require",
         "postgresql://u@h/db?password=***&sslmode=require"),
        ("postgresql://u:p@ss/w?rd@h/db", "postgresql://u:***@h/db"),  # not percent-encoded
        ("postgresql:///db", "postgresql:///db"),
        ("postgresql://h", "postgresql://h"),
    ],
)  # fmt: skip
def test_shown_hides_the_password(url: str, expected: str) -> None:
    assert pgstore.shown(url) == expected


def test_a_job_on_ten_thousand_nodes_is_inserted_whole(pg_url: str) -> None:
    s = PgStore(pg_url)
    nodes = tuple(f"n{i:05d}" for i in range(10_000))
    assert s.insert_job(make_job(1, nodes=nodes))  # the job, then its executions in one go
    s.commit()
    assert s.state_counts(jid(1)) == {"pending": 10_000}
    got = s.get_job(jid(1))
    assert got is not None and [x.node for x in got.executions] == list(nodes)
    s.close()


def test_many_executions_are_written_in_one_call_each_guarded(store: Record) -> None:
    store.insert_job(make_job(1, nodes=("a", "b")))
    fresh = [(None, Execution(node=f"n{i}", state="pending")) for i in range(500)]
    running = Execution(node="a", state="running", started_ms=MS)
    late = Execution(node="b", state="expired", finished_ms=MS)
    changes = [*fresh, ("pending", running), ("running", late)]  # b is pending: not written
    assert store.write_executions(jid(1), changes) == {f"n{i}" for i in range(500)} | {"a"}
    assert store.execution(jid(1), "a") == running
    got = store.execution(jid(1), "b")
    assert got is not None and got.state == "pending"
    assert store.state_counts(jid(1)) == {"pending": 501, "running": 1}
