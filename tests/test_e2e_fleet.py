"""Fleet operations through a real Mosquitto with several workers: fan-out by glob and label,
rollout limits, cancel, live output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import Bus, stop_process, wait_until


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def fleet(bus: Bus) -> Bus:
    bus.coordinator("--lost-grace", "1")
    for node, role in (("web-01", "web"), ("web-02", "web"), ("web-03", "web"), ("db-01", "db")):
        bus.worker(node, "--label", f"role={role}", "--label", "region=eu")
    wait_until(lambda: len(bus.cli_json("nodes", "--state", "online")) == 4, 15, "4 nodes online")
    return bus


def executions(job: dict[str, object]) -> dict[str, dict[str, object]]:
    return {x["node"]: x for x in job["executions"]}  # type: ignore[index, union-attr]


def test_glob_and_labels_with_a_node_offline(fleet: Bus) -> None:
    worker = next(p for p in fleet.procs if "web-02" in p.args)  # type: ignore[operator]
    stop_process(worker)
    out = fleet.cli(
        "submit", "-t", "web-*", "-c", "echo on $OPSBAY_NODE", "--start-by", "2s", "--wait",
        "--json",
    )  # fmt: skip
    assert out.returncode == 68, out.stderr  # the worst outcome: web-02 expired
    ex = executions(json.loads(out.stdout))
    assert sorted(ex) == ["web-01", "web-02", "web-03"]
    assert ex["web-01"]["stdout"] == "on web-01\n" and ex["web-03"]["state"] == "succeeded"
    assert ex["web-02"]["state"] == "expired"
    db = fleet.cli("submit", "--where", "role=db", "-c", "echo db", "--wait", "--json")
    assert db.returncode == 0 and list(executions(json.loads(db.stdout))) == ["db-01"]
    both = fleet.cli("submit", "-t", "web-01,db-01", "--where", "region=eu", "-c", "true", "--wait")
    assert both.returncode == 0
    none = fleet.cli("submit", "--where", "role=cache", "-c", "true", "--wait")
    assert none.returncode == 77 and "no_match" in none.stderr
    labelled = fleet.cli("submit", "-t", "web-01,web-03", "-c", "echo hi", "--wait")
    assert sorted(labelled.stdout.splitlines()) == ["[web-01] hi", "[web-03] hi"]
    assert "web-01: succeeded" in labelled.stderr  # progress, plain lines when not a terminal


def test_batch_limits_how_many_run_at_once(fleet: Bus, tmp_path: Path) -> None:
    log = tmp_path / "log"
    command = f"echo start >> {log}; sleep 0.4; echo end >> {log}"
    out = fleet.cli("submit", "--where", "region=eu", "-c", command, "--batch", "2", "--wait")
    assert out.returncode == 0, out.stderr
    running, most = 0, 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        most = max(most, running)
    assert most == 2  # never more than the batch, and the batch was used
    assert log.read_text().split().count("start") == 4


def test_max_failures_stops_the_rollout(fleet: Bus, tmp_path: Path) -> None:
    marks = tmp_path / "ran"
    marks.mkdir()
    out = fleet.cli(
        "submit", "--where", "region=eu", "-c", f"touch {marks}/$OPSBAY_NODE; exit 3",
        "--batch", "1", "--max-failures", "1", "--wait", "--json",
    )  # fmt: skip
    assert out.returncode == 1, out.stderr  # failed on several nodes
    ex = executions(json.loads(out.stdout))
    states = sorted(str(x["state"]) for x in ex.values())
    assert states == ["cancelled", "cancelled", "failed", "failed"]
    assert len(list(marks.iterdir())) == 2  # the cancelled ones never started
    cancelled = [x for x in ex.values() if x["state"] == "cancelled"]
    assert all("more than 1 executions failed" in str(x["reason"]) for x in cancelled)


def test_cancel_kills_running_and_stops_held_back_executions(fleet: Bus, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    pids.mkdir()
    command = f"echo $$ > {pids}/$OPSBAY_NODE; sleep 60"
    out = fleet.cli("submit", "-t", "web-*", "-c", command, "--batch", "1", "--json")
    job_id = json.loads(out.stdout)["job_id"]
    wait_until(lambda: list(pids.iterdir()), 15, "the first execution running")
    (pidfile,) = pids.iterdir()
    shell = int(pidfile.read_text())
    done = fleet.cli("cancel", job_id, "--wait", "--json")
    assert done.returncode == 80, done.stderr
    job = json.loads(done.stdout)
    assert job["state"] == "cancelled"
    assert {x["state"] for x in job["executions"]} == {"cancelled"}
    wait_until(lambda: not alive(shell), 10, "the running command killed")
    assert len(list(pids.iterdir())) == 1  # the held-back ones never started
    assert fleet.cli("result", job_id).returncode == 80


def test_cancel_reaches_a_node_that_is_offline(fleet: Bus, tmp_path: Path) -> None:
    worker = next(p for p in fleet.procs if "db-01" in p.args)  # type: ignore[operator]
    stop_process(worker)
    marker = tmp_path / "ran"
    out = fleet.cli("submit", "-t", "db-01", "-c", f"touch {marker}", "--start-by", "5m")
    job_id = out.stdout.strip()
    asked = fleet.cli("cancel", job_id, "--json")  # the node is away: it answers when back
    assert asked.returncode == 0 and json.loads(asked.stdout)["state"] == "pending"
    fleet.worker("db-01", "--label", "role=db")
    wait_until(lambda: fleet.cli_json("result", job_id)["state"] == "cancelled", 15, "cancelled")
    assert not marker.exists()


def test_ctrl_c_with_cancel_on_interrupt(fleet: Bus, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    waiter = subprocess.Popen(
        [sys.executable, "-m", "opsbay_mqtt", "submit", "-t", "web-01", "-c",
         f"echo $$ > {pidfile}; sleep 60", "--wait", "--cancel-on-interrupt"],
        env=fleet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "running")
        waiter.send_signal(signal.SIGINT)
        _, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 80, err
    assert "cancelling" in err
    wait_until(lambda: not alive(int(pidfile.read_text())), 10, "the command killed")


def test_live_output_arrives_in_order_before_the_result(fleet: Bus) -> None:
    watch = fleet.watch("#")
    command = "for i in 1 2 3 4 5; do echo line $i; sleep 0.15; done; echo done >&2"
    out = fleet.cli("submit", "-t", "web-01", "-c", command, "--wait", "--json")
    job = json.loads(out.stdout)
    job_id = job["job_id"]
    watch.find(lambda t, b, r: False)  # take in everything received so far
    seen = [(t, json.loads(p)) for t, p, _ in watch.seen if job_id in t]
    chunks = [b for t, b in seen if b.get("type") == "output"]
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    assert len(chunks) >= 3  # it really streamed, not one chunk at the end
    stdout = "".join(c["data"] for c in chunks if c["stream"] == "stdout")
    assert stdout == job["executions"][0]["stdout"] == "".join(f"line {i}\n" for i in range(1, 6))
    final = next(i for i, (t, b) in enumerate(seen) if b.get("state") == "succeeded")
    last_chunk = max(i for i, (t, b) in enumerate(seen) if b.get("type") == "output")
    assert last_chunk < final
    followed = fleet.cli("submit", "-t", "web-01", "-c", command, "--wait", "--follow")
    assert followed.stdout == stdout and "done" in followed.stderr


def test_a_noisy_command_is_rate_limited_live_but_complete_in_its_result(fleet: Bus) -> None:
    watch = fleet.watch("output/#")
    command = "head -c 3000000 /dev/zero | tr '\\0' y"
    out = fleet.cli("submit", "-t", "web-01", "-c", command, "--wait", "--json")
    job = json.loads(out.stdout)
    ex = job["executions"][0]
    assert ex["stdout_bytes"] == 3_000_000 and ex["truncated"]
    chunks = watch.find(lambda t, b, r: b.get("job_id") == job["job_id"])
    sent = sum(len(c["data"]) for c in chunks)
    dropped = sum(c["dropped"] for c in chunks)
    assert sent < 1_000_000 and sent + dropped == 3_000_000


def test_nodes_filters(fleet: Bus) -> None:
    web = fleet.cli_json("nodes", "--where", "role=web")
    assert [n["node"] for n in web] == ["web-01", "web-02", "web-03"]
    assert all(n["facts"]["arch"] and "load_x100" in n["facts"] for n in web)
    stop_process(next(p for p in fleet.procs if "web-03" in p.args))  # type: ignore[operator]
    wait_until(
        lambda: [n["node"] for n in fleet.cli_json("nodes", "--state", "offline")] == ["web-03"],
        15,
        "web-03 offline",
    )
    bad = fleet.cli("nodes", "--state", "sleepy")
    assert bad.returncode == 2
