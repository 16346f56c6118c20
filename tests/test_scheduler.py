"""The coordinator with schedules, stepped by hand with an injected clock (no broker, no
sleeps): schedule changes as signed requests answered on the reply topic, runs as ordinary jobs
(dispatched, recorded with their schedule), what became of each due time (`store.schedules`),
across restarts, pauses, policy changes, daylight-saving time, and two coordinators on one
PostgreSQL record."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest

from opsbay_mqtt import scheduler as scheduler_module
from opsbay_mqtt import schedules
from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig, Outgoing, step
from opsbay_mqtt.inbound import Inbound
from opsbay_mqtt.pgstore import PgStore
from opsbay_mqtt.policy import ClientPolicy
from opsbay_mqtt.protocol import (
    Query,
    Result,
    ScheduleChange,
    ScheduleRun,
    ScheduleSpec,
    Submit,
    encode,
)
from opsbay_mqtt.record import Record
from opsbay_mqtt.signing import Identity, Keyring
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import Topics
from tests.harness import Clock, wait_until

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_url, a database of its own for each test

SHARED = "default"  # the shared key's id: it speaks for anyone ("shared")
ALICE, BOB = "alice-1", "bob-1"
SECRETS = {SHARED: b"scheduler-test-shared", ALICE: b"alice-secret", BOB: b"bob-secret"}
WHO = {ALICE: Identity("client", "alice"), BOB: Identity("client", "bob")}


def keyring(*kids: str, more: Mapping[str, tuple[bytes, Identity]] | None = None) -> Keyring:
    """The shared key, the named client keys, and `more` keys: {kid: (secret, identity)}."""
    keys = {kid: SECRETS[kid] for kid in (SHARED, *kids)}
    identities = {kid: WHO[kid] for kid in kids}
    for kid, (secret, who) in (more or {}).items():
        keys[kid], identities[kid] = secret, who
    return Keyring(keys=keys, signing_kid=SHARED, identities=identities)


KEYS = keyring(ALICE, BOB)
T0 = 1_800_000_000.0  # a multiple of 10 s: every_s=10 is due at T0 + 10, T0 + 20, ...


def ms(seconds: float) -> int:
    return round(seconds * 1000)


def at_ms(millis: int) -> float:
    """A clock reading that the coordinator reads as `millis` (int(now * 1000))."""
    return (millis + 0.5) / 1000


def utc(text: str) -> float:
    """Seconds since the epoch of an ISO time in UTC: `2026-03-29T01:00Z`."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def iso(millis: int) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")


def coordinator(
    record: Record | Path,
    clock: Clock,
    keys: Keyring = KEYS,
    clients: Mapping[str, ClientPolicy] | None = None,
) -> Coordinator:
    store = Store(record) if isinstance(record, Path) else record
    cfg = CoordinatorConfig(topics=Topics("t"), keyring=keys, clients=clients or {}, lost_grace_s=5)
    return Coordinator(cfg, store, clock=clock)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "db.sqlite"


@pytest.fixture
def coord(db: Path, clock: Clock) -> Iterator[Coordinator]:
    c = coordinator(db, clock)
    yield c
    close(c)


def close(c: Coordinator) -> None:
    c.store.close()


def now_of(c: Coordinator) -> float:
    assert isinstance(c.clock, Clock)
    return c.clock.now


def spec(**fields: Any) -> ScheduleSpec:
    base: dict[str, Any] = dict(
        every_s=10, target="n1", command="echo hi", timeout_s=10, start_within_s=60
    )
    return ScheduleSpec(**{**base, **fields})


def change_id() -> str:
    return uuid.uuid4().hex


def send_change(
    c: Coordinator,
    op: str,
    name: str,
    *,
    spec: ScheduleSpec | None = None,
    job_id: str | None = None,
    cid: str | None = None,
    kid: str = SHARED,
) -> dict[str, Any]:
    """One signed schedule change through one loop turn; the reply's body (asserted to come on
    the reply topic, and alone)."""
    ch = ScheduleChange(
        op=op,  # type: ignore[arg-type]
        name=name,
        change_id=cid or change_id(),
        reply_to="r1",
        correlation="c-" + uuid.uuid4().hex[:8],
        spec=spec,
        job_id=job_id,
    )
    out = step(c, [Inbound("t/rpc/request", encode(ch, c.cfg.keyring, int(now_of(c)), kid))], False)
    replies = [json.loads(o.payload) for o in out if o.topic == "t/rpc/reply/r1"]
    assert len(replies) == 1, out
    reply: dict[str, Any] = replies[0]
    assert reply["type"] == "reply" and reply["correlation"] == ch.correlation
    return reply


