"""`python -m bench`: measure the figures, write the results as JSON, print the table.

    python -m bench                                   # every figure, ~5 min on 2 cores
    python -m bench --quick                           # small counts: proves the suite runs
    python -m bench --only cli,latency                # some figures (see --list)
    python -m bench --only cli --against HEAD~1       # each figure, then the same of HEAD~1
    python -m bench --only throughput --profile DIR   # py-spy profiles (distorted numbers)
    python -m bench report RESULTS.json               # the markdown rows of docs/benchmarks.md

Every run writes bench/results/<UTC time>.json (or --json PATH). Exit codes: 0 every figure was
measured (missed targets included, unless --strict), 1 a figure could not be measured (or, with
--strict, a target was missed), 2 bad usage, 130 interrupted. Every process the suite starts
runs in its own session, is told by the kernel to stop if the suite dies (PR_SET_PDEATHSIG),
and is stopped on every way out (errors, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import (
    fig_cli,
    fig_fleet,
    fig_intake,
    fig_latency,
    fig_scale,
    fig_schedules,
    fig_store,
    fig_throughput,
)
from bench.common import OPSBAY, REPO, BenchError, Procs, Row, Suite

FIGURES: dict[str, tuple[str, Callable[[Suite], list[Row]]]] = {
    "cli": ("CLI round trip", fig_cli.round_trip),
    "startup": ("CLI start-up", fig_cli.startup),
    "latency": ("bus latency, agent footprint", fig_latency.run),
    "throughput": ("throughput", fig_throughput.run),
    "intake": ("coordinator intake", fig_intake.run),
    "fleet": ("fleet", fig_fleet.run),
    "store": ("store", fig_store.run),
    "fleet-nats": ("fleet on NATS", fig_fleet.run_nats),
    "coordinators": ("coordinators", fig_scale.run),
    "schedules": ("schedules", fig_schedules.run),
}
RESULTS = REPO / "bench" / "results"
AGAINST_TIMEOUT_S = {True: 300.0, False: 900.0}  # one figure of the earlier commit, by --quick
# What the suite's children import: compiled once before any figure, so that no figure (the
# idle worker's footprint included) pays for compiling or measures its memory.
WARM = (
    "opsbay_mqtt.agent, opsbay_mqtt.cli.app, opsbay_mqtt.cli.admin, opsbay_mqtt.cli.jobs, "
    "opsbay_mqtt.cli.fleet, opsbay_mqtt.client, opsbay_mqtt.coordinator, opsbay_mqtt.daemons, "
    "opsbay_mqtt.cli.render, opsbay_mqtt.store, opsbay_mqtt.cli.waiting, opsbay_mqtt.worker, "
    "opsbay_mqtt.protocol, bench.baseline, bench.simworkers, paho.mqtt.client, pydantic, typer, "
    "psutil"
)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"figures: {', '.join(FIGURES)} (see docs/benchmarks.md for what each measures)",
    )
    ap.add_argument("--quick", action="store_true", help="small counts: proves the suite runs")
    ap.add_argument("--only", help="comma-separated figures to run (see --list)")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    ap.add_argument(
        "--json", type=Path, metavar="PATH", help="where to write the results (default: "
        "bench/results/<UTC time>.json)",
    )  # fmt: skip
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    ap.add_argument(
        "--profile", type=Path, metavar="DIR", help="record profiles into DIR (distorts numbers)"
    )
    ap.add_argument(
        "--against", metavar="REF", help="after each figure, run the same figure of git commit "
        "REF (its package and its suite, unpacked into the work directory) in the same run",
    )  # fmt: skip
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parse(argv)
    if args.list:
        for key, (title, _) in FIGURES.items():
            print(f"{key:12} {title}")
        return 0
    keys = [k.strip() for k in (args.only or ",".join(FIGURES)).split(",") if k.strip()]
    if set(keys) - set(FIGURES):
        print(
            f"bench: unknown figure(s) {', '.join(sorted(set(keys) - set(FIGURES)))}",
            file=sys.stderr,
        )
        return 2
    problem = _check_setup()
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65536):  # children inherit it: Mosquitto holds the fleet's sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    workdir = Path(tempfile.mkdtemp(prefix="opsbay-bench-"))
    # Every child gets its bytecode cached, as an installed package has it, in the work
    # directory: never in the package's own tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    subprocess.run([sys.executable, "-c", f"import {WARM}"], check=True, cwd=REPO, timeout=120)
    suite = Suite(quick=args.quick, workdir=workdir, procs=Procs(workdir / "logs"))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        suite.profile_dir = args.profile.resolve()
    started, t0, load_before = dt.datetime.now(dt.UTC), time.perf_counter(), os.getloadavg()
    rows: list[Row] = []
    errors: list[str] = []
    earlier: list[dict[str, str]] = []
    code = _measure(suite, args, keys, rows, errors, earlier)
    if code:
        return code
    results = {
        "command": _command(argv),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 1),
        "quick": args.quick,
        "figures": keys,
        "machine": machine(),
        "load": [list(load_before), list(os.getloadavg())],
        "versions": versions(),
        "rows": [dataclasses.asdict(r) for r in rows],
        "errors": errors,
        "against": {"ref": args.against, "rows": earlier} if args.against else None,
    }
    path = args.json or RESULTS / f"{started:%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(report(results))
    print(f"bench: wrote {path}", file=sys.stderr)
    if errors or args.keep:
        print(f"bench: logs kept in {workdir}/logs", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if errors or (args.strict and any(r.met is False for r in rows)):
        return 1
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _measure(
    suite: Suite,
    args: argparse.Namespace,
    keys: list[str],
    rows: list[Row],
    errors: list[str],
    earlier: list[dict[str, str]],
) -> int:
    """Each figure (and with --against, the same of the earlier commit); 0, or the exit code."""
    # Ctrl-C and SIGTERM end the run the same way (even when started with SIGINT ignored, as a
    # shell does for a background job): every process is stopped on the way out.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tree = unpack(args.against, suite.workdir / "against") if args.against else None
        for key in keys:
            title, run = FIGURES[key]
            suite.say(f"{title} ...")
            t = time.perf_counter()
            try:
                rows += run(suite)
                suite.say(f"{title}: done in {time.perf_counter() - t:.1f} s")
            except KeyboardInterrupt:
                raise
            except Exception as e:
                errors.append(f"{title}: {type(e).__name__}: {e}")
                suite.say(f"{title} FAILED:\n{traceback.format_exc()}")
                suite.procs.stop_all()
                continue
            if tree is not None:
                suite.say(f"{title}, as of {args.against} ...")
                try:
                    earlier += run_earlier(suite, tree, key)
                except BenchError as e:
                    errors.append(f"{title} as of {args.against}: {e}")
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        suite.say("interrupted; stopping every process")
        suite.procs.stop_all()
        print(f"bench: logs kept in {suite.workdir}/logs", file=sys.stderr)
        return 130
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        suite.procs.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _check_setup() -> str | None:
    """The suite imports the package in-process and runs `opsbay` as a child: both must be the
    same copy (a PYTHONPATH or the working directory can make them differ)."""
    if not OPSBAY.exists():
        return f"{OPSBAY} not found: run with the venv's python"
    import opsbay_mqtt

    mine = str(Path(opsbay_mqtt.__file__).resolve())
    code = "import opsbay_mqtt, pathlib; print(pathlib.Path(opsbay_mqtt.__file__).resolve())"
    head = OPSBAY.read_text().splitlines()[0].removeprefix("#!").strip()
    theirs = subprocess.run(
        [head, "-c", code], capture_output=True, text=True, timeout=30, cwd=OPSBAY.parent
    ).stdout.strip()
    return None if theirs == mine else f"the suite imports {mine}, `opsbay` {theirs or '?'}"


def _command(argv: list[str]) -> str:
    exe = Path(sys.executable)
    shown = str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else str(exe)
    return " ".join([shown, "-m", "bench", *map(shlex.quote, argv)])


# -- the facts of a run
def _out(argv: list[str], cwd: Path = REPO) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), "?")
    release = Path("/etc/os-release")
    lines = release.read_text().splitlines() if release.exists() else []
    distro = next((x.split("=", 1)[1].strip('"') for x in lines if x.startswith("PRETTY_")), "")
    return (
        f"{cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}" + (f" ({distro})" if distro else "")
    )


def versions() -> str:
    import opsbay_mqtt
    from opsbay_mqtt.cli.stack import find_mosquitto

    src = Path(opsbay_mqtt.__file__).resolve().parent.parent
    commit = _out(["git", "rev-parse", "--short", "HEAD"], src) or "?"
    dirty = _out(["git", "status", "--porcelain", "--", "opsbay_mqtt", "pyproject.toml"], src)
    mosq = _out([find_mosquitto(), "-h"]).splitlines()[:1] or ["?"]
    pkgs = ", ".join(f"{p} {metadata.version(p)}" for p in ("paho-mqtt", "pydantic", "typer"))
    return (
        f"opsbay-mqtt {metadata.version('opsbay-mqtt')} (git {commit}"
        + (", with uncommitted changes to the package" if dirty else "")
        + f"), Python {platform.python_version()}, {pkgs}, psutil {metadata.version('psutil')}, "
        f"Mosquitto {mosq[0].replace('mosquitto version ', '')}, SQLite {sqlite3.sqlite_version}"
    )


# -- --against REF
def unpack(ref: str, into: Path) -> Path:
    """Commit `ref` of this repository as a directory tree (`git archive`, no .git)."""
    rev = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if rev.returncode != 0:
        raise BenchError(f"--against {ref}: not a commit of {REPO}")
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as archive:
        subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", rev.stdout.strip()],
            stdout=archive,
            check=True,
            timeout=60,
        )
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(into, filter="data")
    if not (into / "bench" / "__main__.py").exists():
        raise BenchError(f"--against {ref}: that commit has no benchmark suite")
    return into


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def run_earlier(suite: Suite, tree: Path, key: str) -> list[dict[str, str]]:
    """One figure of the unpacked commit, run by its own suite with its own package (through
    PYTHONPATH, so that its `opsbay` processes run its code too): its rows' values."""
    writes_json = any('"--json"' in p.read_text() for p in (tree / "bench").glob("*.py"))
    out = suite.workdir / f"against-{key}.{'json' if writes_json else 'md'}"
    argv = [sys.executable, "-m", "bench", "--only", key, "--json" if writes_json else "--out"]
    argv += [str(out), *(["--quick"] if suite.quick else [])]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    env["PYTHONPATH"] = str(tree)
    argv[0] = str(earlier_venv(tree))
    proc = suite.procs.start(f"against-{key}", argv, env, cwd=tree)
    try:
        proc.wait(AGAINST_TIMEOUT_S[suite.quick])
    except subprocess.TimeoutExpired:
        raise BenchError(f"figure {key} took over {AGAINST_TIMEOUT_S[suite.quick]:g} s") from None
    finally:
        suite.procs.stop(proc)
    if proc.returncode != 0 or not out.exists():
        log = suite.procs.logs / f"against-{key}.log"
        raise BenchError(f"figure {key} failed (exit {proc.returncode}); see {log}")
    if writes_json:
        return [{k: r[k] for k in ("figure", "what", "value")} for r in _load(out)["rows"]]
    return markdown_rows(out.read_text(encoding="utf-8"))


