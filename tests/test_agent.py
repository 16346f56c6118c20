"""`opsbay worker` becomes the lean agent process: same pid, no options in sight, same errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from opsbay_mqtt import agent
from opsbay_mqtt.policy import WorkerPolicy
from opsbay_mqtt.settings import BusOptions
from tests.helpers import Bus, stop_process, wait_until


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def open_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fds / fd) for fd in os.listdir(fds)]


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the agent needs memfd (Linux)")
def test_the_worker_keeps_its_pid_and_runs_jobs_as_the_agent(bus: Bus) -> None:
    secret = "s3cret-given-on-the-command-line"
    bus.coordinator("--secret", secret)
    worker = bus.worker("n1", "--secret", secret, "--label", "role=web")
    # The process the service manager started is the agent now: same pid, the node's name in
    # `ps`, and the options (the secret among them) neither in its command line nor left open.
    wait_until(lambda: "opsbay_mqtt.agent" in cmdline(worker.pid), 10, "the agent's cmdline")
    assert cmdline(worker.pid)[-1] == "n1"
    assert not any(secret in arg for arg in cmdline(worker.pid))
    assert not any("opsbay-worker-options" in f for f in open_files(worker.pid))
    out = bus.cli("submit", "-t", "n1", "-c", "echo from the agent", "--wait", OPSBAY_SECRET=secret)
    assert (out.returncode, out.stdout) == (0, "from the agent\n"), out.stderr
    nodes = bus.cli_json("nodes", "--json", OPSBAY_SECRET=secret)
    assert [(n["node"], n["labels"]) for n in nodes] == [("n1", {"role": "web"})]
    stop_process(worker)
    assert worker.returncode == 0
    assert "worker n1: stopped" in bus.log("worker-n1")


def test_a_bad_setting_found_by_the_agent_is_reported_as_by_the_cli(
    bus: Bus, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = bus.start("worker-bad", "worker", "--node", "n1", "--state-dir", str(blocker / "state"))
    assert p.wait(timeout=60) == 78
    assert "--state-dir / OPSBAY_STATE_DIR: cannot create" in bus.log("worker-bad")


def test_a_bad_setting_the_cli_can_check_fails_before_the_exec(bus: Bus) -> None:
    out = bus.cli("worker", "--node", "n1", "--run-as", "no-such-user-here")
    assert out.returncode == 78
    assert "--run-as: no such user 'no-such-user-here'" in out.stderr


def test_without_memfd_the_worker_runs_in_the_cli_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("exec without memfd"))
    options = {"node": "n1", "state_dir": Path("s"), "policy": WorkerPolicy()}
    assert agent.become(BusOptions(secret="x"), 20, options) is None  # type: ignore[func-returns-value]


def test_the_agent_alone_says_how_it_is_started() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt.agent"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "started by `opsbay worker`" in out.stderr
