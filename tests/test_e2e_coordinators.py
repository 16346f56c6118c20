"""Several coordinators on one PostgreSQL record, on one Mosquitto (real processes): jobs flow
through whichever is alive; a coordinator killed with -9 loses nothing and runs nothing twice;
a waiting `submit --wait` completes through another one. With `--share`, the broker splits the
requests between them (MQTT 5 shared subscriptions)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from opsbay_mqtt.states import TERMINAL
from tests.helpers import Bus, stop_process, wait_until

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_url, a database of its own for each test


def start_coordinator(bus: Bus, name: str, pg_url: str, *args: str) -> subprocess.Popen[bytes]:
    log = f"coordinator-{name}"
    data = bus.tmp / f"data-{name}"
    p = bus.start(log, "coordinator", "--data-dir", str(data), "--name", name, "--store", pg_url,
                  "--lost-grace", "2", *args)  # fmt: skip
    bus.wait_log(log, "coordinator: ready", timeout=30)
    return p


def submit(bus: Bus, marks: Path, n: int, node: str, extra: str = "") -> subprocess.Popen[str]:
    """`opsbay submit --wait` in the background; its command leaves a mark each time it runs."""
    command = f"echo {n} >> {marks / str(n)}{extra}"
    return subprocess.Popen(
        [sys.executable, "-m", "opsbay_mqtt", "submit", "-t", node, "-c", command, "--wait",
         "--json", "--timeout", "30s"],
        env=bus.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(p: subprocess.Popen[str]) -> dict[str, object]:
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, (p.returncode, err)
    job: dict[str, object] = json.loads(out)
    return job


def recorded(pg_url: str) -> dict[str, tuple[str, list[str]]]:
    with psycopg.connect(pg_url) as db:
        jobs = dict(db.execute("SELECT job_id, state FROM jobs").fetchall())
        execs: dict[str, list[str]] = {}
        for job_id, state in db.execute("SELECT job_id, state FROM executions"):
            execs.setdefault(job_id, []).append(state)
    return {j: (s, execs.get(j, [])) for j, s in jobs.items()}


def ran_once(marks: Path, count: int) -> None:
    for n in range(count):
        lines = (marks / str(n)).read_text().splitlines()
        assert lines == [str(n)], f"job {n} ran {len(lines)} times"


def test_jobs_flow_through_whichever_coordinator_is_alive(bus: Bus, pg_url: str) -> None:
    marks = bus.tmp / "marks"
    marks.mkdir()
    c1 = start_coordinator(bus, "c1", pg_url)
    c2 = start_coordinator(bus, "c2", pg_url)
    bus.worker("n1")
    bus.worker("n2")
    # Both receive every request (no --share): each job is accepted, run and answered once.
    jobs = [finish(p) for p in [submit(bus, marks, n, f"n{n % 2 + 1}") for n in range(6)]]
    assert {j["state"] for j in jobs} == {"succeeded"}
    accepted = bus.log("coordinator-c1").count(": accepted from ") + bus.log(
        "coordinator-c2"
    ).count(": accepted from ")
    assert accepted == 6, "each job accepted by exactly one coordinator"

    # One dies with -9 while a job runs that a client waits for: the other completes it.
    waiting = submit(bus, marks, 6, "n1", extra="; sleep 2")
    wait_until(lambda: (marks / "6").exists(), 30, "job 6 running")
    c1.send_signal(signal.SIGKILL)
    c1.wait(10)
    assert finish(waiting)["state"] == "succeeded"
    jobs += [finish(p) for p in [submit(bus, marks, n, "n2") for n in range(7, 10)]]

    # The dead one comes back; the other dies: it carries on from the same record.
    start_coordinator(bus, "c1", pg_url)
    stop_process(c2, sig=signal.SIGKILL)
    jobs += [finish(p) for p in [submit(bus, marks, n, "n1") for n in range(10, 12)]]
    ran_once(marks, 12)
    record = recorded(pg_url)
    assert len(record) == 12
    for state, executions in record.values():
        assert state == "succeeded" and executions == ["succeeded"]
    listed = bus.cli_json("results", "--limit", "50")
    assert {j["state"] for j in listed} == {"succeeded"} and len(listed) == 12


def test_with_share_the_broker_splits_requests_between_coordinators(bus: Bus, pg_url: str) -> None:
    marks = bus.tmp / "marks"
    marks.mkdir()
    start_coordinator(bus, "c1", pg_url, "--share", "coordinators")
    start_coordinator(bus, "c2", pg_url, "--share", "coordinators")
    bus.worker("n1")
    procs = [submit(bus, marks, n, "n1") for n in range(10)]
    jobs = [finish(p) for p in procs]
    assert {j["state"] for j in jobs} == {"succeeded"}
    by_c1 = bus.log("coordinator-c1").count(": accepted from ")
    by_c2 = bus.log("coordinator-c2").count(": accepted from ")
    assert by_c1 + by_c2 == 10 and by_c1 > 0 and by_c2 > 0, (by_c1, by_c2)
    ran_once(marks, 10)
    assert all(state in TERMINAL for state, _ in recorded(pg_url).values())


def test_share_needs_mqtt5(bus: Bus, pg_url: str) -> None:
    out = bus.cli(
        "coordinator", "--store", pg_url, "--share", "g",
        OPSBAY_BROKER=f"{bus.broker.url}?version=3.1.1",
    )  # fmt: skip
    assert out.returncode == 78 and "needs MQTT 5" in out.stderr


def test_a_second_coordinator_with_the_same_name_is_refused(bus: Bus, pg_url: str) -> None:
    """Two with one name would take the broker session from each other for ever."""
    start_coordinator(bus, "c1", pg_url)
    twin = bus.cli("coordinator", "--store", pg_url, "--name", "c1", "--data-dir",
                   str(bus.tmp / "twin"), timeout=60)  # fmt: skip
    assert twin.returncode == 78, twin.stderr
    assert "another coordinator runs as 'opsbay-coordinator:" in twin.stderr


def test_name_and_share_need_a_postgresql_record(bus: Bus) -> None:
    for option in (["--name", "c1"], ["--share", "g"]):
        out = bus.cli("coordinator", "--data-dir", str(bus.tmp / "sq"), *option)
        assert out.returncode == 78 and "--store postgresql://" in out.stderr, out.stderr
