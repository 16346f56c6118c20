"""The benchmark suite still runs (its quick mode; the numbers are not looked at here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_suite_runs_in_quick_mode(tmp_path: Path) -> None:
    out_file = tmp_path / "bench.md"
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = out_file.read_text()
    assert "## Results" in report
    for figure in ("CLI round trip", "bus latency", "throughput", "fleet", "store"):
        assert figure in report, figure