def add(c: Coordinator, name: str, kid: str = SHARED, **fields: Any) -> dict[str, Any]:
    reply = send_change(c, "add", name, spec=spec(**fields), kid=kid)
    assert reply["ok"], reply
    return reply


def query(c: Coordinator, **fields: Any) -> dict[str, Any]:
    q = Query(reply_to="r1", correlation="q1", **fields)
    out = step(c, [Inbound("t/rpc/request", encode(q, c.cfg.keyring, int(now_of(c))))], False)
    (reply,) = [json.loads(o.payload) for o in out if o.topic == "t/rpc/reply/r1"]
    return reply  # type: ignore[no-any-return]


def tick(c: Coordinator, at: float | None = None) -> list[Outgoing]:
    """One loop turn with the deadline check (at `at`, if given); what it publishes."""
    if at is not None:
        assert isinstance(c.clock, Clock)
        c.clock.now = at
    return step(c, [], True)


def dispatched(out: list[Outgoing], again: bool = False) -> list[tuple[str, str]]:
    """(node, job id) of each dispatch published when its run started (with `again`: only
    those sent again, `Scheduler.resend_owed`)."""
    found = []
    for o in out:
        if o.first == again:
            continue
        body = json.loads(o.payload)
        if o.topic.startswith("t/nodes/") and body["type"] == "dispatch":
            assert o.topic == f"t/nodes/{body['node']}/jobs"
            found.append((body["node"], body["job_id"]))
    return found


def runs(store: Record, name: str) -> list[ScheduleRun]:
    """What became of the due times of `name`, oldest first."""
    return list(reversed(store.schedules.runs(name, 1000)))


def rows(store: Record, name: str) -> list[tuple[int, str, int, int | None]]:
    """Each recorded due time as (due ms, code, count, last_due_ms)."""
    return [(r.due_ms, r.code, r.count, r.last_due_ms) for r in runs(store, name)]


def finish(c: Coordinator, job_id: str, node: str = "n1") -> None:
    res = Result(job_id=job_id, node=node, state="succeeded", exit_code=0)
    topic = f"t/results/{node}/{job_id}"
    step(c, [Inbound(topic, encode(res, c.cfg.keyring, int(now_of(c))))], False)


# -- changes
def test_an_added_schedule_is_answered_on_the_reply_topic(coord: Coordinator) -> None:
    reply = add(coord, "health")
    data = reply["data"]
    assert (data["name"], data["owner"], data["every_s"], data["paused"]) == (
        "health", "shared", 10, False,
    )  # fmt: skip
    assert data["next_due_ms"] == ms(T0 + 10) == data["next_fire_ms"]
    (s,) = coord.store.schedules.listing()
    assert (s.name, s.command, s.next_due_ms) == ("health", "echo hi", ms(T0 + 10))


def test_a_name_taken_is_refused_but_a_retried_add_is_answered_as_the_first(
    coord: Coordinator,
) -> None:
    cid = change_id()
    first = send_change(coord, "add", "health", spec=spec(), cid=cid)
    assert first["ok"]
    again = send_change(coord, "add", "health", spec=spec(), cid=cid)  # a retry (new nonce)
    assert again["ok"] and again["data"]["name"] == "health"
    taken = send_change(coord, "add", "health", spec=spec(command="other"))
    assert (taken["ok"], taken["code"]) == (False, "schedule_exists")
    assert "health" in taken["error"] and "remove it first" in taken["error"]
    assert [s.command for s in coord.store.schedules.listing()] == ["echo hi"]


def test_remove_then_add_the_same_name_and_a_retried_remove(coord: Coordinator) -> None:
    add(coord, "health")
    cid = change_id()
    removed = send_change(coord, "remove", "health", cid=cid)
    assert removed["ok"] and removed["data"] == {"name": "health", "removed": True}
    assert coord.store.schedules.listing() == []
    retried = send_change(coord, "remove", "health", cid=cid)
    assert retried["ok"] and retried["data"] == {"name": "health", "removed": True}
    add(coord, "health", command="echo again")
    assert [s.command for s in coord.store.schedules.listing()] == ["echo again"]


def test_a_retried_remove_arriving_after_the_name_was_added_again_removes_nothing(
    coord: Coordinator,
) -> None:
    """A retry answers as the first request did and never acts twice (the change id's
    promise): a delayed copy of the removal must not remove the new schedule of that name."""
    add(coord, "health")
    cid = change_id()
    assert send_change(coord, "remove", "health", cid=cid)["ok"]
    add(coord, "health", command="echo again")
    retried = send_change(coord, "remove", "health", cid=cid)
    assert retried["ok"]
    assert [s.command for s in coord.store.schedules.listing()] == ["echo again"]


