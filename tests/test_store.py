"""store: jobs and executions, listing with filters, node status ordering, nonces, atomic()."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.protocol import Execution, Job, replace
from opsbay_mqtt.record import Record
from opsbay_mqtt.store import SCHEMA_VERSION, Store

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
# (record.Record) only; the SQLite-only ones (files, schema versions) open a `Store` themselves.
BACKENDS: dict[str, Callable[[Path], Record]] = {"sqlite": Store}


@pytest.fixture(params=sorted(BACKENDS))
def store(path: Path, request: pytest.FixtureRequest) -> Iterator[Record]:
    s = BACKENDS[request.param](path)
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
