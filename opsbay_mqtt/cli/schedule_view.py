"""How `opsbay schedule` shows schedules: text for people, JSON for scripts, and what
`schedule check` finds wrong (pure: a schedule is the dict the coordinator answers with)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import Job


def problem(s: dict[str, Any], now_ms: int, grace_s: int) -> str | None:
    """What is wrong with a schedule as `schedules` lists it, in words; None if nothing."""
    from opsbay_mqtt.states import TERMINAL

    if s["paused"]:
        return None
    fire = s["next_fire_ms"]
    if fire is not None and now_ms > fire + grace_s * 1000:
        late = (now_ms - fire) // 1000
        return f"overdue: due {utc(fire)}, no run {late}s later (is any coordinator running?)"
    last = s.get("last_run")
    if last is None:
        return None
    if last["job_id"] is None:
        return f"last due time {utc(last['due_ms'])} skipped: {last['code']}: {last['reason']}"
    state = last.get("state")
    if state in TERMINAL and state != "succeeded":
        return f"last run {last['job_id']} (due {utc(last['due_ms'])}) {state}"
    return None


# -- showing schedules
def public(data: Any) -> Any:
    """A schedule (or a list, or a run) as `--json` prints it: times as ISO 8601 UTC strings
    (`next_fire_ms` becomes `next_fire_at`, `upcoming_ms` a list `upcoming`), as for jobs."""
    from opsbay_mqtt.cli.render import iso

    if isinstance(data, list):
        return [public(x) for x in data]
    if not isinstance(data, dict):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key == "now_ms":
            continue
        if key.endswith("_ms") and isinstance(value, list):
            out[key[:-3]] = [iso(v) for v in value]
        elif key.endswith("_ms") and (value is None or isinstance(value, int)):
            out[key[:-3] + "_at"] = iso(value)
        else:
            out[key] = public(value)
    return out


def say(data: Any, json_out: bool, said: str) -> None:
    if json_out:
        typer.echo(json.dumps(public(data), indent=2))
        return
    line = said if data.get("removed") else f"{said}: {describe(data)}"
    if data.get("job_id"):
        line = f"{said}: job {data['job_id']}"
    elif not data.get("removed") and not data.get("paused") and data.get("next_fire_ms"):
        at = data["next_fire_ms"]
        line += f"; next run {in_zone(at, data['tz'])} ({utc(at)})"
    typer.echo(line)


def describe(s: dict[str, Any]) -> str:
    if s.get("removed"):
        return "removed"
    if s.get("every_s"):
        from opsbay_mqtt.schedules import duration

        return f"every {duration(s['every_s'])}"
    return f"cron {s['cron']} ({s['tz']})" if s.get("cron") else "?"


def shown_target(s: dict[str, Any]) -> str:
    labels = ",".join(f"{k}={v}" for k, v in sorted(s["where"].items()))
    return " ".join(x for x in (s["target"], f"where {labels}" if labels else "") if x)


def outcome(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r["job_id"] is None:
        many = f" x{r['count']}" if r["count"] > 1 else ""
        return f"skipped{many} ({r['code']}): {r['reason']}"
    return f"{r['state'] or 'pruned'} {r['job_id']} ({r['code']})"


def utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def in_zone(ms: int, tz: str) -> str:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")


def why_failed(job: Job) -> str:
    """Where a failed run failed and how, in a few words (its first three nodes that did not
    succeed): `: on web-01 failed, exit 3; on web-02 expired (exit 68): not started by ...`."""
    from opsbay_mqtt.cli.render import outcome as exec_outcome

    bad = [x for x in job.executions if x.state != "succeeded"]
    parts = []
    for x in bad[:3]:
        why = f": {x.reason}" if x.reason and x.state not in ("succeeded", "failed") else ""
        parts.append(f"on {x.node} {exec_outcome(x, job.timeout_s)}{why}")
    if job.reason_code:
        parts.append(f"{job.reason_code}: {job.reason}")
    more = f"; and {len(bad) - 3} more node(s)" if len(bad) > 3 else ""
    return (": " + "; ".join(parts) + more) if parts else ""