@pytest.mark.parametrize("op", ["remove", "pause", "resume", "run"])
def test_a_change_to_a_schedule_that_does_not_exist_is_not_found(
    coord: Coordinator, op: str
) -> None:
    job_id = str(uuid.uuid4()) if op == "run" else None
    reply = send_change(coord, op, "nothing", job_id=job_id)
    assert (reply["ok"], reply["code"]) == (False, "not_found")
    assert "nothing" in reply["error"]


@pytest.mark.parametrize("op", ["pause", "remove", "run"])
def test_another_client_cannot_change_a_schedule_but_the_owner_and_the_shared_key_can(
    coord: Coordinator, op: str
) -> None:
    reply = add(coord, "alices", kid=ALICE)
    assert reply["data"]["owner"] == "alice" and reply["data"]["owner_kid"] == ALICE
    job_id = str(uuid.uuid4()) if op == "run" else None
    refused = send_change(coord, op, "alices", kid=BOB, job_id=job_id)
    assert (refused["ok"], refused["code"]) == (False, "not_yours")
    assert "'alice'" in refused["error"]
    (s,) = coord.store.schedules.listing()
    assert not s.paused and coord.store.list_jobs(schedule="alices") == []
    assert send_change(coord, op, "alices", kid=ALICE, job_id=job_id)["ok"]
    if op == "remove":
        add(coord, "alices", kid=ALICE)
    job_id = str(uuid.uuid4()) if op == "run" else None
    assert send_change(coord, op, "alices", kid=SHARED, job_id=job_id)["ok"]


def test_an_add_the_owners_policy_does_not_allow_is_refused(db: Path, clock: Clock) -> None:
    c = coordinator(db, clock, clients={"alice": ClientPolicy(commands=("backup *",))})
    try:
        refused = send_change(c, "add", "x", spec=spec(command="rm -rf /"), kid=ALICE)
        assert (refused["ok"], refused["code"]) == (False, "command_not_allowed")
        assert c.store.schedules.listing() == []
        assert send_change(c, "add", "x", spec=spec(command="backup db"), kid=ALICE)["ok"]
    finally:
        close(c)


# -- runs
def test_every_due_time_runs_one_job_recorded_with_its_schedule(coord: Coordinator) -> None:
    add(coord, "health")
    assert tick(coord, T0 + 9.999) == []
    seen = []
    for k in range(1, 6):
        out = tick(coord, T0 + 10 * k)
        (node, job_id), *more = dispatched(out)
        assert (node, more) == ("n1", [])
        job = coord.store.get_job(job_id)
        assert job is not None
        assert (job.schedule, job.command, job.submitted_ms) == (
            "health",
            "echo hi",
            ms(T0 + 10 * k),
        )
        assert (job.submitted_by, job.start_by_ms) == ("shared", ms(T0 + 10 * k + 60))
        finish(coord, job_id)  # ended before the next due time: no overlap
        seen.append(job_id)
        assert tick(coord, T0 + 10 * k + 5) == []  # once per due time
    recorded = runs(coord.store, "health")
    assert [(r.due_ms, r.code, r.job_id, r.state) for r in recorded] == [
        (ms(T0 + 10 * k), "scheduled", job_id, "succeeded") for k, job_id in enumerate(seen, 1)
    ]
    assert {j.job_id for j in coord.store.list_jobs(schedule="health")} == set(seen)


def test_overlap_skip_records_the_due_time_and_makes_no_job_while_the_last_run_is_open(
    coord: Coordinator,
) -> None:
    add(coord, "slow")
    ((_, first),) = dispatched(tick(coord, T0 + 10))
    assert dispatched(tick(coord, T0 + 20)) == []  # pending
    step(coord, [Inbound(f"t/results/n1/{first}", encode(
        Result(job_id=first, node="n1", state="running", started_ms=ms(T0 + 21)),
        KEYS, int(T0 + 21)))], False)  # fmt: skip
    assert dispatched(tick(coord, T0 + 30)) == []  # running
    finish(coord, first)
    ((_, third),) = dispatched(tick(coord, T0 + 40))
    recorded = runs(coord.store, "slow")
    assert [(r.due_ms, r.code, r.job_id) for r in recorded] == [
        (ms(T0 + 10), "scheduled", first),
        (ms(T0 + 20), "overlap", None),
        (ms(T0 + 30), "overlap", None),
        (ms(T0 + 40), "scheduled", third),
    ]
    assert f"job {first}" in (recorded[1].reason or "")
    assert "not started on n1" in (recorded[1].reason or "")
    assert "running on n1" in (recorded[2].reason or "")
    assert len(coord.store.list_jobs(schedule="slow")) == 2


