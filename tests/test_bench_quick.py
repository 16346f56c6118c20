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


def test_against_puts_an_earlier_commit_side_by_side(tmp_path: Path) -> None:
    """`--against REF` runs each figure again with commit REF's package and suite and adds a
    side-by-side table (here REF is the commit under test itself: the suite must still run)."""
    out_file = tmp_path / "bench.md"
    argv = [sys.executable, "-m", "bench", "--quick", "--only", "startup", "--against", "HEAD"]
    out = subprocess.run(
        [*argv, "--out", str(out_file)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = out_file.read_text()
    section = report[report.index("## Against HEAD, in the same run") :]
    assert "| CLI start-up | baseline: `python -c pass` |" in section
    bad = subprocess.run(
        [*argv[:-1], "no-such-commit"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "not a commit" in bad.stderr


def test_reading_back_a_report_and_the_ratio_of_two_values() -> None:
    from bench.against import ratio, read_rows

    report = "\n".join(
        [
            "| figure | measured | value | spread |",
            "|---|---|---|---|",
            "| bus latency | p50 \\| p99 | 6.38 ms | min 5 ms |",
            "| intake | submissions/s | 1,111/s |  |",
        ]
    )
    assert read_rows(report) == {
        ("bus latency", "p50 | p99"): "6.38 ms",
        ("intake", "submissions/s"): "1,111/s",
    }
    assert ratio("1,111/s", "947/s") == "1.17x"
    assert ratio("0.164 s", "0.185 s") == "0.89x"
    assert ratio("6.38 ms", "0.1 s") == "—"
    assert ratio("p50 0.74 ms, p99 1.31 ms", "p50 0.7 ms, p99 1.3 ms") == "—"
