"""`--profile DIR`: py-spy under the coordinator and the workers, `-X importtime` and
pyinstrument for the CLI. The figures of such a run are distorted by the profilers: read the
profiles, not the numbers. py-spy and pyinstrument are not dependencies of the package:
`.venv/bin/pip install py-spy pyinstrument`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.common import BIN, BenchError

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if found is None:
        raise BenchError("--profile needs py-spy: .venv/bin/pip install py-spy pyinstrument")
    return found


def attach(pid: int, out: Path) -> list[str]:
    """py-spy sampling the running process `pid` at 250 Hz; raw (collapsed) stacks go to `out`.
    py-spy writes them when the process ends or on SIGINT. Attached once the daemon is ready,
    not wrapped around its start: `opsbay worker` execs into the agent, which a wrapping py-spy
    would not follow."""
    return [py_spy(), "record", "-r", "250", "-f", "raw", "-o", str(out), "--pid", str(pid)]


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m['func']} ({path})"


def summarize_raw(path: Path, top: int = 25) -> str:
    """Self and inclusive sample counts by function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if total == 0:
        return f"{path.name}: no samples\n"
    out = [f"{path.name}: {total} samples (busy threads only)", "", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out) + "\n"


def importtime(argv: list[str], out: Path, top: int = 25) -> str:
    """`python -X importtime` of a command: the modules with the largest cumulative time."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], capture_output=True, text=True, timeout=60
    )
    rows = []
    for line in done.stderr.splitlines():
        parts = [p.strip() for p in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            rows.append((int(parts[1]), int(parts[0]), parts[2]))
    out.write_text(done.stderr)
    rows.sort(reverse=True)
    lines = [f"{' '.join(argv[-2:])}: imports by cumulative time (µs, self µs)"]
    lines += [f"  {cum:8d} {own:8d}  {name}" for cum, own, name in rows[:top]]
    return "\n".join(lines) + "\n"


def pyinstrument(argv: list[str], out: Path, env: dict[str, str] | None) -> None:
    subprocess.run(
        [sys.executable, "-m", "pyinstrument", "-r", "text", "-o", str(out), *argv],
        env=env,
        capture_output=True,
        timeout=60,
    )
