"""The table, the facts of the run (date, machine, command, versions) and docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sqlite3
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

from bench.common import REPO, Row
from opsbay_mqtt.cli.stack import find_mosquitto

KEPT_HEADING = "## What the profiles showed"
KEPT_STUB = f"""{KEPT_HEADING}

(Written by hand after a run that missed targets: `python -m bench --only FIGURE --profile DIR`
records py-spy profiles of the coordinator and workers and `-X importtime` of the CLI.)
"""


@dataclass(frozen=True)
class RunInfo:
    command: str
    started: dt.datetime
    duration_s: float
    quick: bool
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def _run(argv: list[str], cwd: Path = REPO) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip()


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    distro = ""
    with_release = Path("/etc/os-release")
    if with_release.exists():
        for line in with_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}" + (f" ({distro})" if distro else "")
    )


def package_source() -> Path:
    """The checkout the measured package was imported from (the suite may measure another)."""
    import opsbay_mqtt

    return Path(opsbay_mqtt.__file__).resolve().parent.parent


def versions() -> str:
    src = package_source()
    commit = _run(["git", "rev-parse", "--short", "HEAD"], src) or "?"
    package = ["opsbay_mqtt", "mosquitto", "pyproject.toml"]
    dirty = _run(["git", "status", "--porcelain", "--", *package], src)
    where = "" if src == REPO else f" from {src}"
    mosq = _run([find_mosquitto(), "-h"]).splitlines()
    mosq_v = mosq[0].replace("mosquitto version ", "") if mosq else "?"
    pkgs = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("paho-mqtt", "pydantic", "typer", "psutil")
    )
    return (
        f"opsbay-mqtt {metadata.version('opsbay-mqtt')}{where} (git {commit}"
        + (", with uncommitted changes to the package" if dirty else "")
        + f"), Python {platform.python_version()}, {pkgs}, Mosquitto {mosq_v}, "
        f"SQLite {sqlite3.sqlite_version}"
    )


def _met(row: Row) -> str:
    return "" if row.met is None else ("met" if row.met else "**missed**")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(rows: list[Row]) -> str:
    head = "| figure | measured | value | spread | baseline (same run) | ratio | target | |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r.figure, r.what, r.value, r.spread, r.baseline, r.ratio, r.target, _met(r))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    judged = [r for r in rows if r.met is not None]
    missed = [f"{r.figure}: {r.what.split(', ')[0]} ({r.target})" for r in judged if not r.met]
    text = f"Targets met: {len(judged) - len(missed)} of {len(judged)}."
    return text + (f" Missed: {'; '.join(missed)}." if missed else "")


def document(
    info: RunInfo,
    rows: list[Row],
    notes: list[str],
    errors: list[str],
    kept: str,
    against: tuple[str | None, str | None] = (None, None),
) -> str:
    """The report; `against`: the earlier commit and the side-by-side table of `--against`."""
    load = "/".join(f"{x:.2f}" for x in info.load_before)
    load_after = "/".join(f"{x:.2f}" for x in info.load_after)
    mode = " Quick mode: small counts, the numbers mean nothing." if info.quick else ""
    parts = [
        "# Benchmarks",
        "",
        "Everything above the heading \u201cWhat the profiles showed\u201d is written by the "
        "suite (`bench/`, issue 6); that section and what follows it are kept from run to run."
        + mode,
        "",
        f"- **Command**: `{info.command}` (from the repository root; about "
        f"{max(1, round(info.duration_s / 60))} min on 2 cores)",
        f"- **Date**: {info.started:%Y-%m-%d %H:%M} UTC; the run took {info.duration_s:.0f} s",
        f"- **Machine**: {machine()}; load average {load} before, {load_after} after",
        f"- **Versions**: {versions()}",
        "- **Quick check** (CI): `.venv/bin/python -m bench --quick --out /tmp/bench.md` "
        "exits 0 when every figure could be measured",
        "- **Before and after in one run**: `.venv/bin/python -m bench --only FIGURES "
        "--against REF` follows each figure with the same figure of git commit REF",
        "",
        "## Results",
        "",
        "Every figure is measured next to its baseline in the same run, on a private Mosquitto "
        "(the shipped `mosquitto/mosquitto.conf` on a free loopback port), one per figure. "
        "Times are medians (p50) unless said otherwise; the spread is the interquartile range "
        "(IQR) and the maximum, or the rate over each tenth of the work.",
        "",
        table(rows),
        "",
        verdict(rows),
    ]
    ref, compared = against
    if ref and compared:
        parts += ["", f"## Against {ref}, in the same run", ""]
        parts += [
            f"Each figure above was followed by the same figure of commit `{ref}` (its package "
            "and its own suite, from `git archive`); the rows both measure:",
            "",
            compared,
        ]
    if errors:
        parts += ["", "**Figures that could not be measured in this run:**", ""]
        parts += [f"- {e}" for e in errors]
    parts += ["", "## How each figure is measured", ""]
    for note in notes:
        parts += [note, ""]
    parts += [kept.rstrip(), ""]
    return "\n".join(parts)


def kept_part(out: Path) -> str:
    """The hand-written tail of an existing report, from KEPT_HEADING on."""
    if out.exists():
        text = out.read_text(encoding="utf-8")
        if text.startswith(KEPT_HEADING):
            return text
        at = text.find("\n" + KEPT_HEADING)
        if at >= 0:
            return text[at + 1 :]
    return KEPT_STUB
