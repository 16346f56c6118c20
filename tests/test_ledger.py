"""ledger: a job id starts once per node, its result is kept, interrupted runs are found, old rows
pruned; nodes sharing a file never see each other's entries; older files are migrated."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.ledger import SCHEMA_VERSION, Ledger
from opsbay_mqtt.protocol import Result, encode
from opsbay_mqtt.signing import Keyring

MS = 1_700_000_000_000


def jid(n: int) -> str:
    return str(uuid.UUID(int=n))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path: Path) -> Iterator[Ledger]:
    led = Ledger(path, node="n1")
    yield led
    led.close()


def running(led: Ledger) -> list[str]:
    return sorted(job_id for job_id, _, _ in led.interrupted())


def rows(path: Path) -> list[tuple[str, str]]:
    """What is on disk, read with a separate connection."""
    with sqlite3.connect(path) as db:
        out = db.execute("SELECT job_id, state FROM ledger ORDER BY updated_ms").fetchall()
    db.close()
    return [(str(a), str(b)) for a, b in out]


def test_start_once(ledger: Ledger) -> None:
    assert ledger.start(jid(1), MS) is True
    assert ledger.start(jid(1), MS + 1) is False
    assert ledger.start(jid(2), MS) is True
    assert ledger.get(jid(1)) == ("running", None)


def test_start_is_refused_after_finish_too(ledger: Ledger) -> None:
    ledger.start(jid(1), MS)
    ledger.finish(jid(1), "succeeded", b"result", MS + 1)
    assert ledger.start(jid(1), MS + 2) is False
    assert ledger.get(jid(1)) == ("succeeded", b"result")


def test_finish_and_get(ledger: Ledger) -> None:
    assert ledger.get(jid(1)) is None
    ledger.start(jid(1), MS)
    ledger.finish(jid(1), "failed", b'{"exit_code":3}', MS + 5)
    assert ledger.get(jid(1)) == ("failed", b'{"exit_code":3}')
    # finish without start (a result recorded for a job never started here)
    ledger.finish(jid(2), "lost", b"", MS + 6)
    assert ledger.get(jid(2)) == ("lost", b"")


def test_start_is_on_disk_at_once(ledger: Ledger, path: Path) -> None:
    ledger.start(jid(1), MS)
    assert rows(path) == [(jid(1), "running")]


def test_interrupted(ledger: Ledger) -> None:
    assert ledger.interrupted() == []
    for n in (1, 2, 3):
        ledger.start(jid(n), MS + n)
    ledger.finish(jid(2), "succeeded", b"", MS + 10)
    assert sorted(ledger.interrupted()) == [(jid(1), None, None), (jid(3), None, None)]


def test_interrupted_with_pids(ledger: Ledger) -> None:
    ledger.start(jid(1), MS)
    ledger.start(jid(2), MS)
    ledger.set_pid(jid(1), 4242, 1_700_000_000.25)
    ledger.set_pid(jid(9), 1, 1.0)  # not started: nothing to update
    assert sorted(ledger.interrupted()) == [(jid(1), 4242, 1_700_000_000.25), (jid(2), None, None)]
    ledger.finish(jid(1), "succeeded", b"", MS + 1)
    assert ledger.interrupted() == [(jid(2), None, None)]
    assert ledger.get(jid(9)) is None


def test_interrupted_after_reopening(path: Path) -> None:
    led = Ledger(path, node="n1")
    for n in (1, 2, 3):
        led.start(jid(n), MS + n)
    led.set_pid(jid(3), 77, 12.5)
    led.finish(jid(1), "succeeded", b"ok", MS + 10)
    led.close()
    led = Ledger(path, node="n1")
    try:
        assert sorted(led.interrupted()) == [(jid(2), None, None), (jid(3), 77, 12.5)]
        assert led.start(jid(2), MS + 20) is False
        assert led.get(jid(1)) == ("succeeded", b"ok")
    finally:
        led.close()


def test_interrupted_without_a_clean_close(path: Path) -> None:
    """A worker that dies never calls close(): what it started is still found."""
    led = Ledger(path, node="n1")
    led.start(jid(1), MS)
    other = Ledger(path, node="n1")
    try:
        assert running(other) == [jid(1)]
    finally:
        other.close()
        led.close()


def test_pruning_keeps_the_newest_finished_rows(path: Path) -> None:
    led = Ledger(path, node="n1", max_entries=10)
    try:
        led.start(jid(0), MS)  # running: never pruned
        for n in range(1, 100):
            led.start(jid(n), MS + n)
            led.finish(jid(n), "succeeded", b"r", MS + n)
        assert len(rows(path)) == 100  # pruning is batched: every 100 finishes
        led.start(jid(100), MS + 100)
        led.finish(jid(100), "failed", b"r", MS + 100)
        finished = [j for j, s in rows(path) if s != "running"]
        assert finished == [jid(n) for n in range(91, 101)]
        assert running(led) == [jid(0)]
        for n in range(101, 251):
            led.finish(jid(n), "succeeded", b"r", MS + n)
        finished = [j for j, s in rows(path) if s != "running"]
        assert len(finished) <= 10 + 99
        assert finished == [jid(n) for n in range(191, 251)]
        assert led.get(jid(250)) == ("succeeded", b"r")
        assert led.get(jid(1)) is None
        assert running(led) == [jid(0)]
    finally:
        led.close()


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
    db.close()
    return version


def test_two_nodes_in_one_file_never_see_each_others_entries(path: Path) -> None:
    a, b = Ledger(path, node="a"), Ledger(path, node="b")
    try:
        assert a.start(jid(1), MS) is True
        assert b.get(jid(1)) is None
        assert b.start(jid(1), MS) is True  # the same job for another node: its own run
        a.set_pid(jid(1), 4242, 1.5)
        a.finish(jid(1), "succeeded", b"a's result", MS + 1)
        assert b.get(jid(1)) == ("running", None)
        assert b.interrupted() == [(jid(1), None, None)]
        assert a.interrupted() == []
        b.finish(jid(1), "failed", b"b's result", MS + 2)
        assert (a.get(jid(1)), b.get(jid(1))) == (
            ("succeeded", b"a's result"),
            ("failed", b"b's result"),
        )
        b.start(jid(2), MS)
        assert (running(a), running(b)) == ([], [jid(2)])
    finally:
        a.close()
        b.close()


def test_pruning_one_node_keeps_the_other_nodes_entries(path: Path) -> None:
    a, b = Ledger(path, node="a", max_entries=10), Ledger(path, node="b", max_entries=10)
    try:
        b.finish(jid(0), "succeeded", b"b", MS)  # b's oldest entry, older than all of a's
        for n in range(1, 101):
            a.finish(jid(n), "succeeded", b"a", MS + n)
        assert a.get(jid(1)) is None and a.get(jid(100)) == ("succeeded", b"a")
        assert b.get(jid(0)) == ("succeeded", b"b")
    finally:
        a.close()
        b.close()


def tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        names = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    db.close()
    return sorted(str(n) for (n,) in names)


# The table as 0.1.0 made it, with the pid columns it gained later, and user_version 0.
V1_SCHEMA = (
    "CREATE TABLE ledger (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, result BLOB, "
    "updated_ms INTEGER NOT NULL, pid INTEGER, pid_started REAL)",
    "CREATE INDEX ledger_by_time ON ledger (updated_ms)",
)


def make_v1(path: Path, *entries: tuple[str, str, bytes | None, int | None]) -> None:
    with sqlite3.connect(path) as db:
        for statement in V1_SCHEMA:
            db.execute(statement)
        for job_id, state, result, pid in entries:
            db.execute(
                "INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, state, result, MS, pid, 1.5 if pid else None),
            )
    db.close()


def test_a_version_1_ledger_is_keyed_by_the_node_each_result_names(path: Path) -> None:
    """Two workers that shared one file (the bug this fixes): each entry goes to its node."""
    keyring = Keyring.shared("s")
    ran_on_a = encode(Result(job_id=jid(1), node="a", state="succeeded"), keyring, MS // 1000)
    ran_on_c = encode(Result(job_id=jid(2), node="c", state="failed"), keyring, MS // 1000)
    make_v1(
        path,
        (jid(1), "succeeded", ran_on_a, None),
        (jid(2), "failed", ran_on_c, None),
        (jid(3), "running", None, 4242),  # no result: the node opening the file takes it
        (jid(4), "lost", b"", None),
        (jid(5), "succeeded", b"not json", None),
        (jid(6), "succeeded", b'{"node": "../etc"}', None),
    )
    b = Ledger(path, node="b")
    a, c = Ledger(path, node="a"), Ledger(path, node="c")
    try:
        assert user_version(path) == SCHEMA_VERSION == 2
        assert tables(path) == ["ledger"]
        assert a.get(jid(1)) == ("succeeded", ran_on_a)
        assert c.get(jid(2)) == ("failed", ran_on_c)
        assert b.interrupted() == [(jid(3), 4242, 1.5)]
        assert [b.get(jid(n)) for n in (4, 5, 6)] == [
            ("lost", b""),
            ("succeeded", b"not json"),
            ("succeeded", b'{"node": "../etc"}'),
        ]
        assert [n for n in range(1, 7) if a.get(jid(n))] == [1]
        assert [n for n in range(1, 7) if c.get(jid(n))] == [2]
        assert [n for n in range(1, 7) if b.get(jid(n))] == [3, 4, 5, 6]
        assert a.start(jid(1), MS) is False and b.start(jid(1), MS) is True
    finally:
        for led in (a, b, c):
            led.close()


def test_a_new_ledger_is_made_at_the_current_version(path: Path) -> None:
    Ledger(path, node="n1").close()
    assert user_version(path) == SCHEMA_VERSION


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_a_ledger_newer_than_this_code_is_refused(path: Path, version: int) -> None:
    Ledger(path, node="n1").close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {version}")
    db.close()
    with pytest.raises(ConfigError) as e:
        Ledger(path, node="n1")
    assert str(path) in str(e.value) and f"schema version {version}" in str(e.value)
    assert user_version(path) == version  # left as it was


def test_a_ledger_from_the_previous_version_still_opens(path: Path) -> None:
    """A worker upgraded in place keeps its state directory: the old table has no pid columns."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE ledger (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, "
            "result BLOB, updated_ms INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO ledger VALUES (?, 'running', NULL, ?)", (jid(1), MS))
    db.close()
    led = Ledger(path, node="n1")
    try:
        assert led.interrupted() == [(jid(1), None, None)]
        assert led.start(jid(2), MS) is True
        led.set_pid(jid(2), 4242, 1.5)
        assert sorted(led.interrupted()) == [(jid(1), None, None), (jid(2), 4242, 1.5)]
    finally:
        led.close()
    assert user_version(path) == SCHEMA_VERSION