def earlier_venv(tree: Path) -> Path:
    """A virtualenv beside `tree` sharing this one's packages, whose `opsbay` is the one `tree`
    declares (its entry point moved with the cli/ sub-package): the earlier suite runs the
    `opsbay` next to its interpreter. Returns that interpreter."""
    venv, ours = tree.parent / "venv", Path(sys.prefix)
    python = venv / "bin" / "python"
    if not python.exists():
        (venv / "bin").mkdir(parents=True)
        shutil.copy(ours / "pyvenv.cfg", venv / "pyvenv.cfg")
        for lib in ("lib", "lib64", "include"):
            if (ours / lib).exists():
                (venv / lib).symlink_to((ours / lib).resolve())
        python.symlink_to(Path(sys.executable).resolve())
        scripts = tomllib.loads((tree / "pyproject.toml").read_text())["project"]["scripts"]
        module, func = scripts["opsbay"].split(":")
        opsbay = venv / "bin" / "opsbay"
        opsbay.write_text(
            f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n"
        )
        opsbay.chmod(0o755)
    return python


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The results table of a report the suite wrote before it wrote JSON (commits up to
    6b130f2): figure, measured, value."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| figure |", "|---")):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) >= 3:
                rows.append({"figure": cells[0], "what": cells[1], "value": cells[2]})
    return rows


