"""The worker stepped in process: its decisions as pure functions (tables), and the worker
carrying them out with an in-memory connection and a real ledger and runner, no broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from opsbay_mqtt.errors import Refused
from opsbay_mqtt.ledger import Ledger
from opsbay_mqtt.policy import WorkerPolicy
from opsbay_mqtt.protocol import Cancel, Dispatch, encode
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.worker import (
    Worker,
    WorkerConfig,
    before_start,
    on_cancel,
    on_dispatch,
)
from tests.helpers import wait_until
from tests.memconn import MemoryConnection

KEYS = Keyring.shared("worker-unit-test")
TOPICS = Topics("t")
STORED = ("succeeded", b"{stored result}")

# -- the decisions


@pytest.mark.parametrize(
    ("queued", "seen", "action"),
    [
        (True, None, "ignore"),  # a duplicate while queued or running
        (True, STORED, "ignore"),
        (False, STORED, "resend"),  # ran before (or was cancelled): its result again, no run
        (False, ("running", None), "resend"),  # interrupted: reported lost at start, not rerun
        (False, None, "queue"),
    ],
)
def test_what_a_dispatch_leads_to(queued: bool, seen: Any, action: str) -> None:
    assert on_dispatch(queued, seen) == action


@pytest.mark.parametrize(
    ("queued", "seen", "action"),
    [
        (True, None, "stop"),
        (False, STORED, "resend"),
        (False, None, "claim"),  # not here yet: claimed as cancelled, so it never starts
    ],
)
def test_what_a_cancel_leads_to(queued: bool, seen: Any, action: str) -> None:
    assert on_cancel(queued, seen) == action


REFUSED = Refused("command_not_allowed", "no")


@pytest.mark.parametrize(
    ("cancelled", "now", "refusal", "ends"),
    [
        (None, 100, None, None),  # run it
        ("by ci", 100, None, ("cancelled", "cancelled before it started")),
        (None, 101, None, ("expired", "not started by its start-by deadline")),
        (None, 100, REFUSED, ("rejected", "command_not_allowed: no")),
        ("by ci", 101, REFUSED, ("cancelled", "cancelled before it started")),  # cancel first
        (None, 101, REFUSED, ("expired", "not started by its start-by deadline")),
    ],
)
def test_what_ends_a_queued_job_before_it_runs(
    cancelled: str | None, now: int, refusal: Refused | None, ends: tuple[str, str] | None
) -> None:
    assert before_start(cancelled=cancelled, now_ms=now, start_by_ms=100, refusal=refusal) == ends


# -- the worker carrying them out


class Node:
    """Worker n1 on an in-memory connection, with its ledger in a temporary folder."""

    def __init__(self, tmp: Path, **policy: Any) -> None:
        self.tmp, self.policy = tmp, policy
        self.conn = MemoryConnection()
        self.ledger = Ledger(tmp / "ledger.db", node="n1")
        self.worker = self._worker()

    def _worker(self) -> Worker:
        cfg = WorkerConfig(node="n1", topics=TOPICS, keyring=KEYS,
                           policy=WorkerPolicy(**self.policy))  # fmt: skip
        w = Worker(cfg, self.ledger)
        w.conn = self.conn  # type: ignore[assignment]
        return w

    def restart(self) -> None:
        """A new worker process on the same ledger (the old one died)."""
        self.worker._pool.shutdown(wait=True)
        self.worker = self._worker()

    def send(self, *msgs: Dispatch | Cancel) -> None:
        """Deliver messages in one burst, then let every job queued end."""
        batch = [self.conn.message(TOPICS.node_jobs("n1"), encode(m, KEYS, int(time.time())))
                 for m in msgs]  # fmt: skip
        self.worker.handle_batch(batch)
        wait_until(lambda: not self.worker.busy(), 30, "the worker's jobs to end")

    def results(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(p.payload) for p in self.conn.sent(f"/results/n1/{job_id}")]

    def close(self) -> None:
        self.worker._pool.shutdown(wait=True)
        self.ledger.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    yield n
    n.close()


def dispatch(command: str, start_by_s: float = 60, job_id: str | None = None) -> Dispatch:
    return Dispatch(job_id=job_id or str(uuid.uuid4()), node="n1", command=command, timeout_s=10,
                    start_by_ms=int((time.time() + start_by_s) * 1000))  # fmt: skip


def runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_duplicate_in_the_same_burst_runs_once_and_both_are_acknowledged(
    node: Node, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}")
    node.send(d, d)
    assert runs(marker) == 1
    assert [r["state"] for r in node.results(d.job_id)] == ["running", "succeeded"]
    assert len(node.conn.acked) == 2


def test_a_redelivered_dispatch_gets_the_stored_result_and_runs_nothing(
    node: Node, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}")
    node.send(d)
    node.restart()
    node.send(d)
    assert runs(marker) == 1
    _running, final, again = node.conn.sent(f"/results/n1/{d.job_id}")
    assert again.payload == final.payload  # the same signed bytes, sent again


def test_a_cancel_before_the_dispatch_means_the_job_never_runs(node: Node, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}")
    node.send(Cancel(job_id=d.job_id, node="n1"))
    node.send(d)
    assert runs(marker) == 0
    states = [r["state"] for r in node.results(d.job_id)]
    assert states == ["cancelled", "cancelled"]  # then the stored result, for the dispatch
    assert node.results(d.job_id)[0]["reason"] == "cancelled before it arrived"


def test_a_worker_that_dies_right_after_claiming_a_cancel_never_reports_it_lost(
    node: Node,
) -> None:
    job_id = str(uuid.uuid4())
    node.send(Cancel(job_id=job_id, node="n1"))
    node.restart()  # died right after: the claim is the whole record of it
    node.worker.report_interrupted()
    assert [r["state"] for r in node.results(job_id)] == ["cancelled"]


def test_a_cancel_in_the_same_burst_as_its_dispatch_wins(node: Node, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}")
    node.send(d, Cancel(job_id=d.job_id, node="n1"))  # cancels are applied first
    assert runs(marker) == 0
    claimed, for_the_dispatch = node.conn.sent(f"/results/n1/{d.job_id}")
    assert json.loads(claimed.payload)["state"] == "cancelled"
    assert for_the_dispatch.payload == claimed.payload  # the stored result, sent again


def test_past_its_start_by_a_dispatch_expires_unrun(node: Node, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}", start_by_s=-1)
    node.send(d)
    assert runs(marker) == 0
    assert [r["state"] for r in node.results(d.job_id)] == ["expired"]


def test_a_command_the_nodes_policy_refuses_is_rejected_unrun(tmp_path: Path) -> None:
    n = Node(tmp_path, allow=("uptime",))
    try:
        marker = tmp_path / "ran"
        d = dispatch(f"echo x >> {marker}")
        n.send(d)
        assert runs(marker) == 0
        (result,) = n.results(d.job_id)
        assert result["state"] == "rejected" and result["reason"].startswith("command_not_allowed")
    finally:
        n.close()


def test_a_job_running_when_its_worker_died_is_reported_lost_and_never_rerun(
    node: Node, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    d = dispatch(f"echo x >> {marker}")
    node.ledger.start(d.job_id, int(time.time() * 1000))  # the previous process had started it
    node.worker.report_interrupted()
    (lost,) = node.results(d.job_id)
    assert lost["state"] == "lost" and "not re-run" in lost["reason"]
    node.send(d)  # its dispatch, delivered again
    assert runs(marker) == 0
    assert [r["state"] for r in node.results(d.job_id)] == ["lost", "lost"]
