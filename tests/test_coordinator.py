"""The coordinator stepped by hand: messages in, store and outbox out, time passed in."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import pytest

from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig, granted_labels
from opsbay_mqtt.inbound import CONNECTED, Inbound
from opsbay_mqtt.protocol import Cancel, NodeStatus, Result, Submit, encode
from opsbay_mqtt.signing import Auth, Identity, Keyring
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import Topics
from tests.harness import Clock

KEYS = Keyring.shared("unit-test-secret")
T0 = 1_800_000_000.0


@pytest.fixture
def coord(tmp_path: Path) -> Coordinator:
    cfg = CoordinatorConfig(
        topics=Topics("t"), keyring=KEYS, lost_grace_s=5, keep_days=1, keep_jobs=3,
        max_open_per_node=2,
    )  # fmt: skip
    return Coordinator(cfg, Store(tmp_path / "db.sqlite"), clock=Clock(T0))


def clock(c: Coordinator) -> Clock:
    assert isinstance(c.clock, Clock)
    return c.clock


def submit(c: Coordinator, node: str = "n1", start_by_s: int = 60, timeout_s: int = 10) -> str:
    job_id = str(uuid.uuid4())
    now = clock(c).now
    msg = Submit(
        job_id=job_id, target=node, command="true", timeout_s=timeout_s,
        start_by_ms=int((now + start_by_s) * 1000),
    )  # fmt: skip
    c.handle(Inbound("t/submit", encode(msg, KEYS, int(now))))
    return job_id


def report(c: Coordinator, job_id: str, state: str, node: str = "n1", **fields: object) -> None:
    res = Result(job_id=job_id, node=node, state=state, **fields)  # type: ignore[arg-type]
    c.handle(Inbound(f"t/results/{node}/{job_id}", encode(res, KEYS, int(clock(c).now))))


def sent(c: Coordinator, topic_part: str) -> list[dict[str, object]]:
    return [json.loads(o.payload) for o in c.outbox if topic_part in o.topic]


def state(c: Coordinator, job_id: str) -> str:
    job = c.store.get_job(job_id)
    assert job is not None
    return job.state


def test_accepted_submission_is_stored_announced_and_dispatched(coord: Coordinator) -> None:
    job_id = submit(coord)
    assert state(coord, job_id) == "pending"
    (event,) = sent(coord, f"/jobs/{job_id}")
    assert event["job"]["state"] == "pending"  # type: ignore[index]
    (dispatch,) = sent(coord, "/nodes/n1/jobs")
    assert dispatch["job_id"] == job_id and dispatch["command"] == "true"
    assert [o.expiry_s for o in coord.outbox if "/nodes/" in o.topic] == [61]


def test_results_move_the_execution_and_terminal_is_final(coord: Coordinator) -> None:
    job_id = submit(coord)
    report(coord, job_id, "running", started_ms=int(T0 * 1000))
    assert state(coord, job_id) == "running"
    report(coord, job_id, "failed", exit_code=3, started_ms=int(T0 * 1000))
    assert state(coord, job_id) == "failed"
    report(coord, job_id, "succeeded", exit_code=0)  # late or forged: ignored
    job = coord.store.get_job(job_id)
    assert job is not None and job.executions[0].exit_code == 3


def test_result_from_another_node_is_ignored(coord: Coordinator) -> None:
    job_id = submit(coord, node="web-01")
    report(coord, job_id, "succeeded", node="web")
    assert state(coord, job_id) == "pending"


def test_pending_past_start_by_expires_and_running_past_deadline_is_lost(
    coord: Coordinator,
) -> None:
    waiting = submit(coord, start_by_s=10)
    running = submit(coord, timeout_s=10)
    report(coord, running, "running", started_ms=int(T0 * 1000))
    clock(coord).now += 14
    coord.tick()
    assert (state(coord, waiting), state(coord, running)) == ("pending", "running")
    clock(coord).now += 2  # start-by + grace = 15 s; start + timeout + grace = 15 s
    coord.tick()
    assert (state(coord, waiting), state(coord, running)) == ("expired", "lost")


def test_queue_limit_per_node(coord: Coordinator) -> None:
    submit(coord)
    submit(coord)
    third = submit(coord)
    # Refused but not stored: the same job id can be submitted again once there is room.
    assert coord.store.get_job(third) is None
    (refusal,) = sent(coord, f"/jobs/{third}")
    assert (refusal["type"], refusal["code"]) == ("rejected", "queue_full")
    assert state(coord, submit(coord, node="n2")) == "pending"


def test_retention_by_count_and_age_keeps_open_jobs(coord: Coordinator) -> None:
    old_open = submit(coord, start_by_s=10 * 86400)
    finished = []
    for _ in range(5):
        job_id = submit(coord, node="n2")
        report(coord, job_id, "succeeded", node="n2", exit_code=0)
        finished.append(job_id)
        clock(coord).now += 1
    coord.prune()
    kept = {j.job_id for j in coord.store.list_jobs(limit=100)}
    assert kept == {old_open, *finished[-3:]}
    clock(coord).now += 2 * 86400
    coord.prune()
    assert {j.job_id for j in coord.store.list_jobs(limit=100)} == {old_open}


def test_a_crash_inside_a_message_keeps_nothing_of_it(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(coord, "_send_dispatch", boom)
    job_id = submit(coord)
    assert coord.store.get_job(job_id) is None
    assert coord.outbox == []


def test_a_job_too_big_for_one_message_is_cut_to_fit() -> None:
    from opsbay_mqtt import queries
    from opsbay_mqtt.protocol import Execution, Job, replace, wire

    noisy = "\x01" * 200_000  # JSON spells each of these in six characters
    job = Job(
        job_id=str(uuid.uuid4()), state="succeeded", target="n*", command="x", timeout_s=1,
        start_by_ms=1, submitted_ms=1, submitted_by="shared",
        executions=[
            Execution(node=f"n{i}", state="succeeded", stdout=noisy + f"end {i}\n", stderr="e")
            for i in range(20)
        ],
    )  # fmt: skip

    def size(j: Job) -> int:
        return len(json.dumps(wire(j)))

    assert size(job) > 20_000_000
    cut = queries.fit(job)
    assert size(cut) <= queries.JOB_BUDGET_BYTES
    assert all(
        x.truncated and x.stdout.endswith(f"end {i}\n") for i, x in enumerate(cut.executions)
    )
    small = replace(job, executions=[replace(job.executions[0], stdout="hi")])
    assert queries.fit(small) == small


def test_a_start_by_already_past_is_expired_on_arrival_and_never_sent(coord: Coordinator) -> None:
    job_id = submit(coord, start_by_s=-5)
    assert state(coord, job_id) == "expired"
    assert sent(coord, "/nodes/") == []


def status(c: Coordinator, node: str, state: str, session: int, seq: int, **extra: object) -> None:
    msg = NodeStatus(
        node=node,
        state=state,
        session=session,
        seq=seq,  # type: ignore[arg-type]
        published_ms=int(clock(c).now * 1000),
        **extra,
    )  # type: ignore[arg-type]
    c.handle(Inbound(f"t/nodes/{node}/status", encode(msg, KEYS, int(clock(c).now))))


def test_a_node_coming_online_gets_its_unfinished_dispatches_again(coord: Coordinator) -> None:
    pending = submit(coord)  # to a node never seen: the broker kept nothing for it
    running = submit(coord)
    report(coord, running, "running", started_ms=int(T0 * 1000))
    done = submit(coord, node="n2")
    report(coord, done, "succeeded", node="n2", exit_code=0)
    coord.outbox.clear()
    status(coord, "n1", "online", session=1, seq=1)
    again = [str(d["job_id"]) for d in sent(coord, "/nodes/n1/jobs")]
    assert again == [pending]  # never a running one: a node without its ledger would rerun it
    coord.outbox.clear()
    status(coord, "n1", "offline", session=1, seq=1)
    status(coord, "n1", "online", session=1, seq=0)  # older than what we know: not news
    status(coord, "n2", "online", session=1, seq=1)  # nothing unfinished there
    assert sent(coord, "/jobs") == []
    clock(coord).now += 61  # past the pending one's start-by: no use sending it
    status(coord, "n1", "online", session=2, seq=1)
    assert sent(coord, "/nodes/n1/jobs") == []
    assert state(coord, running) == "running"


def test_the_coordinator_reconnecting_sends_every_unfinished_dispatch_again(
    coord: Coordinator,
) -> None:
    first, second = submit(coord), submit(coord, node="n2")
    coord.outbox.clear()
    coord.handle(Inbound(CONNECTED, b""))
    assert {str(d["job_id"]) for d in sent(coord, "/jobs")} == {first, second}


def test_a_submission_arriving_after_its_accept_by_is_refused_and_not_stored(
    coord: Coordinator,
) -> None:
    now = clock(coord).now
    msg = Submit(
        job_id=str(uuid.uuid4()), target="n1", command="true", timeout_s=10,
        start_by_ms=int((now + 60) * 1000), accept_by_ms=int((now - 1) * 1000),
    )  # fmt: skip
    coord.handle(Inbound("t/submit", encode(msg, KEYS, int(now))))
    assert coord.store.get_job(msg.job_id) is None
    assert sent(coord, "/nodes/") == []
    (refusal,) = sent(coord, f"/jobs/{msg.job_id}")
    assert (refusal["type"], refusal["code"]) == ("rejected", "too_late")
    on_time = dataclasses.replace(msg, accept_by_ms=int((now + 1) * 1000))
    coord.handle(Inbound("t/submit", encode(on_time, KEYS, int(now))))
    assert state(coord, msg.job_id) == "pending"


def test_a_conflict_reported_by_a_node_is_recorded_and_leaves_its_status(
    coord: Coordinator,
) -> None:
    status(coord, "dup", "online", session=5, seq=1)
    status(coord, "dup", "conflict", session=9, seq=1, reason="two agents: this one stopped")
    (node,) = coord.store.list_nodes()
    assert (node["state"], node["session"]) == ("online", 5)
    assert node["conflict"] == "two agents: this one stopped"


@pytest.mark.parametrize(
    ("identity", "claimed", "granted", "kept", "refused"),
    [
        (None, {"role": "db"}, None, {"role": "db"}, {}),  # the shared secret: as claimed
        (("node", "n1"), {"role": "db"}, None, {}, {"role": "db"}),
        (("node", "n1"), {"role": "db"}, {"role": "web"}, {}, {"role": "db"}),
        (("node", "n1"), {"role": "web", "dc": "x"}, {"role": "web"}, {"role": "web"},
         {"dc": "x"}),
        (("node", "n1"), {}, {"role": "web"}, {}, {}),  # granted, not claimed: not given
    ],
)  # fmt: skip
def test_a_node_keeps_only_the_labels_it_claims_and_is_granted(
    identity: tuple[str, str] | None,
    claimed: dict[str, str],
    granted: dict[str, str] | None,
    kept: dict[str, str],
    refused: dict[str, str],
) -> None:
    who = Identity(*identity) if identity else None
    auth = Auth(kid="k", ts=0, nonce="n", identity=who)
    assert granted_labels(auth, claimed, granted) == (kept, refused)


def cancel(c: Coordinator, job_id: str) -> None:
    msg = Cancel(job_id=job_id)
    c.handle(Inbound("t/submit", encode(msg, KEYS, int(clock(c).now))))


def test_a_cancel_in_the_same_batch_as_its_submission_means_the_job_is_never_sent(
    coord: Coordinator,
) -> None:
    """After a coordinator restart, a submission and its cancel come in one batch: the
    dispatch still in the outbox is taken back, so the node never sees the job."""
    job_id = submit(coord)
    cancel(coord, job_id)
    assert sent(coord, "/nodes/n1/jobs") == []  # neither the dispatch nor a cancel for it
    assert state(coord, job_id) == "cancelled"
    coord.outbox.clear()  # published: from now on the node decides
    other = submit(coord)
    coord.outbox.clear()
    cancel(coord, other)
    assert [m["type"] for m in sent(coord, "/nodes/n1/jobs")] == ["cancel"]
    assert state(coord, other) == "pending"


def test_after_a_conflict_the_agent_that_stayed_is_heard_again_and_a_restart_clears_it(
    coord: Coordinator,
) -> None:
    def node() -> dict[str, object]:
        (n,) = coord.store.list_nodes()
        return n

    status(coord, "dup", "online", session=5, seq=1)  # agent A
    status(coord, "dup", "online", session=9, seq=1)  # agent B, started later...
    status(coord, "dup", "conflict", session=9, seq=1, reason="B stopped")  # ... stops
    status(coord, "dup", "online", session=5, seq=2)  # A, which stayed, reconnects: heard
    assert (node()["state"], node()["session"], node()["conflict"]) == ("online", 5, "B stopped")
    status(coord, "dup", "offline", session=5, seq=2)
    assert node()["state"] == "offline"
    status(coord, "dup", "online", session=12, seq=1)  # a new agent: the conflict is over
    assert node()["state"] == "online" and "conflict" not in node()


def test_one_guard_for_every_change_a_terminal_state_never_changes_even_to_itself(
    coord: Coordinator,
) -> None:
    job_id = submit(coord)
    report(coord, job_id, "failed", exit_code=3, started_ms=int(T0 * 1000))
    report(coord, job_id, "failed", exit_code=4)  # a second terminal report: dropped
    report(coord, job_id, "running", started_ms=int(T0 * 1000))  # late: dropped
    clock(coord).now += 3600
    coord.tick()  # no deadline applies to a terminal execution either
    job = coord.store.get_job(job_id)
    assert job is not None
    assert (job.state, job.executions[0].exit_code) == ("failed", 3)


def test_a_cancel_never_takes_back_a_dispatch_sent_again_the_node_may_hold_the_first(
    coord: Coordinator,
) -> None:
    job_id = submit(coord)
    coord.outbox.clear()  # the first dispatch went out
    coord.handle(Inbound(CONNECTED, b""))  # reconnected: sent again
    cancel(coord, job_id)
    assert [m["type"] for m in sent(coord, "/nodes/n1/jobs")] == ["dispatch", "cancel"]
    assert state(coord, job_id) == "pending"  # the node decides


def test_a_nodes_reply_for_a_large_fleet_fits_in_one_message(coord: Coordinator) -> None:
    """10,000 nodes with their facts would pass the message limit: the reply leaves the facts
    out, and still lists every node."""
    from opsbay_mqtt import queries
    from opsbay_mqtt.protocol import Query, wire

    facts = {"os": "Linux 6.1", "cpus": 8, "mem_mb": 32_000, "disk": "x" * 300}
    coord.store.node_seen("small", 1, info={"labels": {}, "facts": facts})
    small = queries.answer(Query(query="nodes", reply_to="r", correlation="c"), coord.store)
    assert small.data[0]["facts"] == facts  # a fleet that fits keeps its facts
    for i in range(10_000):
        coord.store.node_seen(f"n{i:05d}", 1, info={"labels": {}, "facts": facts})
    q = Query(query="nodes", reply_to="r", correlation="c")
    reply = queries.answer(q, coord.store)
    assert len(reply.data) == 10_001 and all(n["facts"] == {} for n in reply.data)
    assert len(json.dumps(wire(reply))) <= queries.JOB_BUDGET_BYTES + 1024