def test_overlap_allow_runs_a_job_for_every_due_time(coord: Coordinator) -> None:
    add(coord, "many", overlap="allow")
    jobs = [dispatched(tick(coord, T0 + 10 * k)) for k in range(1, 5)]
    assert [len(j) for j in jobs] == [1, 1, 1, 1]
    assert [r.code for r in runs(coord.store, "many")] == ["scheduled"] * 4
    assert len(coord.store.list_jobs(schedule="many")) == 4


def test_jitter_delays_the_run_past_its_due_time(coord: Coordinator) -> None:
    add(coord, "spread", jitter_s=9, overlap="allow")
    for due in (ms(T0 + 10), ms(T0 + 20), ms(T0 + 30)):
        fire = schedules.fire_at("spread", spec(jitter_s=9), due)
        assert due <= fire <= due + 9000
        assert dispatched(tick(coord, at_ms(fire - 1))) == []
        ((_, job_id),) = dispatched(tick(coord, at_ms(fire)))
        job = coord.store.get_job(job_id)
        assert job is not None and job.submitted_ms == fire
    assert [r.due_ms for r in runs(coord.store, "spread")] == [ms(T0 + k) for k in (10, 20, 30)]
    # At least one of these due times has a delay: the test is not vacuous.
    assert any(schedules.jitter_ms("spread", ms(T0 + k), 9) > 0 for k in (10, 20, 30))


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # Spring forward (02:00 CET -> 03:00 CEST on 03-29): 02:30 does not exist that day;
        # it runs once, at 03:00 CEST.
        ("2026-03-27T00:00Z", "2026-04-01T00:00Z",
         ["2026-03-27T01:30Z", "2026-03-28T01:30Z", "2026-03-29T01:00Z", "2026-03-30T00:30Z",
          "2026-03-31T00:30Z"]),
        # Fall back (03:00 CEST -> 02:00 CET on 10-25): 02:30 comes twice; it runs once, on
        # the first pass (02:30 CEST, 00:30Z), not at 01:30Z.
        ("2026-10-23T00:00Z", "2026-10-28T00:00Z",
         ["2026-10-23T00:30Z", "2026-10-24T00:30Z", "2026-10-25T00:30Z", "2026-10-26T01:30Z",
          "2026-10-27T01:30Z"]),
    ],
)  # fmt: skip
def test_a_daily_berlin_schedule_runs_once_a_day_across_daylight_saving(
    db: Path, start: str, end: str, expected: list[str]
) -> None:
    clock = Clock(utc(start))
    c = coordinator(db, clock)
    try:
        add(c, "nightly", cron="30 2 * * *", tz="Europe/Berlin", every_s=None,
            start_within_s=600)  # fmt: skip
        fired: list[tuple[str, str]] = []
        while clock.now < utc(end):
            clock.now += 60
            for _, job_id in dispatched(tick(c)):
                fired.append((iso(ms(clock.now)), job_id))
        assert [at for at, _ in fired] == expected
        for at, job_id in fired:
            job = c.store.get_job(job_id)
            assert job is not None and job.schedule == "nightly" and iso(job.submitted_ms) == at
        assert [(iso(r.due_ms), r.code) for r in runs(c.store, "nightly")] == [
            (at, "scheduled") for at in expected
        ]
    finally:
        close(c)


# -- restarts
@pytest.mark.parametrize(
    ("catch_up", "back_at", "expected_rows", "runs_job"),
    [
        # Back at 45 s, within the 40 s due time's start window (5 s): 40 runs, 10-30 missed.
        ("latest", 45, [(10, "missed", 3, 30), (40, "scheduled", 1, None)], True),
        ("none", 45, [(10, "missed", 3, 30), (40, "scheduled", 1, None)], True),
        # Back at 48 s, beyond it: with catch_up none nothing runs, 10-40 are missed; with
        # latest, 40 runs as caught up.
        ("none", 48, [(10, "missed", 4, 40)], False),
        ("latest", 48, [(10, "missed", 3, 30), (40, "caught_up", 1, None)], True),
    ],
)
def test_a_coordinator_back_after_due_times_passed(
    db: Path,
    clock: Clock,
    catch_up: str,
    back_at: int,
    expected_rows: list[tuple[int, str, int, int | None]],
    runs_job: bool,
) -> None:
    first = coordinator(db, clock)
    add(first, "backup", start_within_s=5, catch_up=catch_up)
    close(first)  # down before its first due time (10 s)
    clock.now = T0 + back_at
    c = coordinator(db, clock)
    try:
        out = tick(c)
        assert tick(c) == []  # handled once
        expected = [
            (ms(T0 + due), code, count, None if last is None else ms(T0 + last))
            for due, code, count, last in expected_rows
        ]
        assert rows(c.store, "backup") == expected
        jobs = c.store.list_jobs(schedule="backup")
        assert len(jobs) == len(dispatched(out)) == int(runs_job)
        if runs_job:
            (job,) = jobs
            last_run = runs(c.store, "backup")[-1]
            assert last_run.job_id == job.job_id == dispatched(out)[0][1]
            # caught up: a start window from now; on time: from its due time
            window_from = T0 + back_at if back_at == 48 else T0 + 40
            assert job.start_by_ms == ms(window_from + 5)
        missed = runs(c.store, "backup")[0]
        assert missed.reason is not None and "no coordinator ran at" in missed.reason
        (s,) = c.store.schedules.listing()
        assert s.next_due_ms == ms(T0 + 50)
    finally:
        close(c)


