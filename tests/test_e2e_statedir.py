"""Two workers on one host (issue 11): each node has its own state folder by default, and a
folder belongs to one worker at a time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from opsbay_mqtt import statedir
from tests.helpers import Bus, stop_process


def start_in(bus: Bus, cwd: Path, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """`opsbay ARGS` working in `cwd`, logging to `name`.log and stopped with the bus, as
    `bus.start` does."""
    path = bus.tmp / f"{name}.log"
    bus.log_start[name] = path.stat().st_size if path.exists() else 0
    with open(path, "ab") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "opsbay_mqtt", *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=bus.env(**env),
            start_new_session=True,
        )
    bus.procs.append(p)
    return p


def test_two_workers_started_in_one_folder_each_run_their_own_job(bus: Bus, tmp_path: Path) -> None:
    bus.coordinator()
    cwd = tmp_path / "x"
    cwd.mkdir()
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    # As root the default is /var/lib/opsbay/NODE, which a test must not write: there, each
    # worker is given the folder a user's default would be. Otherwise neither gets --state-dir.
    as_root = os.geteuid() == 0
    euid = 1000 if as_root else os.geteuid()
    folders = {n: statedir.default_state_dir(n, euid=euid, environ=env) for n in ("a", "b")}
    for node, folder in folders.items():
        given = ["--state-dir", str(folder)] if as_root else []
        start_in(bus, cwd, f"worker-{node}", "worker", "--node", node, *given, **env)
    for node, folder in folders.items():
        bus.wait_log(f"worker-{node}", f"worker {node}: ready")
        assert f"worker {node}: state folder {folder}\n" in bus.log(f"worker-{node}")

    out = bus.cli("submit", "--target", "a,b", "--command", "echo $OPSBAY_NODE", "--wait")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["[a] a", "[b] b"]
    assert folders["a"] != folders["b"]
    for node, folder in folders.items():
        assert (folder / "ledger.db").is_file()
        assert (folder / "lock").read_text().endswith(f" {node}\n")
    assert list(cwd.iterdir()) == []  # nothing shared in the working directory


def test_a_second_worker_on_the_same_folder_refuses_to_start(bus: Bus, tmp_path: Path) -> None:
    bus.coordinator()
    state = tmp_path / "shared-state"
    first = bus.start("worker-a", "worker", "--node", "a", OPSBAY_STATE_DIR=str(state))
    bus.wait_log("worker-a", "worker a: ready")

    second = bus.cli("worker", "--node", "b", timeout=30, OPSBAY_STATE_DIR=str(state))
    assert second.returncode == 78, second.stderr
    # `opsbay worker` became the agent, same pid: the pid a user would look for in `ps`.
    assert (
        f"opsbay: state folder {state} is in use by another worker (pid {first.pid}, node a): "
        "give each worker its own --state-dir (default: one per node: " in second.stderr
    )
    assert "worker b: ready" not in second.stderr

    assert first.poll() is None
    out = bus.cli("submit", "--target", "a", "--command", "echo still serving", "--wait")
    assert (out.returncode, out.stdout) == (0, "still serving\n"), out.stderr
    assert [n["node"] for n in bus.cli_json("nodes")] == ["a"]


def test_a_worker_on_the_new_default_refuses_to_forget_a_ledger_in_the_old_one(
    bus: Bus, tmp_path: Path
) -> None:
    """Upgraded in place, a worker started as before (no --state-dir) in a folder holding the old
    default ./opsbay-state must not start with an empty ledger: it could run a job twice."""
    bus.coordinator()
    cwd = tmp_path / "srv"
    cwd.mkdir()
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    old = start_in(bus, cwd, "old", "worker", "--node", "n1", "--state-dir", "opsbay-state", **env)
    bus.wait_log("old", "worker n1: ready")
    stop_process(old)
    again = start_in(bus, cwd, "again", "worker", "--node", "n1", **env)
    assert again.wait(30) == 78, bus.log("again")
    assert "give --state-dir" in bus.log("again") and "opsbay-state" in bus.log("again")
