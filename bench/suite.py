"""`python -m bench`: run every figure, print the table, write docs/benchmarks.md.

    .venv/bin/python -m bench                         # the full suite, a few minutes on 2 cores
    .venv/bin/python -m bench --quick --out /tmp/x.md # CI: small counts, exits 0 if all ran
    .venv/bin/python -m bench --only latency,store    # some figures (see --list)
    .venv/bin/python -m bench --only throughput --profile /tmp/prof   # py-spy profiles
    .venv/bin/python -m bench --only cli,latency --against d91a920    # before/after, same run

Exit codes: 0 every figure was measured (missed targets included, unless --strict), 1 a figure
could not be measured (or, with --strict, a target was missed), 2 bad usage, 130 interrupted.
Every process the suite starts runs in its own session, is told by the kernel to stop if the
suite dies (PR_SET_PDEATHSIG), and is stopped on every way out (errors, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from bench import (
    against,
    fig_cli,
    fig_fleet,
    fig_intake,
    fig_latency,
    fig_store,
    fig_throughput,
    report,
)
from bench.common import OPSBAY, REPO, BenchError, Procs, Row, Suite


class Figure(NamedTuple):
    key: str
    title: str
    run: Callable[[Suite], list[Row]]
    notes: tuple[str, ...]


FIGURES = [
    Figure("cli", "CLI round trip", fig_cli.round_trip, (fig_cli.ROUND_TRIP,)),
    Figure("startup", "CLI start-up", fig_cli.startup, (fig_cli.START_UP,)),
    Figure(
        "latency",
        "bus latency, agent footprint",
        fig_latency.run,
        (fig_latency.LATENCY, fig_latency.BREAKDOWN, fig_latency.FOOTPRINT),
    ),
    Figure("throughput", "throughput", fig_throughput.run, (fig_throughput.THROUGHPUT,)),
    Figure("intake", "coordinator intake", fig_intake.run, (fig_intake.INTAKE,)),
    Figure("fleet", "fleet", fig_fleet.run, (fig_fleet.FLEET,)),
    Figure("store", "store", fig_store.run, (fig_store.STORE,)),
]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _command(argv: list[str]) -> str:
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        shown = str(exe)
    return " ".join([shown, "-m", "bench", *map(shlex.quote, argv)])


def _same_package() -> str | None:
    """The suite imports the package in-process and runs `opsbay` as a child: both must be the
    same copy (a PYTHONPATH or the working directory can make them differ)."""
    import subprocess

    import opsbay_mqtt

    mine = str(Path(opsbay_mqtt.__file__).resolve())
    code = "import opsbay_mqtt, pathlib; print(pathlib.Path(opsbay_mqtt.__file__).resolve())"
    head = OPSBAY.read_text().splitlines()[0].removeprefix("#!").strip()
    theirs = subprocess.run(
        [head, "-c", code], capture_output=True, text=True, timeout=30, cwd=OPSBAY.parent
    ).stdout.strip()
    if theirs != mine:
        return f"the suite imports {mine} but `opsbay` would run {theirs or '?'}"
    return None


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description="The opsbay-mqtt benchmark suite (issue 6)."
    )
    ap.add_argument("--quick", action="store_true", help="small counts: proves the suite runs")
    ap.add_argument(
        "--out",
        type=Path,
        help="where to write the report (default: docs/benchmarks.md for a full run of every "
        "figure; nothing for --quick, --only or --profile)",
    )
    ap.add_argument("--only", help="comma-separated figures to run (see --list)")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and its logs")
    ap.add_argument(
        "--profile", type=Path, metavar="DIR", help="record profiles into DIR (distorts numbers)"
    )
    ap.add_argument(
        "--against",
        metavar="REF",
        help="after each figure, run the same figure of git commit REF (its package and suite) "
        "and put the two side by side: a before/after in the same run",
    )
    return ap.parse_args(argv)


# What the suite's children import: compiled once before any figure, so that no figure (the
# idle worker's footprint, with --only, included) pays for compiling or measures its memory.
WARM = (
    "opsbay_mqtt.agent, opsbay_mqtt.cli.app, opsbay_mqtt.cli.admin, opsbay_mqtt.cli.jobs, "
    "opsbay_mqtt.cli.fleet, opsbay_mqtt.client, opsbay_mqtt.coordinator, opsbay_mqtt.daemons, "
    "opsbay_mqtt.cli.render, opsbay_mqtt.store, opsbay_mqtt.cli.waiting, opsbay_mqtt.worker, "
    "paho.mqtt.client, pydantic, typer, psutil"
)


def _warm_bytecode() -> None:
    build = "[m.model_rebuild(force=True) for m in opsbay_mqtt.protocol.MESSAGE_TYPES.values()]"
    code = f"import {WARM}, opsbay_mqtt.protocol; {build}"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args = parse(args_list)
    if args.list:
        for f in FIGURES:
            print(f"{f.key:12} {f.title}")
        return 0
    chosen = FIGURES
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = set(keys) - {f.key for f in FIGURES}
        if unknown:
            print(f"bench: unknown figure(s) {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        chosen = [f for f in FIGURES if f.key in keys]
    if not OPSBAY.exists():
        print(f"bench: {OPSBAY} not found: run with the venv's python", file=sys.stderr)
        return 2
    mismatch = _same_package()
    if mismatch:
        print(f"bench: {mismatch}", file=sys.stderr)
        return 2
    out = args.out
    if out is None and not (args.quick or args.only or args.profile):
        out = REPO / "docs" / "benchmarks.md"

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 65536):  # children inherit it: Mosquitto holds the fleet's sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    workdir = Path(tempfile.mkdtemp(prefix="opsbay-bench-"))
    # Every child (the CLI, the daemons) gets its bytecode cached, as an installed package has
    # it, in the work directory: never in the package's own tree.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    _warm_bytecode()
    suite = Suite(quick=args.quick, workdir=workdir, procs=Procs(workdir / "logs"))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        suite.profile_dir = args.profile.resolve()
    # Ctrl-C and SIGTERM end the run the same way (even when started with SIGINT ignored, as a
    # shell does for a background job): every process is stopped on the way out.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    rows: list[Row] = []
    errors: list[str] = []
    earlier: dict[tuple[str, str], str] = {}
    try:
        tree = against.unpack(args.against, workdir / "against") if args.against else None
        for fig in chosen:
            suite.say(f"{fig.title} ...")
            t = time.perf_counter()
            try:
                got = fig.run(suite)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                errors.append(f"{fig.title}: {type(e).__name__}: {e}")
                suite.say(f"{fig.title} FAILED:\n{traceback.format_exc()}")
                suite.procs.stop_all()
                continue
            rows += got
            suite.say(f"{fig.title}: done in {time.perf_counter() - t:.1f} s")
            if tree is not None:
                suite.say(f"{fig.title}, as of {args.against} ...")
                try:
                    earlier.update(against.run_figure(suite, tree, fig.key))
                except BenchError as e:
                    errors.append(f"{fig.title} as of {args.against}: {e}")
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        suite.say("interrupted; stopping every process")
        suite.procs.stop_all()
        print(f"bench: logs kept in {workdir}/logs", file=sys.stderr)
        return 130
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        suite.procs.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    info = report.RunInfo(
        command=_command(args_list),
        started=started,
        duration_s=time.perf_counter() - t0,
        quick=args.quick,
        load_before=load_before,
        load_after=os.getloadavg(),
    )
    print(report.table(rows))
    print()
    print(report.verdict(rows))
    compared = against.table(args.against, rows, earlier) if args.against else None
    if compared is not None:
        print()
        print(compared)
    for error in errors:
        print(f"NOT MEASURED: {error}")
    if out is not None:
        notes = [n for f in chosen for n in f.notes]
        text = report.document(
            info, rows, notes, errors, report.kept_part(out), (args.against, compared)
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"bench: wrote {out}", file=sys.stderr)
    if errors or args.keep:
        print(f"bench: logs kept in {workdir}/logs", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if errors:
        return 1
    if args.strict and any(r.met is False for r in rows):
        return 1
    return 0