# -- pause and resume
def test_a_paused_schedule_neither_runs_nor_misses_and_resumes_at_its_next_due_time(
    coord: Coordinator, clock: Clock
) -> None:
    add(coord, "health", overlap="allow")
    clock.now = T0 + 5
    paused = send_change(coord, "pause", "health")
    assert paused["ok"] and paused["data"]["paused"] is True
    assert paused["data"]["next_fire_ms"] is None
    for k in range(1, 11):
        assert tick(coord, T0 + 10 * k) == []
    assert runs(coord.store, "health") == [] and coord.store.list_jobs(schedule="health") == []
    clock.now = T0 + 103
    resumed = send_change(coord, "resume", "health")
    assert resumed["ok"] and resumed["data"]["paused"] is False
    assert resumed["data"]["next_due_ms"] == ms(T0 + 110)
    assert tick(coord, T0 + 109.999) == []
    ((_, job_id),) = dispatched(tick(coord, T0 + 110))
    assert rows(coord.store, "health") == [(ms(T0 + 110), "scheduled", 1, None)]
    assert [j.job_id for j in coord.store.list_jobs(schedule="health")] == [job_id]


def test_a_retried_pause_is_answered_and_changes_nothing(coord: Coordinator) -> None:
    add(coord, "health")
    cid = change_id()
    assert send_change(coord, "pause", "health", cid=cid)["ok"]
    again = send_change(coord, "pause", "health", cid=cid)
    assert again["ok"] and again["data"]["paused"] is True


# -- authority at every run
def test_a_run_the_owners_policy_no_longer_allows_is_refused_and_recorded(
    db: Path, clock: Clock
) -> None:
    first = coordinator(db, clock, clients={"alice": ClientPolicy(commands=("backup *",))})
    add(first, "backup", kid=ALICE, command="backup db")
    close(first)
    c = coordinator(db, clock, clients={"alice": ClientPolicy(commands=("restore *",))})
    try:
        out = tick(c, T0 + 10)
        assert dispatched(out) == [] and c.store.list_jobs(schedule="backup") == []
        (run,) = runs(c.store, "backup")
        assert (run.due_ms, run.code, run.job_id) == (ms(T0 + 10), "refused", None)
        assert run.reason == "command_not_allowed: client 'alice' may not run this command"
        (s,) = c.store.schedules.listing()
        assert s.next_due_ms == ms(T0 + 20)  # moved on: refused once, not every tick
    finally:
        close(c)


def test_a_run_whose_owner_has_no_key_left_is_refused_as_owner_removed(
    db: Path, clock: Clock
) -> None:
    first = coordinator(db, clock)
    add(first, "backup", kid=ALICE)
    close(first)
    c = coordinator(db, clock, keys=keyring(BOB))  # alice's key removed from the key file
    try:
        assert dispatched(tick(c, T0 + 10)) == []
        (run,) = runs(c.store, "backup")
        assert (run.code, run.job_id) == ("refused", None)
        assert run.reason is not None and run.reason.startswith("owner_removed: ")
        assert "'alice'" in run.reason
        assert c.store.list_jobs(schedule="backup") == []
    finally:
        close(c)


def test_a_key_rotated_within_the_owners_identity_keeps_the_schedule_running(
    db: Path, clock: Clock
) -> None:
    first = coordinator(db, clock)
    add(first, "backup", kid=ALICE)
    close(first)
    rotated = keyring(BOB, more={"alice-2": (b"alice-new-secret", WHO[ALICE])})
    c = coordinator(db, clock, keys=rotated)
    try:
        ((_, job_id),) = dispatched(tick(c, T0 + 10))
        job = c.store.get_job(job_id)
        assert job is not None and (job.submitted_by, job.submitted_kid) == ("alice", "alice-2")
    finally:
        close(c)


