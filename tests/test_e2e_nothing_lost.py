"""Issue 11's holes in "nothing lost", each through a real Mosquitto: dispatches the broker never
queued, submissions nobody received, two agents with one node name, daemons asked to stop while
they cannot connect."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, restart
from tests.helpers import Bus, stop_process, wait_until


def background(bus: Bus, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "opsbay_mqtt", *args],
        env=bus.env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"still running after {timeout} s; stderr so far: {err}") from None
    return p.returncode, out, err


def wait_succeeded(bus: Bus, job_id: str, timeout: float) -> None:
    def state() -> object:
        return json.loads(bus.cli("result", job_id, "--json").stdout or "{}").get("state")

    wait_until(lambda: state() == "succeeded", timeout, f"job {job_id} succeeded", 0.2)


def runs_of(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


# -- 1. a dispatch the broker never queued reaches its node when the node comes online


def test_a_job_for_a_node_never_seen_runs_once_when_its_agent_first_connects(
    bus: Bus, tmp_path: Path
) -> None:
    bus.coordinator()
    marker = tmp_path / "ran"
    out = bus.cli("submit", "-t", "fresh-01", "-c", f"echo x >> {marker}", "--start-by", "2m")
    assert out.returncode == 0, out.stderr  # accepted, waiting for its node
    job_id = out.stdout.strip()
    bus.worker("fresh-01")
    wait_succeeded(bus, job_id, 30)
    assert runs_of(marker) == 1


def test_a_dispatch_lost_by_a_broker_restarted_without_its_data_is_sent_again(
    own: Bus, tmp_path: Path
) -> None:
    own.coordinator()
    stop_process(own.worker("n1"))  # offline: its dispatch waits in its broker session
    marker = tmp_path / "ran"
    out = own.cli("submit", "-t", "n1", "-c", f"echo x >> {marker}", "--start-by", "2m")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    # The broker loses everything: sessions, queued dispatches and retained messages.
    restart(own, keep_data=False)
    own.wait_log("coordinator", "reconnected", 40)
    own.worker("n1")
    wait_succeeded(own, job_id, 40)
    assert runs_of(marker) == 1


# -- 2. a submission nobody received


def test_submit_wait_sends_again_until_a_coordinator_first_starts(bus: Bus) -> None:
    watcher = bus.watch("submit")
    p = background(bus, "submit", "-t", "n1", "-c", "echo late but there", "--wait")
    # The first copy is dropped by the broker: nobody has ever subscribed for this prefix.
    watcher.wait_for(lambda t, b, r: b.get("type") == "submit", "the first copy of the submission")
    bus.coordinator()
    bus.worker("n1")
    code, out, err = finish(p, 60)
    assert (code, out) == (0, "late but there\n"), err
    assert len(watcher.find(lambda t, b, r: b.get("type") == "submit")) >= 2  # sent again


def test_with_no_coordinator_submit_says_why_then_gives_up_and_the_job_never_runs(
    bus: Bus, tmp_path: Path
) -> None:
    # The coordinator has a session on the broker, so the copies wait there while it is down.
    stop_process(bus.coordinator())
    marker = tmp_path / "ran"
    p = background(bus, "submit", "-t", "n1", "-c", f"touch {marker}", "--wait",
                   "--ack-timeout", "12s")  # fmt: skip
    code, _out, err = finish(p, 60)  # before: never returned
    assert code == 69, err
    assert "no coordinator has acknowledged the submission after 1" in err, err  # after ~10 s
    assert bus.broker.url.removeprefix("mqtt://") in err and repr(bus.prefix) in err, err
    assert "--prefix" in err and "will never run" in err, err
    job_id = err.split("job ", 1)[1].split(":", 1)[0]
    # Now the coordinator returns and reads the copies queued for it: refused, never run.
    bus.coordinator()
    bus.worker("n1")
    bus.wait_log("coordinator", "too_late", 20)
    out2 = bus.cli("result", job_id)
    assert out2.returncode == 66, out2.stdout + out2.stderr
    assert not marker.exists()


def test_a_query_with_no_coordinator_names_the_broker_and_prefix_and_exits_69(bus: Bus) -> None:
    out = bus.cli("nodes", timeout=60)
    assert out.returncode == 69, out.stderr
    assert "no answer from the coordinator within 10 s" in out.stderr
    assert repr(bus.prefix) in out.stderr and "--prefix" in out.stderr


def test_cancel_with_no_coordinator_gives_up_with_69(bus: Bus) -> None:
    job_id = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f61"
    out = bus.cli("cancel", job_id, timeout=60)
    assert out.returncode == 69, out.stderr
    assert "no coordinator acknowledged the cancel" in out.stderr


# -- 4. two agents with one node name


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_a_second_agent_with_the_same_node_name_stops_and_the_first_keeps_serving(
    bus: Bus, version: str
) -> None:
    url = f"{bus.broker.url}?version={version}"
    bus.coordinator()
    first = bus.start("worker-dup-1", "worker", "--node", "dup", "--state-dir",
                      str(bus.tmp / "s1"), OPSBAY_BROKER=url)  # fmt: skip
    bus.wait_log("worker-dup-1", "worker dup: ready")
    second = bus.start("worker-dup-2", "worker", "--node", "dup", "--state-dir",
                       str(bus.tmp / "s2"), OPSBAY_BROKER=url)  # fmt: skip
    assert second.wait(30) == 78, bus.log("worker-dup-2")
    said = bus.log("worker-dup-2")
    assert "another agent with the node name 'dup' was already running" in said, said
    # No flapping: the first one keeps the session and serves the node.
    out = bus.cli("submit", "-t", "dup", "-c", "echo still served", "--wait")
    assert (out.returncode, out.stdout) == (0, "still served\n"), out.stderr
    assert first.poll() is None
    kicked = bus.log("worker-dup-1").count("disconnected")
    nodes = {n["node"]: n for n in bus.cli_json("nodes")}
    assert nodes["dup"]["state"] == "online"
    assert "was already running" in nodes["dup"]["conflict"], nodes["dup"]
    table = bus.cli("nodes").stdout
    assert "online (conflict)" in table and "dup: two agents used this name" in table, table
    assert bus.cli("submit", "-t", "dup", "-c", "true", "--wait").returncode == 0
    assert bus.log("worker-dup-1").count("disconnected") == kicked  # and it stays so


# -- 6. daemons that cannot connect still stop at once


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_a_daemon_that_cannot_reach_its_broker_stops_at_once_on_sigterm(
    bus: Bus, role: str
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["--node", "n1", "--state-dir", str(bus.tmp / "s")] if role == "worker" else [
        "--data-dir", str(bus.tmp / "d")]  # fmt: skip
    p = bus.start(role, role, *args, OPSBAY_BROKER=dead)
    bus.wait_log(role, "trying again in")
    p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0  # before: it went on retrying until killed


def test_submit_wait_stopped_by_sigterm_says_the_job_goes_on(running: Bus) -> None:
    p = background(running, "submit", "-t", "n1", "-c", "sleep 30", "--wait")
    running.wait_log("worker-n1", "running (timeout")
    p.send_signal(signal.SIGTERM)
    code, _, err = finish(p, 30)
    assert code == 130 and "goes on" in err, err


def test_interrupted_before_any_acknowledgement_says_so(bus: Bus) -> None:
    watcher = bus.watch("submit")
    p = background(bus, "submit", "-t", "n1", "-c", "true", "--wait")
    watcher.wait_for(lambda t, b, r: b.get("type") == "submit", "the submission")
    p.send_signal(signal.SIGINT)
    code, _, err = finish(p, 30)
    assert code == 130 and "no coordinator has acknowledged it yet" in err, err
