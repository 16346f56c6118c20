"""The benchmarks still run (their quick mode; the numbers are not looked at here), write their
results as JSON, and turn a results file into the rows of docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"figure", "what", "value", "spread", "baseline", "ratio", "target", "met"}


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bench", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_every_figure_runs_in_quick_mode_and_writes_json(tmp_path: Path) -> None:
    out = bench("--quick", "--json", str(tmp_path / "run.json"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "run.json").read_text())
    assert {"command", "started", "machine", "versions", "rows", "errors"} <= set(results)
    assert results["errors"] == [] and results["quick"] is True
    assert all(set(row) == ROW_KEYS for row in results["rows"])
    figures = {row["figure"] for row in results["rows"]}
    assert {"CLI round trip", "CLI start-up", "bus latency", "agent footprint"} <= figures
    assert {"throughput", "coordinator intake", "fleet", "store", "schedules"} <= figures
    schedules = [row for row in results["rows"] if row["figure"] == "schedules"]
    assert schedules and all(row["met"] is True for row in schedules), schedules
    table = bench("report", str(tmp_path / "run.json"), timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| CLI start-up | baseline: `python -c pass` |" in table.stdout
    assert "Targets met:" in table.stdout


def test_against_puts_an_earlier_commit_side_by_side(tmp_path: Path) -> None:
    """`--against REF` runs each figure again with commit REF's package and suite (here the
    commit under test itself, whichever suite it has) and keeps its values in the results."""
    argv = ["--quick", "--only", "startup", "--json", str(tmp_path / "run.json")]
    out = bench(*argv, "--against", "HEAD")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    against = json.loads((tmp_path / "run.json").read_text())["against"]
    assert against["ref"] == "HEAD"
    assert {"figure": "CLI start-up", "what": "baseline: `python -c pass`"}.items() <= next(
        r for r in against["rows"] if r["what"] == "baseline: `python -c pass`"
    ).items()
    assert "| figure | measured | this commit | HEAD | ratio |" in out.stdout
    bad = bench(*argv, "--against", "no-such-commit", timeout=60)
    assert bad.returncode == 2 and "not a commit" in bad.stderr


def test_unknown_figures_and_unreadable_results_are_refused(tmp_path: Path) -> None:
    assert bench("--only", "nonsense", timeout=60).returncode == 2
    (tmp_path / "bad.json").write_text("{}")
    assert bench("report", str(tmp_path / "bad.json"), timeout=60).returncode == 2


def test_reading_back_an_old_report_and_the_ratio_of_two_values() -> None:
    from bench.suite import markdown_rows, ratio

    report = "\n".join(
        [
            "| figure | measured | value | spread |",
            "|---|---|---|---|",
            "| bus latency | p50 \\| p99 | 6.38 ms | min 5 ms |",
            "| intake | submissions/s | 1,111/s |  |",
        ]
    )
    assert markdown_rows(report) == [
        {"figure": "bus latency", "what": "p50 | p99", "value": "6.38 ms"},
        {"figure": "intake", "what": "submissions/s", "value": "1,111/s"},
    ]
    assert ratio("1,111/s", "947/s") == "1.17x"
    assert ratio("0.164 s", "0.185 s") == "0.89x"
    assert ratio("6.38 ms", "0.1 s") == "—"
    assert ratio("p50 0.74 ms, p99 1.31 ms", "p50 0.7 ms, p99 1.3 ms") == "—"