def test_a_cron_schedule_delayed_longer_than_its_interval_never_reports_missed_due_times(
    coord: Coordinator,
) -> None:
    """`every_s` refuses a delay (jitter) as long as its period; a cron schedule that takes one
    must still handle each due time while a coordinator ticks all along: none may be recorded
    as missed because "no coordinator was running"."""
    try:
        minutely = spec(every_s=None, cron="* * * * *", jitter_s=120, overlap="allow")
    except ValueError:
        return  # refused, as every_s refuses it: fine too
    reply = send_change(coord, "add", "minutely", spec=minutely)
    if not reply["ok"]:  # refused by the coordinator: fine too
        assert reply["code"] == "invalid"
        return
    for k in range(1, 61):
        tick(coord, T0 + 10 * k)  # every 10 s for 10 minutes
    missed = [
        (iso(r.due_ms), r.reason) for r in runs(coord.store, "minutely") if r.code == "missed"
    ]
    assert missed == []


# -- manual runs
def test_a_manual_run_makes_one_job_with_the_id_chosen_even_when_sent_again(
    coord: Coordinator, clock: Clock
) -> None:
    add(coord, "backup")
    clock.now = T0 + 3
    job_id = str(uuid.uuid4())
    reply = send_change(coord, "run", "backup", job_id=job_id)
    assert reply["ok"] and reply["data"]["job_id"] == job_id
    job = coord.store.get_job(job_id)
    assert job is not None and (job.schedule, job.command) == ("backup", "echo hi")
    again = send_change(coord, "run", "backup", job_id=job_id)
    assert again["ok"] and again["data"]["job_id"] == job_id
    assert [j.job_id for j in coord.store.list_jobs(schedule="backup")] == [job_id]
    assert rows(coord.store, "backup") == [
        (ms(T0 + 3) + 1, "manual", 1, None)
    ]  # off the whole-second due times
    shown = query(coord, query="schedule", schedule="backup")
    assert shown["ok"] and shown["data"]["last_run"]["job_id"] == job_id
    assert shown["data"]["last_run"]["code"] == "manual"


def test_a_manual_run_at_the_very_millisecond_of_a_due_time_leaves_that_due_time_its_run(
    coord: Coordinator, clock: Clock
) -> None:
    """A manual run is recorded at the time it was asked for: if that is the millisecond of a
    due time still to come, the due time must still get its own run (overlap allow)."""
    add(coord, "backup", overlap="allow")
    clock.now = T0 + 10  # the first due time, before the deadline check handled it
    manual = str(uuid.uuid4())
    assert send_change(coord, "run", "backup", job_id=manual)["ok"]
    out = tick(coord)
    (s,) = coord.store.schedules.listing()
    assert s.next_due_ms == ms(T0 + 20), "the schedule did not move on from its 10 s due time"
    assert [j for _, j in dispatched(out)] != [], "the due time at 10 s made no job"
    codes = sorted(r.code for r in runs(coord.store, "backup"))
    assert codes == ["manual", "scheduled"]


# -- queries
def test_results_of_one_schedule_lists_only_its_jobs(coord: Coordinator, clock: Clock) -> None:
    add(coord, "a", overlap="allow")
    add(coord, "b", overlap="allow")
    plain = Submit(job_id=str(uuid.uuid4()), target="n1", command="true", timeout_s=10,
                   start_by_ms=ms(T0 + 60))  # fmt: skip
    step(coord, [Inbound("t/submit", encode(plain, KEYS, int(T0)))], False)
    tick(coord, T0 + 10)
    tick(coord, T0 + 20)
    ids_a = {j.job_id for j in coord.store.list_jobs(schedule="a")}
    assert len(ids_a) == 2
    reply = query(coord, query="results", schedule="a")
    assert reply["ok"]
    assert {j["job_id"] for j in reply["data"]} == ids_a
    everything = query(coord, query="results")
    assert len(everything["data"]) == 5  # a's two, b's two, the plain one
    listing = query(coord, query="schedules")
    assert [s["name"] for s in listing["data"]] == ["a", "b"]
    assert all(s["last_run"]["due_ms"] == ms(T0 + 20) for s in listing["data"])


# -- two coordinators on one PostgreSQL record
NAMES = [f"s{i:02d}" for i in range(50)]


@pytest.fixture
def pg_pair(pg_url: str) -> Iterator[tuple[Coordinator, Coordinator, Clock]]:
    # A lock wait would hang a test that steps both in one thread: fail it instead.
    url = pg_url + "?options=-c%20lock_timeout%3D10000"
    clock = Clock(T0)
    a = coordinator(PgStore(url), clock)
    b = coordinator(PgStore(url), clock)
    yield a, b, clock
    close(a)
    close(b)


def pg_add_all(c: Coordinator) -> None:
    for i, name in enumerate(NAMES):
        add(c, name, overlap="allow", start_within_s=300, target=f"n{i % 5}")


