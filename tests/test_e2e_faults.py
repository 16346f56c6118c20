"""Fault injection: hundreds of jobs while workers and the coordinator are killed (-9) and
restarted at random and the broker restarts twice: once with its persistence file, once without
(every session, queued message and retained status lost). Afterwards every accepted job has
exactly one terminal state, `opsbay result` agrees with the store, and no command ran twice.
The same with three coordinators on one PostgreSQL record, any of them killed at random.

The seed is printed; replay a failure with OPSBAY_FAULT_SEED=<seed>. OPSBAY_FAULT_JOBS sets the
number of jobs (default 300)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from opsbay_mqtt.client import Client, ClientConfig
from opsbay_mqtt.errors import BrokerError, NotAcknowledged
from opsbay_mqtt.protocol import Rejected
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.states import TERMINAL
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import BrokerURL
from tests.conftest import start_broker
from tests.harness import Broker
from tests.helpers import Bus, stop_process, wait_until
from tests.nats import start_nats_cluster

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_server, pg_url

NODES = ("n1", "n2")
JOBS = int(os.environ.get("OPSBAY_FAULT_JOBS", "300"))
SUBMIT_SECONDS = 15.0
FAULTS = 12


def stored(db: Path | str) -> dict[str, tuple[str, list[str]]]:
    """Every job's state and its executions' states, read from the record itself."""
    if isinstance(db, str):  # a PostgreSQL record
        with psycopg.connect(db) as pg:
            jobs = dict(pg.execute("SELECT job_id, state FROM jobs").fetchall())
            rows = pg.execute("SELECT job_id, state FROM executions").fetchall()
    else:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            jobs = dict(con.execute("SELECT job_id, state FROM jobs").fetchall())
            rows = con.execute("SELECT job_id, state FROM executions").fetchall()
        finally:
            con.close()
    execs: dict[str, list[str]] = {}
    for job_id, state in rows:
        execs.setdefault(job_id, []).append(state)
    return {j: (s, execs.get(j, [])) for j, s in jobs.items()}


def check_schedules(bus: Bus, db: Path | str, marks: Path, context: str) -> None:
    """Each due time of each schedule, from its first to its last recorded, was handled once
    (run, or skipped with a reason): none twice, none silently left out; and each run's
    command ran at most once on its node."""
    for node in NODES:  # no more runs from here on
        wait_until(
            lambda node=node: bus.cli("schedule", "pause", f"s-{node}").returncode == 0,  # type: ignore[misc]
            60,
            f"s-{node} paused ({context})",
        )
    query = "SELECT name, due_ms, job_id, code, count, last_due_ms FROM schedule_runs"
    jobs_q = "SELECT job_id, state, schedule FROM jobs WHERE schedule IS NOT NULL"

    def read() -> tuple[list[tuple[object, ...]], dict[str, tuple[str, str]]]:
        if isinstance(db, str):
            with psycopg.connect(db) as con:
                return con.execute(query).fetchall(), {
                    j: (st, sc) for j, st, sc in con.execute(jobs_q).fetchall()
                }
        con = sqlite3.connect(db)
        try:
            return con.execute(query).fetchall(), {
                j: (st, sc) for j, st, sc in con.execute(jobs_q).fetchall()
            }
        finally:
            con.close()

    wait_until(
        lambda: all(st in TERMINAL for st, _ in read()[1].values()), 120,
        f"every scheduled run terminal ({context})", 0.5,
    )  # fmt: skip
    rows, jobs = read()
    for node in NODES:
        name = f"s-{node}"
        mine = [r for r in rows if r[0] == name]
        covered: list[int] = []
        for _, due, _, _, count, last in mine:
            assert isinstance(due, int) and isinstance(count, int)
            end = last if isinstance(last, int) else due
            covered += list(range(due, end + 1, 10_000))
            assert len(range(due, end + 1, 10_000)) == count, (name, due, count, context)
        covered.sort()
        assert covered, f"{name} never ran ({context})"
        assert covered == list(range(covered[0], covered[-1] + 1, 10_000)), (name, context)
        runs = [r[2] for r in mine if r[2] is not None]
        theirs = [j for j, (_, sc) in jobs.items() if sc == name]
        assert sorted(runs) == sorted(theirs), f"{name}: a job without its run ({context})"
        succeeded = sum(1 for j in theirs if jobs[j][0] == "succeeded")
        mark = marks / f"schedule-{node}"
        ran = len(mark.read_text().splitlines()) if mark.exists() else 0
        assert succeeded <= ran <= len(theirs), (name, succeeded, ran, len(theirs), context)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+nats"])
def mode(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(the record: "" for SQLite or a PostgreSQL URL, whether the broker is a NATS cluster):
    one coordinator on SQLite and one Mosquitto; three coordinators on one PostgreSQL database
    and one Mosquitto; the same three on a 3-server NATS cluster."""
    if request.param == "sqlite":
        return "", False
    return str(request.getfixturevalue("pg_url")), request.param.endswith("nats")


