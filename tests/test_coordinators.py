"""Several coordinators on one record, each given every message (a broker without shared
subscriptions, such as NATS's MQTT gateway): every effect happens once, and whichever
coordinator makes a change is the one that publishes its consequences; the others stay quiet
or answer as a retry is answered, never with a refusal."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig, step
from opsbay_mqtt.inbound import Inbound
from opsbay_mqtt.protocol import Cancel, Result, Submit, encode
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import Topics
from tests.harness import Clock

KEYS = Keyring.shared("coordinators-test-secret")
T0 = 1_800_000_000.0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Coordinator, Coordinator]]:
    """Two coordinators on one record (one SQLite connection: their turns are serialized, as
    the row lock serializes them on PostgreSQL), on one clock."""
    cfg = CoordinatorConfig(topics=Topics("t"), keyring=KEYS, lost_grace_s=5)
    store, clock = Store(tmp_path / "db.sqlite"), Clock(T0)
    yield Coordinator(cfg, store, clock=clock), Coordinator(cfg, store, clock=clock)
    store.close()


def turn(c: Coordinator, *msgs: Inbound, tick: bool = False) -> list[tuple[str, dict[str, object]]]:
    """One turn of `c`'s loop: what it publishes, as (topic, body)."""
    return [(o.topic, json.loads(o.payload)) for o in step(c, list(msgs), tick)]


def submission(job_id: str, target: str = "n1", **fields: object) -> Inbound:
    msg = Submit(
        job_id=job_id, target=target, command="true", timeout_s=10,
        start_by_ms=int((T0 + 60) * 1000), **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    return Inbound("t/submit", encode(msg, KEYS, int(T0)))


def result(job_id: str, state: str, node: str = "n1") -> Inbound:
    res = Result(job_id=job_id, node=node, state=state, exit_code=0)  # type: ignore[arg-type]
    return Inbound(f"t/results/{node}/{job_id}", encode(res, KEYS, int(T0)))


def kinds(out: list[tuple[str, dict[str, object]]]) -> list[str]:
    return sorted(str(body["type"]) for _, body in out)


def test_a_submission_both_receive_is_accepted_once_and_never_refused(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    msg = submission(job_id)
    first = turn(a, msg)
    assert kinds(first) == ["dispatch", "job"]
    second = turn(b, msg)
    # The same bytes: a replay to b, but the job exists: b answers with the job's state, and
    # sends the dispatch again in case a died before sending it (the worker's ledger makes a
    # copy harmless).
    assert kinds(second) == ["dispatch", "job"], second
    assert all(body["type"] != "rejected" for _, body in second)
    job = a.store.get_job(job_id)
    assert job is not None and [x.state for x in job.executions] == ["pending"]


def test_a_result_both_receive_changes_the_record_once_and_is_announced_once(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    turn(a, submission(job_id))
    done = result(job_id, "succeeded")
    assert kinds(turn(a, done)) == ["job"]
    assert turn(b, done) == []  # nothing changed by b: nothing to say
    job = a.store.get_job(job_id)
    assert job is not None and job.state == "succeeded"


def test_a_rollout_releases_each_batch_once_whoever_handles_the_results(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    out = turn(a, submission(job_id, target="n1,n2,n3", batch="1"))
    assert [body["node"] for _, body in out if body["type"] == "dispatch"] == ["n1"]
    done = result(job_id, "succeeded", "n1")
    released_by_a = [body["node"] for _, body in turn(a, done) if body["type"] == "dispatch"]
    again_by_b = [body["node"] for _, body in turn(b, done) if body["type"] == "dispatch"]
    # b releases nothing new: it sends again what a released (in case a died before sending).
    assert released_by_a == ["n2"] and again_by_b == ["n2"]
    # The next result goes to b first this time: b releases n3, a then only sends it again.
    done2 = result(job_id, "succeeded", "n2")
    assert [body["node"] for _, body in turn(b, done2) if body["type"] == "dispatch"] == ["n3"]
    assert [body["node"] for _, body in turn(a, done2) if body["type"] == "dispatch"] == ["n3"]
    job = a.store.get_job(job_id)
    assert job is not None and sum(x.dispatched_ms is not None for x in job.executions) == 3


def test_a_cancel_both_receive_cancels_once_and_neither_refuses_it(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    turn(a, submission(job_id, target="n1,n2", batch="1"))  # n2 held back, never sent
    cancel = Inbound("t/submit", encode(Cancel(job_id=job_id), KEYS, int(T0)))
    first = turn(a, cancel)
    assert "job" in kinds(first)
    second = turn(b, cancel)
    assert all(body["type"] != "rejected" for _, body in second), second
    job = a.store.get_job(job_id)
    assert job is not None
    assert {x.node: x.state for x in job.executions}["n2"] == "cancelled"


def test_a_deadline_both_see_is_applied_once(pair: tuple[Coordinator, Coordinator]) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    turn(a, submission(job_id))
    assert isinstance(a.clock, Clock)
    a.clock.now = T0 + 60 + 6  # past start-by + grace: expired
    expired = turn(a, tick=True)
    assert kinds(expired) == ["job"]
    assert turn(b, tick=True) == []
    job = a.store.get_job(job_id)
    assert job is not None and job.state == "expired"


def crashed(c: Coordinator, *msgs: Inbound) -> None:
    """`c` handles and commits, then dies before it publishes anything."""
    step(c, list(msgs), False)


def test_a_dispatch_committed_by_a_coordinator_that_died_is_sent_by_another(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    msg = submission(job_id)
    crashed(a, msg)  # accepted and recorded; the dispatch never left
    out = turn(b, msg)
    assert [(t, body["type"]) for t, body in out if body["type"] == "dispatch"] == [
        ("t/nodes/n1/jobs", "dispatch")
    ]


def test_a_cancel_committed_by_a_coordinator_that_died_reaches_the_node_through_another(
    pair: tuple[Coordinator, Coordinator],
) -> None:
    a, b = pair
    job_id = str(uuid.uuid4())
    turn(a, submission(job_id))
    turn(a, result(job_id, "running"))
    cancel = Inbound("t/submit", encode(Cancel(job_id=job_id), KEYS, int(T0)))
    crashed(a, cancel)  # the cancel to n1 never left
    out = turn(b, cancel)
    assert [(t, body["type"]) for t, body in out if t == "t/nodes/n1/jobs"] == [
        ("t/nodes/n1/jobs", "cancel")
    ]