def test_two_coordinators_split_the_due_schedules_and_fire_each_due_time_once(
    pg_pair: tuple[Coordinator, Coordinator, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round, the first coordinator takes 20 due schedules and holds them (its batch not
    yet committed); the second skips those (FOR UPDATE SKIP LOCKED, without waiting) and takes
    20 others; after the first commits, each steps again and the rest are handled. Which one
    goes first alternates."""
    a, b, clock = pg_pair
    monkeypatch.setattr(scheduler_module, "DUE_PER_TICK", 20)
    pg_add_all(a)
    published: dict[str, list[Outgoing]] = {"a": [], "b": []}
    order = [("a", a), ("b", b)]
    for k in range(1, 7):
        clock.now = T0 + 10 * k + 1
        (n1, first), (n2, second) = order if k % 2 else order[::-1]
        with first.store.atomic():
            first.tick()  # the deadline check, in the open batch: its rows stay locked
        published[n2] += step(second, [], True)
        first.store.commit()
        published[n1] += first.outbox
        first.outbox = []
        for name, c in order * 2:
            published[name] += step(c, [], True)
    handled = {name: dispatched(out) for name, out in published.items()}
    assert handled["a"] and handled["b"], {n: len(h) for n, h in handled.items()}
    every_dispatch = Counter(job for h in handled.values() for _, job in h)
    assert set(every_dispatch.values()) == {1}  # each job dispatched by one coordinator, once
    due_times = [ms(T0 + 10 * k) for k in range(1, 7)]
    check = a.store
    for name in NAMES:
        recorded = runs(check, name)
        assert [(r.due_ms, r.code) for r in recorded] == [(d, "scheduled") for d in due_times]
        jobs = check.list_jobs(schedule=name, limit=100)
        assert sorted(j.job_id for j in jobs) == sorted(r.job_id for r in recorded if r.job_id)
        assert all(every_dispatch[j.job_id] == 1 for j in jobs)
    assert len(every_dispatch) == len(NAMES) * len(due_times)
    # And in each round both had a share: the split is by row, not by turn.
    by_round: dict[int, set[str]] = {}
    for name, h in handled.items():
        for _, job_id in h:
            job = check.get_job(job_id, executions=False)
            assert job is not None
            by_round.setdefault(job.submitted_ms, set()).add(name)
    assert all(who == {"a", "b"} for who in by_round.values()), by_round


def test_a_due_time_handled_and_rolled_back_is_fired_once_by_the_other(
    pg_pair: tuple[Coordinator, Coordinator, Clock],
) -> None:
    a, b, clock = pg_pair
    add(a, "solo", overlap="allow")
    clock.now = T0 + 10
    with a.store.atomic():
        a.tick()
    assert dispatched(a.outbox)  # a had fired it...
    a.store.rollback()  # ...and died before its commit: nothing of it was published
    a.outbox = []
    out = step(b, [], True)
    ((_, job_id),) = dispatched(out)
    assert step(a, [], True) == []
    assert step(b, [], True) == []
    assert rows(a.store, "solo") == [(ms(T0 + 10), "scheduled", 1, None)]
    assert [j.job_id for j in a.store.list_jobs(schedule="solo")] == [job_id]


def wait_blocked(pg_url: str, store: PgStore, what: str) -> None:
    """Until `store`'s connection waits on a lock another transaction holds (bounded)."""
    pid = store.db.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as watcher:

        def waiting() -> bool:
            row = watcher.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            return row is not None and row[0] == "Lock"

        wait_until(waiting, 10, what)


def test_two_copies_of_one_add_handled_at_once_by_two_coordinators_are_both_answered_ok(
    pg_pair: tuple[Coordinator, Coordinator, Clock], pg_url: str
) -> None:
    """The client sends a change again (signed afresh, the same change id) while the first copy
    is being handled; with a shared subscription the copies go to different coordinators. The
    add is made once, and neither answers with a refusal (the client takes the first answer
    that comes, and the add was made)."""
    a, b, _ = pg_pair
    ch = ScheduleChange(op="add", name="once", change_id=change_id(), reply_to="r1",
                        correlation="c1", spec=spec())  # fmt: skip
    first = Inbound("t/rpc/request", encode(ch, KEYS, int(T0)))
    second = Inbound("t/rpc/request", encode(ch, KEYS, int(T0)))  # another nonce
    a.handle(first)  # a's batch is still open: its new row not yet committed
    with ThreadPoolExecutor(1) as pool:
        later: Future[list[Outgoing]] = pool.submit(step, b, [second], False)
        wait_blocked(pg_url, cast(PgStore, b.store), "b's add to wait on a's uncommitted one")
        answers = step(a, [], False)
        answers += later.result(timeout=30)
    replies = [json.loads(o.payload) for o in answers if o.topic == "t/rpc/reply/r1"]
    answered = [(r["ok"], r.get("code"), r.get("error")) for r in replies]
    assert answered == [(True, None, None), (True, None, None)]
    assert [s.name for s in a.store.schedules.listing()] == ["once"]


def test_two_coordinators_stepping_in_turn_fire_each_due_time_once(
    pg_pair: tuple[Coordinator, Coordinator, Clock],
) -> None:
    """Both stepped at the same clock, one after the other; who goes first alternates."""
    a, b, clock = pg_pair
    pg_add_all(b)
    seen: Counter[str] = Counter()
    by: dict[str, int] = {"a": 0, "b": 0}
    for k in range(1, 5):
        clock.now = T0 + 10 * k
        pair = [("a", a), ("b", b)] if k % 2 else [("b", b), ("a", a)]
        for name, c in pair:
            got = dispatched(step(c, [], True))
            by[name] += len(got)
            seen.update(job for _, job in got)
    assert by["a"] > 0 and by["b"] > 0
    assert len(seen) == 50 * 4 and set(seen.values()) == {1}
    for name in NAMES:
        assert [r.code for r in runs(a.store, name)] == ["scheduled"] * 4


def test_a_run_whose_dispatch_was_never_published_is_sent_again_once(coord: Coordinator) -> None:
    """The coordinator that started a run died between its commit and its publish: a
    coordinator still running sends the dispatch (once) when the run has not started."""
    add(coord, "health")
    lost = tick(coord, T0 + 10)  # committed; as if never published
    ((_, job_id),) = dispatched(lost)
    assert dispatched(tick(coord, T0 + 12), again=True) == []  # it may be on its way
    assert dispatched(tick(coord, T0 + 16), again=True) == [("n1", job_id)]
    assert dispatched(tick(coord, T0 + 22), again=True) == [], "once, not at every check"


def test_the_loop_is_woken_for_the_next_run_and_at_once_while_runs_are_left_over(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = coord.scheduler
    assert sched.wake_in_s() is None  # no schedule: the regular tick only
    add(coord, "a")  # due at T0 + 10
    assert sched.wake_in_s() == pytest.approx(10.0)
    assert not sched.due_now()
    assert isinstance(coord.clock, Clock)
    coord.clock.now = T0 + 10
    assert sched.due_now()
    ((_, first),) = dispatched(tick(coord))
    finish(coord, first)  # over before its next due time: no overlap
    assert sched.wake_in_s() == pytest.approx(10.0) and not sched.due_now()
    # More due than one tick handles: the next tick comes at once, until none are left over.
    monkeypatch.setattr("opsbay_mqtt.scheduler.DUE_PER_TICK", 2)
    for name in ("b", "c", "d"):
        add(coord, name)
    out = tick(coord, T0 + 20)
    assert len(dispatched(out)) == 2 and sched.due_now()
    out = tick(coord)
    assert len(dispatched(out)) == 2 and sched.due_now()  # a full tick: there may be more
    assert dispatched(tick(coord)) == [] and not sched.due_now()
    assert sched.wake_in_s() == pytest.approx(10.0)


def test_a_name_added_again_does_not_inherit_the_runs_of_the_schedule_removed(
    coord: Coordinator,
) -> None:
    add(coord, "reuse")
    ((_, job_id),) = dispatched(tick(coord, T0 + 10))
    res = Result(job_id=job_id, node="n1", state="failed", exit_code=5)
    step(coord, [Inbound(f"t/results/n1/{job_id}", encode(res, KEYS, int(T0 + 11)))], False)
    assert send_change(coord, "remove", "reuse")["ok"]
    assert isinstance(coord.clock, Clock)
    coord.clock.now = T0 + 12
    add(coord, "reuse", command="echo fixed")
    listed = {s["name"]: s for s in query(coord, query="schedules")["data"]}
    assert listed["reuse"]["last_run"] is None, "the removed schedule's failed run"
    shown = query(coord, query="schedule", schedule="reuse")["data"]
    assert shown["runs"] == [] and shown["command"] == "echo fixed"


def test_an_overlap_skip_names_the_nodes_the_previous_run_waits_for(coord: Coordinator) -> None:
    add(coord, "ghost", target="ghost-01")
    tick(coord, T0 + 10)  # a run for a node that never connects: pending
    tick(coord, T0 + 20)
    skipped = runs(coord.store, "ghost")[-1]
    assert skipped.code == "overlap" and skipped.reason is not None
    assert "not started on ghost-01 (offline, or busy?)" in skipped.reason
