"""`--against REF`: each chosen figure measured again with an earlier commit, in the same run.

These machines are noisy and their speed drifts by tens of percent over an hour, so "before"
and "after" taken in different runs say little. With `--against REF`, right after each figure
the suite runs the same figure of commit REF: its package and its own suite, unpacked with
`git archive` into the work directory and run as `python -m bench --only FIGURE` from there
(with `PYTHONPATH` pointing at it, so its `opsbay` processes run its code too). Rows that both
versions measure (the same figure and wording) are then put side by side.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.common import REPO, BenchError, Row, Suite

# How long one figure of the earlier commit may take, fills and all (the store's is the longest).
FIGURE_TIMEOUT_S = {"quick": 300.0, "full": 900.0}


def unpack(ref: str, into: Path) -> Path:
    """Commit `ref` of this repository as a directory tree (no .git); BenchError if it has no
    suite to run."""
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if rev.returncode != 0:
        raise BenchError(f"--against {ref}: not a commit of {REPO}")
    commit = rev.stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            stdout=archive,
            check=True,
            timeout=60,
        )
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(into, filter="data")
    if not (into / "bench" / "__main__.py").exists():
        raise BenchError(f"--against {ref}: commit {commit[:12]} has no benchmark suite")
    return into


def run_figure(suite: Suite, tree: Path, key: str) -> dict[tuple[str, str], str]:
    """One figure of the unpacked commit: its rows' values by (figure, measured)."""
    out = suite.workdir / f"against-{key}.md"
    argv = [sys.executable, "-m", "bench", "--only", key, "--out", str(out)]
    argv += ["--quick"] if suite.quick else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env["PYTHONPATH"] = str(tree)
    proc = suite.procs.start(f"against-{key}", argv, env, cwd=tree)
    timeout_s = FIGURE_TIMEOUT_S["quick" if suite.quick else "full"]
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise BenchError(f"--against: figure {key} took over {timeout_s:g} s")
            try:
                proc.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                continue
    finally:
        suite.procs.stop(proc)
    if proc.returncode != 0 or not out.exists():
        log = suite.procs.logs / f"against-{key}.log"
        raise BenchError(f"--against: figure {key} failed (exit {proc.returncode}); see {log}")
    return read_rows(out.read_text(encoding="utf-8"))


def read_rows(report: str) -> dict[tuple[str, str], str]:
    """The results table of a report the suite wrote: value by (figure, measured)."""
    rows: dict[tuple[str, str], str] = {}
    for line in report.splitlines():
        if not line.startswith("| ") or line.startswith(("| figure |", "|---")):
            continue
        cells = [c.strip().replace("\\|", "|") for c in _split(line)]
        if len(cells) >= 3:
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def _split(line: str) -> list[str]:
    """Cells of one markdown table line, where `\\|` is a pipe inside a cell."""
    cells, cell, escaped = [], "", False
    for ch in line.strip().strip("|"):
        if ch == "|" and not escaped:
            cells.append(cell)
            cell = ""
        else:
            cell += ch
        escaped = ch == "\\" and not escaped
    cells.append(cell)
    return cells


_SINGLE = re.compile(r"([0-9][0-9,]*(?:\.[0-9]+)?) ?(s|ms|MB|/s)")


def ratio(now: str, before: str) -> str:
    """now ÷ before, when both are one number in the same unit ("0.164 s", "1,111/s")."""
    a, b = _SINGLE.fullmatch(now), _SINGLE.fullmatch(before)
    if a is None or b is None or a[2] != b[2]:
        return "—"
    x, y = float(a[1].replace(",", "")), float(b[1].replace(",", ""))
    return f"{x / y:.2f}x" if y else "—"


def table(ref: str, rows: list[Row], earlier: dict[tuple[str, str], str]) -> str:
    """This run's rows that the earlier commit also measured, side by side."""
    lines = [f"| figure | measured | this commit | {ref} | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        before = earlier.get((r.figure, r.what))
        if before is not None:
            cells = (r.figure, r.what, r.value, before, ratio(r.value, before))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
