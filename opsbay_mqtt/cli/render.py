"""What the CLI shows: exit codes, public JSON, tables. Pure functions over jobs and nodes."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from opsbay_mqtt.errors import (
    EXIT_CANCELLED,
    EXIT_CONFIG,
    EXIT_EXPIRED,
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_REJECTED,
    EXIT_TIMED_OUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    EXIT_WAIT_GAVE_UP,
)
from opsbay_mqtt.protocol import Execution, Job, wire

__all__ = [  # the exit codes, for the commands that read them from here
    "EXIT_CANCELLED",
    "EXIT_CONFIG",
    "EXIT_EXPIRED",
    "EXIT_LOST",
    "EXIT_NOT_FOUND",
    "EXIT_REJECTED",
    "EXIT_TIMED_OUT",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "EXIT_WAIT_GAVE_UP",
]

_STATE_EXIT = {
    "timed_out": EXIT_TIMED_OUT,
    "expired": EXIT_EXPIRED,
    "cancelled": EXIT_CANCELLED,
    "lost": EXIT_LOST,
    "rejected": EXIT_REJECTED,
    "pending": EXIT_WAIT_GAVE_UP,
    "running": EXIT_WAIT_GAVE_UP,
}


def exit_code(job: Job) -> int:
    """0 when every execution succeeded. One execution that failed: the command's own exit
    code. Several executions: 1 when the worst outcome is a failure; otherwise the code of the
    job's state (its worst outcome), as for one execution."""
    if job.state == "succeeded":
        return 0
    if job.state == "failed":
        if len(job.executions) != 1:
            return 1
        code = job.executions[0].exit_code
        return code if code is not None and 0 < code < 256 else 1
    return _STATE_EXIT[job.state]


# C0 controls (but tab), DEL and C1 controls; with or without the newline.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escaped(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def visible(text: str, keep_newlines: bool = False) -> str:
    """`text` with its control characters shown escaped (ESC as `\\x1b`, CR as `\\x0d`), tabs
    kept, and with `keep_newlines` newlines too: for a terminal, which a job's output or
    whatever a message carries must not drive."""
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escaped, text)


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public_job(job: Job) -> dict[str, Any]:
    """The job as `--json` prints it: times as ISO 8601 UTC strings named `*_at`."""
    d = wire(job)
    d["submitted_at"] = iso(d.pop("submitted_ms"))
    d["start_by"] = iso(d.pop("start_by_ms"))
    for ex in d["executions"]:
        for key in ("dispatched", "started", "finished"):
            ex[f"{key}_at"] = iso(ex.pop(f"{key}_ms"))
        ex["start_by"] = iso(ex.pop("start_by_ms"))
    return d


def public_node(node: dict[str, Any], now_ms: int) -> dict[str, Any]:
    d = dict(node)
    seen = d.pop("last_seen_ms", 0)
    d["last_seen"] = iso(seen) if seen else None
    d["last_seen_ago_s"] = (now_ms - seen) // 1000 if seen else None
    if "conflict_ms" in d:  # two agents used this node's name: when, and what happened
        d["conflict_at"] = iso(d.pop("conflict_ms"))
    return d


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _ago(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(0, seconds)}s ago"


def _bytes(n: int | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def jobs_table(jobs: list[Job]) -> str:
    rows = []
    for j in jobs:
        ex = j.executions[0] if j.executions else None
        command = j.command.replace("\n", " ")
        rows.append(
            [
                j.job_id,
                j.state,
                j.target,
                "-" if ex is None or ex.exit_code is None else str(ex.exit_code),
                _duration(ex.duration_ms if ex else None),
                iso(j.submitted_ms) or "-",
                command if len(command) <= 40 else command[:37] + "...",
            ]
        )
    return table(["JOB", "STATE", "TARGET", "EXIT", "DURATION", "SUBMITTED", "COMMAND"], rows)


def nodes_table(nodes: list[dict[str, Any]], now_ms: int) -> str:
    rows, conflicts = [], []
    for n in nodes:
        p = public_node(n, now_ms)
        if p.get("conflict"):
            conflicts.append(
                f"{p['node']}: two agents used this name ({p['conflict_at']}): {p['conflict']}"
            )
        f = p.get("facts") or {}
        labels = ",".join(f"{k}={v}" for k, v in sorted((p.get("labels") or {}).items()))
        refused = (p.get("refused_labels") or {}).items()
        if refused:  # claimed by the node, not granted by the coordinator's key file
            labels += " (not granted: " + ",".join(f"{k}={v}" for k, v in sorted(refused)) + ")"
        rows.append(
            [
                p["node"],
                p["state"] + (" (conflict)" if p.get("conflict") else ""),
                _ago(p["last_seen_ago_s"]),
                str(f.get("hostname", "-")),
                str(f.get("distro") or f.get("os") or "-"),
                str(f.get("arch", "-")),
                str(f.get("kernel", "-")),
                _ago(f.get("uptime_s")).replace(" ago", "") if f.get("uptime_s") else "-",
                str(f.get("cpu_count", "-")),
                _bytes(f.get("memory_total")),
                _bytes(f.get("disk_free")),
                labels or "-",
            ]
        )
    headers = ["NODE", "STATUS", "LAST SEEN", "HOSTNAME", "OS", "ARCH", "KERNEL", "UPTIME",
               "CPUS", "MEMORY", "DISK FREE", "LABELS"]  # fmt: skip
    return "\n".join([table(headers, rows), *conflicts])


def _seconds(s: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def outcome(ex: Execution, timeout_s: int) -> str:
    """An execution's state and the exit code it stands for: the command's own when it ran to
    its end, else the one `opsbay` exits with for that state (not the 143 of the TERM that
    ended a timed-out command)."""
    if ex.state in ("succeeded", "failed"):
        return f"{ex.state}, exit {'-' if ex.exit_code is None else ex.exit_code}"
    if ex.state == "timed_out":
        return f"timed_out (killed after the {_seconds(timeout_s)} timeout; exit {EXIT_TIMED_OUT})"
    if ex.state in ("pending", "running"):
        return ex.state
    return f"{ex.state} (exit {_STATE_EXIT[ex.state]})"


def job_summary(job: Job) -> str:
    lines = [f"job      {job.job_id}", f"state    {job.state}", f"command  {job.command}"]
    if job.reason:
        lines.append(f"reason   {job.reason_code}: {job.reason}")
    for ex in job.executions:
        lines.append(
            f"node     {ex.node}: {outcome(ex, job.timeout_s)}, {_duration(ex.duration_ms)}, "
            f"started {iso(ex.started_ms) or '-'}"
        )
        if ex.reason:
            lines.append(f"         {ex.reason}")
        if ex.truncated:
            lines.append(
                f"         output truncated: {ex.stdout_bytes} bytes of stdout, "
                f"{ex.stderr_bytes} of stderr (head and tail kept)"
            )
    return "\n".join(lines)
