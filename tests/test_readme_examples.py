"""The README's fleet examples, run as they are written against a real bus."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import Bus, wait_until

README = Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- tests/test_readme_examples.py runs this block"


def block_after(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(marker)
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block after {marker!r}"
    return match.group(1)


def test_the_fleet_examples_run_as_written(bus: Bus) -> None:
    bus.coordinator()
    for node, role in (("web-01", "web"), ("web-02", "web"), ("db-01", "db")):
        bus.worker(node, "--label", f"role={role}", "--label", "region=eu-west")
    wait_until(lambda: len(bus.cli_json("nodes", "--state", "online")) == 3, 15, "3 nodes")
    script = block_after(MARKER)
    env = bus.env()
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this checkout's opsbay
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    labelled = {line.split("]")[0] + "]" for line in lines if line.startswith("[")}
    assert labelled == {"[web-01]", "[web-02]", "[db-01]"}
    assert lines.count("[web-01] restarting the agent") == 1
    assert lines.count("[web-02] deploying") == 1
    assert not any("db-01] restarting" in line or "db-01] deploying" in line for line in lines)
    table = [
        line.split()[0]
        for line in lines[lines.index(next(x for x in lines if x.startswith("NODE"))) + 1 :]
    ]
    assert table == ["web-01", "web-02"]
    job_id = re.findall(r"^job\s+(\S+)$", out.stdout, re.M)
    assert len(job_id) == 1  # the cancel printed the job it cancelled
    cancelled = bus.cli_json("result", job_id[0])
    wait_until(
        lambda: bus.cli_json("result", job_id[0])["state"] == "cancelled", 15, "the job cancelled"
    )
    assert {x["node"] for x in cancelled["executions"]} == {"web-01", "web-02"}
