"""The one-command local stack: it comes up, runs its demo job, and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import free_port


def processes_using(directory: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(directory) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmd)
    return found


def stack_once(port: int, directory: Path, *more: str) -> subprocess.CompletedProcess[str]:
    argv = ["stack", "--once", "--port", str(port), "--dir", str(directory), *more]
    return subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", *argv], capture_output=True, text=True, timeout=120
    )


def test_stack_once_runs_the_demo_job_and_stops_everything(tmp_path: Path) -> None:
    directory = tmp_path / "stack"
    out = stack_once(free_port(), directory, "--node", "demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hello from" in out.stdout and "via opsbay" in out.stdout
    assert "demo" in out.stdout and "online" in out.stdout  # the nodes table
    assert (directory / "data" / "opsbay.db").exists()
    assert processes_using(directory) == []


def test_stack_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = stack_once(port, tmp_path / "stack")
    assert out.returncode == 78
    assert "already in use" in out.stderr
