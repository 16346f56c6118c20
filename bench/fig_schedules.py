"""Schedules: 1,000 schedules due at the same minute on 100 simulated nodes (10 per node, each
targeting its node), added through signed `ScheduleChange` requests; how late each run reaches
its node after its due time, with one coordinator on SQLite, one on PostgreSQL and two on one
PostgreSQL record. Baseline, in the same setup before the schedules fall due: plain jobs
submitted one at a time, submission to dispatch at the node.

The schedules are cron `M H * * *` (UTC) for a minute at least LEAD_S ahead: one due time a day,
so nothing fires again while the runs are counted. In quick mode, 20 schedules on 4 nodes,
`every_s=10` (no minute to wait), only runs of the first due time counted, and no row for one
coordinator on PostgreSQL.

The simulated nodes are `bench.simworkers`' fleet, recording when each dispatch reaches it (a
subclass here: `python -m bench.fig_schedules --port P --prefix X --first 0 --count N` prints
`got JOB NODE TIME` for each dispatch, TIME from `time.time()` as it arrives). Lateness is that
time minus the due time, the same clock (one machine). Each run is also checked against the
job events (`<prefix>/jobs/<job>`: which schedule started it, `submitted_ms` = when it was
fired) and, once the coordinators are stopped, against their record (jobs per schedule, what
became of each due time): a schedule run twice, or not at all, is counted and reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import secrets
import signal
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bench.common import (
    BenchError,
    Bus,
    Lines,
    Row,
    Suite,
    Summary,
    close_input,
    close_paho,
    ms,
    paho_thread,
    private_bus,
    summarize,
)
from bench.simworkers import Fleet, node_name

if TYPE_CHECKING:
    from bench.driver import Driver

FIG = "schedules"
LEAD_S = {False: 20.0, True: 3.0}  # by quick: the due time is at least this far ahead
PERIOD_S = {False: 60, True: 10}  # the boundary the due time is on (quick: every_s=10)
GRACE_S = 3.0  # after the last expected run: time for a duplicate to show
STARTED = re.compile(r"schedule (\S+): run (\S+) started \((\w+)\)")


class RecordingFleet(Fleet):
    """The simulated fleet, printing when each verified dispatch reaches its node."""

    def _on_message(self, client: Any, node: str, msg: Any) -> None:
        t = time.time()
        before = self.handled
        super()._on_message(client, node, msg)
        if self.handled > before:  # a dispatch, verified and answered
            job_id = json.loads(msg.payload)["job_id"]
            print(f"got {job_id} {node} {t:.6f}", flush=True)


def start_recording_fleet(bus: Bus, nodes: int, timeout_s: float) -> Lines:
    argv = [sys.executable, "-m", "bench.fig_schedules", "--port", str(bus.port)]
    argv += ["--prefix", bus.prefix, "--first", "0", "--count", str(nodes)]
    sim = Lines(bus.start("sim", argv, piped=True, BENCH_SECRET=bus.secret))
    sim.expect("ready", timeout_s)
    return sim


@dataclass
class Case:
    label: str  # the table's setup column
    key: str  # its directory
    coordinators: int
    store: str  # "" for SQLite


@dataclass
class Outcome:
    case: Case
    expected: int
    due_ms: int
    period: int  # seconds: the due time is on a multiple of it
    runs: int  # distinct runs (jobs) of the due time that reached their node
    duplicates: int  # runs beyond one per schedule (bus and record)
    missing: int  # schedules with no run reaching its node
    early: int  # scheduled jobs fired before the due time
    redispatched: int  # dispatches of a run beyond its first
    late: Summary  # dispatch at the node - due time, seconds
    fired: Summary  # submitted_ms - due time, seconds
    # By deadline check that fired runs (distinct submitted_ms, any coordinator): when it
    # fired, how many, the first and last of their dispatches at the nodes (s after due).
    checks: list[tuple[float, int, float, float]]
    bus: Summary  # plain jobs: submission to dispatch at the node, seconds
    add_s: float
    split: dict[str, int] = field(default_factory=dict)  # runs started, by coordinator
    taken: int = 0  # "handled by another coordinator" log lines
    record: dict[str, Any] = field(default_factory=dict)


def run(suite: Suite) -> list[Row]:
    from bench.fig_scale import postgresql

    n, nodes = suite.pick(1000, 20), suite.pick(100, 4)
    outcomes = [measure(suite, Case("1 coordinator, SQLite", "sqlite", 1, ""), n, nodes)]
    with postgresql() as server:
        if not suite.quick:
            url = server.url(server.create_database())
            case = Case("1 coordinator, PostgreSQL", "pg1", 1, url)
            outcomes.append(measure(suite, case, n, nodes))
        url = server.url(server.create_database())
        case = Case("2 coordinators, one PostgreSQL record", "pg2", 2, url)
        outcomes.append(measure(suite, case, n, nodes))
    return [row(o, nodes) for o in outcomes]


def row(o: Outcome, nodes: int) -> Row:
    ok = o.runs == o.expected and o.duplicates == 0 and o.missing == 0 and o.early == 0
    split = ", ".join(f"{k} {v}" for k, v in sorted(o.split.items()))
    detail = [
        f"{o.runs:,} runs of {o.expected:,}, {o.duplicates} duplicate(s), {o.missing} missing, "
        f"{o.redispatched} re-dispatched, {o.early} fired before the due time",
        f"fired (submitted_ms - due) p50 {ms(o.fired.p50)}, max {ms(o.fired.hi)}",
        "by deadline check, fired → at the nodes: "
        + ", ".join(f"+{f:.2f} s → {a:.2f}-{b:.2f} s ({k})" for f, k, a, b in o.checks),
        f"{o.expected:,} adds answered in {o.add_s:.1f} s",
    ]
    if o.case.coordinators > 1:
        detail.append(f"runs started by {split}; {o.taken} due times found taken")
    if o.record["runs"] != [["scheduled", o.due_ms, o.expected]]:
        detail.append(f"the record's due times (code, due, count): {o.record['runs']}")
    return Row(
        FIG,
        f"{o.expected:,} schedules due at one {'minute' if o.period == 60 else 'time'}, "
        f"{nodes} simulated nodes, {o.case.label}: "
        "run's dispatch at its node after the due time, p50 / p99 / max",
        f"p50 {ms(o.late.p50)}, p99 {ms(o.late.p99)}, max {ms(o.late.hi)}",
        "; ".join(detail),
        f"plain job, submission → dispatch at the node, p50 {ms(o.bus.p50)}, "
        f"p99 {ms(o.bus.p99)} ({o.bus.n}, same setup)",
        f"{o.late.p50 / o.bus.p50:.0f}x" if o.bus.p50 > 0 else "—",
        "every schedule run once",
        ok,
    )


def due_minute(period_s: int, lead_s: float, every: bool) -> int:
    """The first multiple of `period_s` at least `lead_s` from now, in ms since the epoch.
    `every`: an `every_s` schedule is first due at the multiple after it is added, so this
    waits (at most a period) until the multiple before that one has passed."""
    due_ms = math.ceil((time.time() + lead_s) / period_s) * period_s * 1000
    if every:
        time.sleep(max(0.0, (due_ms - period_s * 1000) / 1000 + 0.05 - time.time()))
    return due_ms


def measure(suite: Suite, case: Case, n: int, nodes: int) -> Outcome:
    from bench.driver import Driver
    from bench.fig_scale import coordinators

    timeout_s = suite.pick(60.0, 30.0)
    with private_bus(suite, f"schedules-{case.key}") as bus:
        coords = coordinators(bus, case.coordinators, case.store, share=False)
        sim = start_recording_fleet(bus, nodes, timeout_s)
        events: queue.Queue[tuple[float, bytes]] = queue.Queue()
        listener = paho_thread("sched-events", bus.port, [(f"{bus.prefix}/jobs/+", 1)], events)
        driver = Driver(bus, follow=False)
        try:
            bus_lat = plain_jobs(driver, sim, nodes, suite.pick(100, 10))
            period, lead = PERIOD_S[suite.quick], LEAD_S[suite.quick]
            due_ms = due_minute(period, lead, every=suite.quick)
            suite.say(f"schedules ({case.label}): adding {n:,}, due at {due_ms // 1000}")
            add_s = add_schedules(bus, n, nodes, due_ms, period, suite.quick)
            if time.time() * 1000 > due_ms - 1000:
                raise BenchError(f"adding {n:,} schedules took {add_s:.1f} s: past the due time")
            arrived = collect(sim, n, due_ms, (due_ms + period * 1000) / 1000 - 1)
        finally:
            driver.close()
            close_paho(listener)
        for p in coords:  # their logs are complete, their record closed
            bus.suite.procs.stop(p)
        close_input(sim)
        record = read_record(bus, case)
        split, taken = read_logs(bus, case)
    jobs = job_events(events, bus)
    return tally(case, n, due_ms, period, arrived, jobs, bus_lat, add_s, record, split, taken)


def plain_jobs(driver: Driver, sim: Lines, nodes: int, count: int) -> Summary:
    """Submission (publish) to dispatch at the node, one plain job at a time."""
    lat = []
    for i in range(count + 5):  # 5 to warm up
        job_id, payload = driver.sign(node_name(i % nodes))
        t0 = time.time()
        driver.publish(payload)
        deadline = time.monotonic() + 10
        while True:
            line = next_line(sim, deadline)
            if line is None:
                raise BenchError(f"plain job {job_id}: no dispatch at its node within 10 s")
            got = line.split()
            if got[:2] == ["got", job_id]:
                break
        if i >= 5:
            lat.append(float(got[3]) - t0)
    return summarize(lat)


def next_line(sim: Lines, deadline: float) -> str | None:
    try:
        line = sim.lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return None
    if line == "" and sim.proc.poll() is not None:
        raise BenchError(f"the simulated fleet exited ({sim.proc.returncode})")
    return line


def add_schedules(bus: Bus, n: int, nodes: int, due_ms: int, period: int, quick: bool) -> float:
    """Add `n` schedules (all published at once, each with its correlation), each due first at
    `due_ms`; the time until every one was answered."""
    import datetime as dt

    from opsbay_mqtt.protocol import Reply, ScheduleChange, ScheduleSpec, decode, encode

    at = dt.datetime.fromtimestamp(due_ms / 1000, dt.UTC)
    when: dict[str, Any] = {"every_s": period} if quick else {"cron": f"{at:%M %H} * * *"}
    reply_id = f"bench-{secrets.token_hex(6)}"
    reply_topic = bus.topics.rpc_reply(reply_id)
    replies: queue.Queue[tuple[float, bytes]] = queue.Queue()
    client = paho_thread("sched-adds", bus.port, [(reply_topic, 1)], replies)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            spec = ScheduleSpec(
                **when, target=node_name(i % nodes), command="true", timeout_s=60,
                start_within_s=300,
            )  # fmt: skip
            change = ScheduleChange(
                op="add", name=f"sched-{i:05d}", change_id=secrets.token_hex(8),
                reply_to=reply_id, correlation=str(i), spec=spec,
            )  # fmt: skip
            client.publish(bus.topics.rpc_request, encode(change, bus.keyring, int(time.time())), 1)
        answered: set[str] = set()
        deadline = time.monotonic() + max(30.0, n / 20)
        topic = bus.topics.parse(reply_topic)
        while len(answered) < n:
            try:
                _, payload = replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"{len(answered)} of {n} schedule adds answered") from None
            reply, _auth = decode(payload, bus.keyring, Reply, topic)
            if not reply.ok:
                raise BenchError(f"schedule add {reply.correlation}: {reply.code}: {reply.error}")
            if reply.data["next_due_ms"] != due_ms:
                raise BenchError(f"schedule add {reply.correlation}: due {reply.data!r}")
            answered.add(reply.correlation)
        return time.perf_counter() - t0
    finally:
        close_paho(client)


def collect(sim: Lines, n: int, due_ms: int, until: float) -> list[tuple[str, str, float]]:
    """(job, node, arrival) of the dispatches from the due time on, until `n` distinct jobs
    arrived and GRACE_S more passed, or the wall clock reaches `until`."""
    out: list[tuple[str, str, float]] = []
    seen: set[str] = set()
    stop_at = until
    while True:
        left = stop_at - time.time()
        if left <= 0:
            return out
        line = next_line(sim, time.monotonic() + left)
        if line is None or not line.startswith("got "):
            continue
        _, job_id, node, t = line.split()
        if float(t) * 1000 < due_ms - 1000:
            continue  # a plain job's, late to the queue
        out.append((job_id, node, float(t)))
        seen.add(job_id)
        if len(seen) >= n and stop_at == until:
            stop_at = min(until, time.time() + GRACE_S)


def job_events(events: queue.Queue[tuple[float, bytes]], bus: Bus) -> dict[str, tuple[str, int]]:
    """job id -> (schedule, submitted_ms) of every scheduled job an event was seen of."""
    from opsbay_mqtt import signing

    jobs: dict[str, tuple[str, int]] = {}
    while True:
        try:
            _, payload = events.get_nowait()
        except queue.Empty:
            return jobs
        obj = signing.parse(payload)
        signing.verify(obj, bus.keyring)
        job = obj.get("job") or {}
        if obj.get("type") == "job" and job.get("schedule"):
            jobs[str(job["job_id"])] = (str(job["schedule"]), int(job["submitted_ms"]))


def read_record(bus: Bus, case: Case) -> dict[str, Any]:
    """From the coordinators' record, once they are stopped: jobs per schedule, and what
    became of each due time."""
    sql = {
        "jobs": "SELECT schedule, count(*) FROM jobs WHERE schedule IS NOT NULL GROUP BY schedule",
        "runs": "SELECT code, due_ms, count(*) FROM schedule_runs GROUP BY code, due_ms",
    }
    out: dict[str, Any] = {}
    if case.store:
        import psycopg

        with psycopg.connect(case.store, connect_timeout=10) as db:
            for k, q in sql.items():
                out[k] = db.execute(q).fetchall()
    else:
        path = bus.directory / "c1" / "opsbay.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            for k, q in sql.items():
                out[k] = db.execute(q).fetchall()
    return out


def read_logs(bus: Bus, case: Case) -> tuple[dict[str, int], int]:
    """Runs started by each coordinator (its log), and due times it found taken."""
    split, taken = {}, 0
    for k in range(1, case.coordinators + 1):
        path = bus.suite.procs.logs / f"{bus.name}-coordinator-c{k}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        split[f"c{k}"] = sum(1 for m in STARTED.finditer(text) if m[3] != "manual")
        taken += text.count("due time handled by another coordinator")
    return split, taken


def tally(
    case: Case, n: int, due_ms: int, period: int, arrived: list[tuple[str, str, float]],
    jobs: dict[str, tuple[str, int]], bus_lat: Summary, add_s: float, record: dict[str, Any],
    split: dict[str, int], taken: int,
) -> Outcome:  # fmt: skip
    first: dict[str, float] = {}
    dispatches = Counter(job_id for job_id, _, _ in arrived)
    for job_id, _, t in arrived:
        first.setdefault(job_id, t)
    # Runs of this due time: fired before the next one (every_s) could be.
    ours = {j: v for j, v in jobs.items() if due_ms <= v[1] < due_ms + period * 1000}
    unknown = [j for j in first if j not in jobs]
    if unknown:
        raise BenchError(f"{len(unknown)} dispatch(es) with no job event, e.g. {unknown[0]}")
    runs = [j for j in first if j in ours]
    per_schedule = Counter(ours[j][0] for j in runs)
    in_record = {str(name): int(c) for name, c in record.get("jobs", [])}
    dup = max(
        sum(c - 1 for c in per_schedule.values()), sum(c - 1 for c in in_record.values())
    )  # fmt: skip
    if not runs:
        raise BenchError(f"no run reached its node; record: {record}")
    by_check: dict[float, list[float]] = {}
    for j in runs:
        by_check.setdefault(ours[j][1] / 1000, []).append(first[j] - due_ms / 1000)
    return Outcome(
        case=case,
        expected=n,
        due_ms=due_ms,
        period=period,
        runs=len(runs),
        duplicates=dup,
        missing=n - len(per_schedule),
        early=sum(1 for _, submitted in jobs.values() if submitted < due_ms),
        redispatched=sum(dispatches[j] - 1 for j in runs),
        late=summarize([first[j] - due_ms / 1000 for j in runs]),
        fired=summarize([(ours[j][1] - due_ms) / 1000 for j in runs]),
        checks=[
            (fired - due_ms / 1000, len(ts), min(ts), max(ts))
            for fired, ts in sorted(by_check.items())
        ],
        bus=bus_lat,
        add_s=add_s,
        split=split,
        taken=taken,
        record={k: [list(r) for r in v] for k, v in record.items() if k == "runs"},
    )


def main() -> int:
    """The recording fleet (see the module's docstring)."""
    from opsbay_mqtt.signing import Keyring
    from opsbay_mqtt.topics import Topics

    ap = argparse.ArgumentParser(prog="python -m bench.fig_schedules")
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    fleet = RecordingFleet(
        [args.port],
        Topics(args.prefix),
        Keyring.shared(os.environ["BENCH_SECRET"]),
        [node_name(i) for i in range(args.first, args.first + args.count)],
    )

    def stop(signum: int, frame: Any) -> None:
        fleet.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return fleet.run()


if __name__ == "__main__":
    sys.exit(main())