@pytest.mark.timeout(400)
def test_nothing_lost_nothing_run_twice_under_random_faults(
    tmp_path: Path, mode: tuple[str, bool]
) -> None:
    seed = int(os.environ.get("OPSBAY_FAULT_SEED", random.randrange(2**32)))
    print(f"\nfault-injection seed: {seed} (replay with OPSBAY_FAULT_SEED={seed})")
    rng = random.Random(seed)
    marks = tmp_path / "marks"
    marks.mkdir()
    store_url, on_nats = mode
    cluster = start_nats_cluster(tmp_path / "nats") if on_nats else None
    if cluster is not None:
        first = cluster.servers[0]
        assert first.process is not None
        broker = Broker(port=first.mqtt_port, process=first.process, conf=first.conf, log=first.log)
    else:
        broker = start_broker(tmp_path / "broker")
    bus = Bus(broker=broker, tmp=tmp_path)
    if cluster is not None:  # every process, and the test's client, gets the whole cluster
        bus.broker_url = cluster.urls
    coordinators = ["coordinator"] if not store_url else ["c1", "c2", "c3"]

    def start_coordinator(name: str) -> subprocess.Popen[bytes]:
        if not store_url:
            return bus.coordinator("--lost-grace", "2")
        p = bus.start(
            f"coordinator-{name}", "coordinator", "--data-dir", str(tmp_path / f"data-{name}"),
            "--store", store_url, "--name", name, "--lost-grace", "2",
        )  # fmt: skip
        bus.wait_log(f"coordinator-{name}", "coordinator: ready", timeout=30)
        return p

    procs = {name: start_coordinator(name) for name in coordinators}
    for node in NODES:
        procs[node] = bus.worker(node)
    for node in NODES:  # a schedule per node, due every 10 s through the faults
        added = bus.cli("schedule", "add", f"s-{node}", "--every", "10s", "-t", node,
                        "-c", f"echo run >> {marks / ('schedule-' + node)}")  # fmt: skip
        assert added.returncode == 0, added.stderr
    events = bus.watch("jobs/#")
    faults: list[str] = []
    done = threading.Event()

    def restart(name: str) -> None:
        if name in coordinators:
            procs[name] = start_coordinator(name)
        else:
            procs[name] = bus.worker(name)

    def chaos() -> None:
        keeps, wipes = rng.sample(range(FAULTS), 2)
        for i in range(FAULTS):
            if done.wait(rng.uniform(0.3, SUBMIT_SECONDS / FAULTS)):
                return
            if cluster is not None and i in (keeps, wipes):
                down = [s for s in cluster.servers if not s.running]
                for server in down:  # one server down at a time: bring the last one back
                    cluster.start(server)
                server = rng.choice([s for s in cluster.servers if s not in down])
                faults.append(f"kill -9 NATS server {server.name}")
                cluster.kill(server)
                continue
            if i in (keeps, wipes):
                faults.append("broker restart" + (" without its data" if i == wipes else ""))
                stop_process(bus.broker.process)
                if i == wipes:
                    for f in (tmp_path / "broker" / "broker-data").glob("*"):
                        f.unlink()
                bus.broker = start_broker(tmp_path / "broker", port=broker.port)
                continue
            name = rng.choice([*coordinators, *NODES])
            faults.append(f"kill -9 {name}")
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait(10)
            restart(name)

    chaos_thread = threading.Thread(target=chaos)
    cfg = ClientConfig(
        url=BrokerURL.parse_list(bus.env()["OPSBAY_BROKER"]),
        topics=Topics(bus.prefix),
        keyring=Keyring.shared(bus.secret),
    )
    submitted: list[str] = []
    given_up: list[str] = []  # never acknowledged: must never run
    try:  # whatever fails, every process started here is stopped
        try:
            chaos_thread.start()
            pace = SUBMIT_SECONDS / JOBS
            client = Client(cfg).__enter__()
            for i in range(JOBS):
                h = f"{rng.getrandbits(128):032x}"
                job_id = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:]}"
                command = f"echo {i} >> {marks / job_id}; sleep 0.{rng.randrange(1, 4)}"
                target = rng.choice(NODES)  # once: a retry must be the same submission
                deadline = time.monotonic() + 60
                while True:  # the broker may be restarting: retry, same job id, until accepted
                    try:
                        client.submit(
                            target=target, command=command, timeout_s=10, start_by_s=120,
                            job_id=job_id, accept_s=20,
                        )  # fmt: skip
                        # As `opsbay submit` does: sent again until a coordinator takes it.
                        got = client.wait(job_id, None, until=lambda j: True)
                        assert not isinstance(got, Rejected), (got, seed)
                        submitted.append(job_id)
                        break
                    except NotAcknowledged:
                        given_up.append(job_id)
                        break
                    except BrokerError:
                        assert time.monotonic() < deadline, f"could not submit (seed {seed})"
                        done.wait(0.2)  # pacing a retry, not waiting for a condition
                done.wait(pace)  # pacing the load
            client.__exit__()
            chaos_thread.join(60)
        finally:
            done.set()
            chaos_thread.join(60)
        for server in cluster.servers if cluster is not None else []:
            if not server.running:  # the cluster whole again, for what follows
                cluster.start(server)
        for name, p in procs.items():  # whatever the chaos left dead comes back
            if p.poll() is not None:
                restart(name)
        db: Path | str = store_url or tmp_path / "data" / "opsbay.db"

        def all_terminal() -> list[str]:
            record = stored(db)
            return [j for j in submitted if record.get(j, ("?", []))[0] not in TERMINAL]

        wait_until(lambda: not all_terminal(), 120, f"every job terminal (seed {seed})", 0.5)
        context = f"seed {seed}, faults {faults}"
        check_schedules(bus, db, marks, context)
        record = stored(db)
        states: dict[str, int] = {}
        for job_id in submitted:
            state, executions = record[job_id]
            states[state] = states.get(state, 0) + 1
            assert len(executions) == 1 and executions[0] == state, (job_id, context)
            mark = marks / job_id
            lines = mark.read_text().splitlines() if mark.exists() else []
            assert len(lines) <= 1, f"job {job_id} ran {len(lines)} times ({context})"
            if state == "succeeded":
                assert len(lines) == 1, (job_id, context)
        for job_id in given_up:  # the submitter gave up: never stored, never run
            assert job_id not in record and not (marks / job_id).exists(), (job_id, context)
        print(f"states: {states}; faults: {faults}; given up: {len(given_up)}")
        assert states.get("succeeded", 0) > JOBS // 2, (states, context)

        # Terminal means final: no job was announced with two different terminal states.
        announced: dict[str, set[str]] = {}
        for body in events.find(lambda t, b, r: b.get("type") == "job"):
            job = body["job"]
            if job["state"] in TERMINAL:
                announced.setdefault(job["job_id"], set()).add(job["state"])
        assert all(len(s) == 1 for s in announced.values()), (announced, context)

        # The CLI reads what the store holds.
        for job_id in rng.sample(submitted, 15):
            out = bus.cli("result", job_id, "--json")
            assert out.returncode in (0, 1, 124, 68, 70, 80), (out.returncode, out.stderr, context)
            assert json.loads(out.stdout)["state"] == record[job_id][0], (job_id, context)
        assert all(p.poll() is None for p in procs.values())
    finally:
        bus.stop()
        if cluster is not None:
            cluster.stop()
        else:
            stop_process(bus.broker.process)
