"""ledger: a job id starts once, its result is kept, interrupted runs are found, old rows pruned."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsbay_mqtt.ledger import Ledger

MS = 1_700_000_000_000


def jid(n: int) -> str:
    return str(uuid.UUID(int=n))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(path: Path) -> Iterator[Ledger]:
    led = Ledger(path)
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
    led = Ledger(path)
    for n in (1, 2, 3):
        led.start(jid(n), MS + n)
    led.set_pid(jid(3), 77, 12.5)
    led.finish(jid(1), "succeeded", b"ok", MS + 10)
    led.close()
    led = Ledger(path)
    try:
        assert sorted(led.interrupted()) == [(jid(2), None, None), (jid(3), 77, 12.5)]
        assert led.start(jid(2), MS + 20) is False
        assert led.get(jid(1)) == ("succeeded", b"ok")
    finally:
        led.close()


def test_interrupted_without_a_clean_close(path: Path) -> None:
    """A worker that dies never calls close(): what it started is still found."""
    led = Ledger(path)
    led.start(jid(1), MS)
    other = Ledger(path)
    try:
        assert running(other) == [jid(1)]
    finally:
        other.close()
        led.close()


def test_pruning_keeps_the_newest_finished_rows(path: Path) -> None:
    led = Ledger(path, max_entries=10)
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


def test_a_ledger_from_the_previous_version_still_opens(path: Path) -> None:
    """A worker upgraded in place keeps its state directory: the old table has no pid columns."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE ledger (job_id TEXT PRIMARY KEY, state TEXT NOT NULL, "
            "result BLOB, updated_ms INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO ledger VALUES (?, 'running', NULL, ?)", (jid(1), MS))
    db.close()
    led = Ledger(path)
    try:
        assert led.interrupted() == [(jid(1), None, None)]
        assert led.start(jid(2), MS) is True
        led.set_pid(jid(2), 4242, 1.5)
        assert sorted(led.interrupted()) == [(jid(1), None, None), (jid(2), 4242, 1.5)]
    finally:
        led.close()
