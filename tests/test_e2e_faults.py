"""Fault injection: hundreds of jobs while workers and the coordinator are killed (-9) and
restarted at random and the broker restarts twice: once with its persistence file, once without
(every session, queued message and retained status lost). Afterwards every accepted job has
exactly one terminal state, `opsbay result` agrees with the store, and no command ran twice.

The seed is printed; replay a failure with OPSBAY_FAULT_SEED=<seed>. OPSBAY_FAULT_JOBS sets the
number of jobs (default 300)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from opsbay_mqtt.client import Client, ClientConfig
from opsbay_mqtt.errors import BrokerError, NotAcknowledged
from opsbay_mqtt.protocol import Rejected
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.states import TERMINAL
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import BrokerURL
from tests.conftest import start_broker
from tests.helpers import Bus, stop_process, wait_until

NODES = ("n1", "n2")
JOBS = int(os.environ.get("OPSBAY_FAULT_JOBS", "300"))
SUBMIT_SECONDS = 15.0
FAULTS = 12


def stored(db: Path) -> dict[str, tuple[str, list[str]]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        jobs = dict(con.execute("SELECT job_id, state FROM jobs").fetchall())
        execs: dict[str, list[str]] = {}
        for job_id, state in con.execute("SELECT job_id, state FROM executions"):
            execs.setdefault(job_id, []).append(state)
    finally:
        con.close()
    return {j: (s, execs.get(j, [])) for j, s in jobs.items()}


@pytest.mark.timeout(400)
def test_nothing_lost_nothing_run_twice_under_random_faults(tmp_path: Path) -> None:
    seed = int(os.environ.get("OPSBAY_FAULT_SEED", random.randrange(2**32)))
    print(f"\nfault-injection seed: {seed} (replay with OPSBAY_FAULT_SEED={seed})")
    rng = random.Random(seed)
    marks = tmp_path / "marks"
    marks.mkdir()
    broker = start_broker(tmp_path / "broker")
    bus = Bus(broker=broker, tmp=tmp_path)
    coordinator_args = ("--lost-grace", "2")
    procs = {"coordinator": bus.coordinator(*coordinator_args)}
    for node in NODES:
        procs[node] = bus.worker(node)
    events = bus.watch("jobs/#")
    faults: list[str] = []
    done = threading.Event()

    def restart(name: str) -> None:
        if name == "coordinator":
            procs[name] = bus.coordinator(*coordinator_args)
        else:
            procs[name] = bus.worker(name)

    def chaos() -> None:
        keeps, wipes = rng.sample(range(FAULTS), 2)
        for i in range(FAULTS):
            if done.wait(rng.uniform(0.3, SUBMIT_SECONDS / FAULTS)):
                return
            if i in (keeps, wipes):
                faults.append("broker restart" + (" without its data" if i == wipes else ""))
                stop_process(bus.broker.process)
                if i == wipes:
                    for f in (tmp_path / "broker" / "broker-data").glob("*"):
                        f.unlink()
                bus.broker = start_broker(tmp_path / "broker", port=broker.port)
                continue
            name = rng.choice(["coordinator", *NODES])
            faults.append(f"kill -9 {name}")
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait(10)
            restart(name)

    chaos_thread = threading.Thread(target=chaos)
    cfg = ClientConfig(
        url=BrokerURL.parse(broker.url),
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
        for name, p in procs.items():  # whatever the chaos left dead comes back
            if p.poll() is not None:
                restart(name)
        db = tmp_path / "data" / "opsbay.db"

        def all_terminal() -> list[str]:
            record = stored(db)
            return [j for j in submitted if record.get(j, ("?", []))[0] not in TERMINAL]

        wait_until(lambda: not all_terminal(), 120, f"every job terminal (seed {seed})", 0.5)
        record = stored(db)
        context = f"seed {seed}, faults {faults}"
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
            assert json.loads(out.stdout)["state"] == record[job_id][0], (job_id, context)
        assert all(p.poll() is None for p in procs.values())
    finally:
        bus.stop()
        stop_process(bus.broker.process)