# -- JSON -> markdown
_SINGLE = re.compile(r"([0-9][0-9,]*(?:\.[0-9]+)?) ?(s|ms|MB|/s)")


def ratio(now: str, before: str) -> str:
    """now ÷ before, when both are one number in the same unit ("0.164 s", "1,111/s")."""
    a, b = _SINGLE.fullmatch(now), _SINGLE.fullmatch(before)
    if a is None or b is None or a[2] != b[2]:
        return "—"
    x, y = float(a[1].replace(",", "")), float(b[1].replace(",", ""))
    return f"{x / y:.2f}x" if y else "—"


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def report(results: dict[str, Any]) -> str:
    """The markdown of a run: its facts, the results table and what it says of the targets,
    and with --against the rows both commits measured, side by side."""
    rows = [Row(**r) for r in results["rows"]]
    load = ", ".join("/".join(f"{x:.2f}" for x in la) for la in results["load"])
    out = [
        f"- **Command**: `{results['command']}` (from the repository root)",
        f"- **Date**: {results['started']}; the run took {results['duration_s']:.0f} s"
        + (" (quick mode: small counts, the numbers mean nothing)" if results["quick"] else ""),
        f"- **Machine**: {results['machine']}; load average {load} (before, after)",
        f"- **Versions**: {results['versions']}",
        "",
        "| figure | measured | value | spread | baseline (same run) | ratio | target | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = "" if r.met is None else ("met" if r.met else "**missed**")
        out.append(_line([*dataclasses.astuple(r)[:7], met]))
    judged = [r for r in rows if r.met is not None]
    missed = [f"{r.figure}: {r.what.split(', ')[0]} ({r.target})" for r in judged if not r.met]
    out += ["", f"Targets met: {len(judged) - len(missed)} of {len(judged)}."]
    out[-1] += f" Missed: {'; '.join(missed)}." if missed else ""
    against = results.get("against")
    if against:
        ref = against["ref"]
        before = {(e["figure"], e["what"]): e["value"] for e in against["rows"]}
        out += ["", f"| figure | measured | this commit | {ref} | ratio |", "|---|---|---|---|---|"]
        for r in rows:
            if (r.figure, r.what) in before:
                was = before[(r.figure, r.what)]
                out.append(_line([r.figure, r.what, r.value, was, ratio(r.value, was)]))
    out += [f"\nNOT MEASURED: {e}" for e in results["errors"]]
    return "\n".join(out)


def _load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text(encoding="utf-8")))


def report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench report",
        description="Print the markdown of a results file: the rows of docs/benchmarks.md.",
    )
    ap.add_argument("file", type=Path, help="a results file (bench/results/*.json)")
    path = ap.parse_args(argv).file
    try:
        print(report(_load(path)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bench report: cannot read {path}: {e}", file=sys.stderr)
        return 2
    return 0
