"""Delivery guarantees through a real Mosquitto: offline nodes, redelivery, crashes, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from opsbay_mqtt.protocol import NodeStatus, encode
from opsbay_mqtt.signing import Keyring
from tests.conftest import restart
from tests.helpers import Bus, stop_process, wait_until


def state_of(bus: Bus, job_id: str) -> str:
    out = bus.cli("result", job_id, "--json")
    return str(json.loads(out.stdout)["state"]) if out.stdout else f"exit {out.returncode}"


def wait_state(bus: Bus, job_id: str, state: str, timeout: float = 15) -> dict[str, object]:
    wait_until(lambda: state_of(bus, job_id) == state, timeout, f"job {job_id} {state}", 0.2)
    return dict(bus.cli_json("result", job_id))


def submit(bus: Bus, *args: str) -> str:
    out = bus.cli("submit", "-t", "n1", *args)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def kill9(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cli_in_background(bus: Bus, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "opsbay_mqtt", *args],
        env=bus.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_job_for_an_offline_node_runs_when_it_returns(bus: Bus) -> None:
    bus.coordinator()
    stop_process(bus.worker("n1"))
    job_id = submit(bus, "-c", "echo queued", "--start-by", "60s")
    assert state_of(bus, job_id) == "pending"
    bus.worker("n1")
    job = wait_state(bus, job_id, "succeeded")
    assert job["executions"][0]["stdout"] == "queued\n"  # type: ignore[index]


def test_job_past_its_start_by_deadline_expires_and_never_runs(bus: Bus, tmp_path: Path) -> None:
    bus.coordinator("--lost-grace", "1")
    stop_process(bus.worker("n1"))
    marker = tmp_path / "ran"
    out = bus.cli("submit", "-t", "n1", "-c", f"touch {marker}", "--start-by", "1s", "--wait")
    assert out.returncode == 68, out.stderr
    assert "expired" in out.stderr
    bus.worker("n1")
    # The node is back and serving; the expired job is still not run.
    assert bus.cli("submit", "-t", "n1", "-c", "true", "--wait").returncode == 0
    assert not marker.exists()


def test_redelivered_dispatch_resends_the_result_and_never_reruns(
    running: Bus, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    watch = running.watch("#")
    out = running.cli("submit", "-t", "n1", "-c", f"echo once >> {marker}", "--wait", "--json")
    job_id = json.loads(out.stdout)["job_id"]
    jobs_topic = f"{running.prefix}/nodes/n1/jobs"
    watch.wait_for(lambda t, b, r: t == jobs_topic, "the dispatch")
    dispatch = next(p for t, p, _ in watch.seen if t == jobs_topic)
    running.publish(jobs_topic, dispatch)
    results = f"{running.prefix}/results/n1/{job_id}"
    wait_until(
        lambda: len(watch.find(lambda t, b, r: t == results and b["state"] == "succeeded")) == 2,
        10,
        "the stored result re-sent",
    )
    assert marker.read_text() == "once\n"
    assert "re-sending its result" in running.log("worker-n1")


def test_worker_killed_mid_job_reports_lost_after_restart(bus: Bus, tmp_path: Path) -> None:
    bus.coordinator()
    worker = bus.worker("n1")
    pidfile = tmp_path / "pid"
    job_id = submit(bus, "-c", f"echo $$ > {pidfile}; sleep 60")
    wait_state(bus, job_id, "running")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the job's pid")
    shell = int(pidfile.read_text())
    kill9(worker)
    assert alive(shell)  # the job outlived its worker...
    bus.worker("n1")
    job = wait_state(bus, job_id, "lost")
    reason = str(job["executions"][0]["reason"])  # type: ignore[index]
    assert "not re-run" in reason and "killed" in reason
    wait_until(lambda: not alive(shell), 10, "the leftover job killed")  # ...but not for long


def test_coordinator_marks_lost_when_the_worker_never_returns(bus: Bus, tmp_path: Path) -> None:
    bus.coordinator("--lost-grace", "1")
    worker = bus.worker("n1")
    pidfile = tmp_path / "pid"
    job_id = submit(bus, "-c", f"echo $$ > {pidfile}; exec sleep 60", "--timeout", "2")
    wait_state(bus, job_id, "running")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "the job's pid")
    kill9(worker)
    try:
        job = wait_state(bus, job_id, "lost", timeout=20)
        assert "no result" in str(job["executions"][0]["reason"])  # type: ignore[index]
        assert bus.cli("result", job_id).returncode == 70
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_results_sent_while_the_coordinator_is_down_reach_the_record_and_the_waiter(
    bus: Bus,
) -> None:
    coordinator = bus.coordinator()
    bus.worker("n1")
    watch = bus.watch("results/#")
    waiter = cli_in_background(bus, "submit", "-t", "n1", "-c", "sleep 2; echo done", "--wait")
    try:
        watch.wait_for(lambda t, b, r: b.get("state") == "running", "the job running")
        kill9(coordinator)
        watch.wait_for(lambda t, b, r: b.get("state") == "succeeded", "the result published")
        bus.coordinator()
        out, err = waiter.communicate(timeout=60)
    finally:
        stop_process(waiter)  # type: ignore[arg-type]
    assert (waiter.returncode, out) == (0, "done\n"), err
    assert [j["state"] for j in bus.cli_json("results")] == ["succeeded"]


def test_submission_made_while_the_coordinator_is_down_is_processed_on_return(bus: Bus) -> None:
    kill9(bus.coordinator())
    bus.worker("n1")
    watch = bus.watch("submit")
    waiter = cli_in_background(bus, "submit", "-t", "n1", "-c", "echo later", "--wait")
    try:
        # Published while no coordinator runs: the broker holds it for the coordinator's session.
        watch.wait_for(lambda t, b, r: b.get("type") == "submit", "the submission published")
        assert waiter.poll() is None
        bus.coordinator()
        out, err = waiter.communicate(timeout=60)
    finally:
        stop_process(waiter)  # type: ignore[arg-type]
    assert (waiter.returncode, out) == (0, "later\n"), err


def test_same_job_id_twice_makes_one_job(running: Bus, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job_id = str(uuid.uuid4())
    args = ("submit", "-t", "n1", "-c", f"echo once >> {marker}", "--job-id", job_id, "--wait")
    first, second = running.cli(*args), running.cli(*args)
    assert (first.returncode, second.returncode) == (0, 0)
    assert marker.read_text() == "once\n"
    assert [j["job_id"] for j in running.cli_json("results")] == [job_id]
    other = running.cli("submit", "-t", "n1", "-c", "echo different", "--job-id", job_id)
    assert other.returncode == 77 and "job_id_conflict" in other.stderr


def test_a_late_offline_status_from_an_old_connection_never_wins(running: Bus) -> None:
    wait_until(
        lambda: [n for n in running.cli_json("nodes") if n["state"] == "online"], 10, "online"
    )
    (node,) = running.cli_json("nodes")
    stale = NodeStatus(node="n1", state="offline", session=node["session"] - 1, published_ms=1)
    payload = encode(stale, Keyring.shared(running.secret), int(time.time()))
    running.publish(f"{running.prefix}/nodes/n1/status", payload)
    assert running.cli("submit", "-t", "n1", "-c", "true", "--wait").returncode == 0
    assert [n["state"] for n in running.cli_json("nodes")] == ["online"]


def test_queue_limit_per_node_refuses_clearly(bus: Bus) -> None:
    bus.coordinator("--max-open-per-node", "1")
    stop_process(bus.worker("n1"))
    submit(bus, "-c", "true")
    out = bus.cli("submit", "-t", "n1", "-c", "true")
    assert out.returncode == 77 and "queue_full" in out.stderr


def test_everything_reconnects_after_a_broker_restart(own: Bus) -> None:
    own.coordinator()
    worker = own.worker("n1")
    assert own.cli("submit", "-t", "n1", "-c", "true", "--wait").returncode == 0
    stop_process(worker)
    job_id = submit(own, "-c", "echo survived", "--start-by", "2m")  # queued for n1
    stop_process(own.broker.process)
    assert own.cli("submit", "-t", "n1", "-c", "true").returncode == 69
    restart(own)
    own.worker("n1")
    job = wait_state(own, job_id, "succeeded", timeout=60)
    assert job["executions"][0]["stdout"] == "survived\n"  # type: ignore[index]
    out = own.cli("submit", "-t", "n1", "-c", "echo after", "--wait")
    assert (out.returncode, out.stdout) == (0, "after\n")
    assert "reconnected" in own.log("coordinator")


@pytest.mark.parametrize("flag", ["--start-by", "--expires"])
def test_start_by_takes_a_duration(running: Bus, flag: str) -> None:
    bad = running.cli("submit", "-t", "n1", "-c", "true", flag, "soon")
    assert bad.returncode == 2 and "--start-by" in bad.stderr
    assert running.cli("submit", "-t", "n1", "-c", "true", flag, "90s", "--wait").returncode == 0


def test_a_worker_reconnects_by_itself_after_a_broker_restart(own: Bus) -> None:
    """The worker drives its own connection (no paho network thread): it must notice the
    broker going away, come back when it returns, and take jobs again, without a restart."""
    own.coordinator()
    worker = own.worker("n1")
    assert own.cli("submit", "-t", "n1", "-c", "true", "--wait").returncode == 0
    stop_process(own.broker.process)
    own.wait_log("worker-n1", "disconnected from")
    restart(own)
    own.wait_log("worker-n1", "reconnected to", timeout=60)
    out = own.cli("submit", "-t", "n1", "-c", "echo again", "--wait")
    assert (out.returncode, out.stdout) == (0, "again\n")
    assert worker.poll() is None


def test_a_worker_told_to_stop_reports_the_job_it_is_running_then_exits(
    bus: Bus, tmp_path: Path
) -> None:
    """While it waits for its running jobs, a stopping worker still talks to the broker: their
    results go out as they end, then it says it is offline and exits."""
    bus.coordinator()
    worker = bus.worker("n1")
    go = tmp_path / "go"
    command = f"while [ ! -e {go} ]; do sleep 0.05; done; echo finished"
    job_id = submit(bus, "-c", command, "--timeout", "60")
    wait_state(bus, job_id, "running")
    worker.send_signal(signal.SIGTERM)
    bus.wait_log("worker-n1", "waiting for running jobs")
    go.touch()
    job = wait_state(bus, job_id, "succeeded")
    assert job["executions"][0]["stdout"] == "finished\n"  # type: ignore[index]
    assert worker.wait(15) == 0
    nodes = bus.cli_json("nodes")
    assert [(n["node"], n["state"]) for n in nodes] == [("n1", "offline")]
