"""When a schedule is due, and what to do about due times that passed (pure: times are
milliseconds since the epoch, passed in).

Cron expressions, time zones and daylight-saving time come from cronsim and zoneinfo, never from
code of ours. cronsim follows Debian cron across DST changes: a run at a fixed time inside the hour
that the clocks skip runs once, right after the change; one inside the hour that they repeat runs
once, the first time. `every_s` counts real seconds from the epoch (so a 1 h schedule runs at the
top of each UTC hour, on every coordinator alike) and knows nothing of zones.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from opsbay_mqtt.protocol import ScheduleSpec

# The `@name` forms cron itself takes. `@reboot` has no due time: refused (see `check_cron`).
NAMED = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
COUNT_CAP = 10_000  # missed due times counted one by one up to this many, then "at least"


def check_cron(expr: str) -> str:
    """`expr` if it is a five-field cron expression or an `@name` of NAMED; ValueError saying
    what is wrong otherwise."""
    try:
        five = _five(expr)
        _next(five, datetime(2026, 1, 1, tzinfo=UTC))
    except (CronSimError, StopIteration) as e:
        why = str(e) or "it never matches a date"
        raise ValueError(f"{expr!r} is not a cron expression: {why}") from None
    return expr


def _five(expr: str) -> str:
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() == "@reboot":
            raise CronSimError("@reboot has no due time (the bus does not reboot)")
        named = NAMED.get(text.lower())
        if named is None:
            raise CronSimError(f"unknown name; use one of {', '.join(NAMED)}")
        return named
    if len(text.split()) != 5:
        raise CronSimError(
            "five fields expected (minute hour day-of-month month day-of-week), "
            f"not {len(text.split())}"
        )
    return text


def check_jitter(cron: str, tz: str, jitter_s: int, now_s: float | None = None) -> None:
    """ValueError if a random delay of up to `jitter_s` could reach the next due time of
    `cron` (over its next 200 due times): a run must start before the next one is due."""
    if jitter_s <= 0:
        return
    five, zone = _five(cron), _zone(tz)
    at = datetime.fromtimestamp(int(time.time() if now_s is None else now_s), zone)
    shortest = None
    it = CronSim(five, at)
    prev = _ms(next(it))
    for _ in range(200):
        try:
            nxt = _ms(next(it))
        except StopIteration:
            break
        gap, prev = nxt - prev, nxt
        shortest = gap if shortest is None else min(shortest, gap)
    if shortest is not None and jitter_s * 1000 >= shortest:
        raise ValueError(
            f"{duration(jitter_s)} is not shorter than the shortest time between two due times "
            f"of {cron!r} ({duration(shortest // 1000)}): a run would start after the next one"
        )


def check_zone(name: str) -> str:
    """`name` if it is an IANA time zone (Europe/Berlin, America/New_York, UTC)."""
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not a time zone: give an IANA name such as UTC, Europe/Berlin or "
            "America/New_York"
        ) from None
    return name


# Names in the zone database that are not zones a schedule means: `localtime` is whatever each
# coordinator's host is set to (two coordinators could disagree), the others are artefacts.
NOT_ZONES = frozenset({"localtime", "posixrules", "factory"})


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    if not name or name.startswith(("/", ".")) or ".." in name or name.lower() in NOT_ZONES:
        raise ValueError(name)
    return ZoneInfo(name)


def _next(five: str, after: datetime, reverse: bool = False) -> datetime:
    return next(CronSim(five, after, reverse=reverse))


def _ms(dt: datetime) -> int:
    return int(dt.timestamp()) * 1000


def _at(spec: ScheduleSpec, ms: int) -> datetime:
    return datetime.fromtimestamp(ms // 1000, _zone(spec.tz))


def due_after(spec: ScheduleSpec, after_ms: int) -> int:
    """The first due time strictly after `after_ms`."""
    if spec.every_s is not None:
        period = spec.every_s * 1000
        return (after_ms // period + 1) * period
    assert spec.cron is not None
    return _ms(_next(_five(spec.cron), _at(spec, after_ms)))


def due_at_or_before(spec: ScheduleSpec, ms: int) -> int:
    """The last due time at or before `ms`."""
    if spec.every_s is not None:
        period = spec.every_s * 1000
        return ms // period * period
    assert spec.cron is not None
    found = _ms(_next(_five(spec.cron), _at(spec, ms + 1000), reverse=True))
    # cronsim goes back in wall-clock time: inside an hour the clocks repeat, a due time of
    # the first pass is "after" a time of the second. Forward from there is exact.
    for _ in range(48):
        after = due_after(spec, found)
        if after > ms:
            break
        found = after
    return found


def upcoming(spec: ScheduleSpec, after_ms: int, n: int = 5) -> list[int]:
    """The next `n` due times after `after_ms`."""
    out: list[int] = []
    at = after_ms
    for _ in range(n):
        at = due_after(spec, at)
        out.append(at)
    return out


def jitter_ms(name: str, due_ms: int, jitter_s: int) -> int:
    """The random delay of one due time: the same on every coordinator (a hash of the name and
    the due time), so that all of them agree when a run is late."""
    if jitter_s <= 0:
        return 0
    digest = hashlib.blake2b(f"{name}\0{due_ms}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (jitter_s * 1000 + 1)


def fire_at(name: str, spec: ScheduleSpec, due_ms: int) -> int:
    """When the run of `due_ms` starts: the due time plus its random delay."""
    return due_ms + jitter_ms(name, due_ms, spec.jitter_s)


@dataclass(frozen=True)
class Plan:
    """What to do now about a schedule whose next due time has come."""

    fire_due_ms: int | None  # the due time to run now (None: none)
    caught_up: bool  # that run makes up a due time missed beyond its start window
    start_by_ms: int  # the run's start-by deadline
    missed: tuple[int, int, int] | None  # (first, last, count) of due times skipped as missed
    next_due_ms: int  # the next due time after all of these


def plan(name: str, spec: ScheduleSpec, next_due_ms: int, now_ms: int) -> Plan | None:
    """None while the next due time's run is not yet to start. Otherwise: every due time that
    came since is handled at once. Only the latest one may run: the others were missed (no
    coordinator ran at their time), and are recorded so. The latest runs if it can still start
    within its start window (`start_within_s` after its due time) or, past it, if `catch_up` is
    `latest`; otherwise it is missed too."""
    if now_ms < fire_at(name, spec, next_due_ms):
        return None
    latest = max(next_due_ms, due_at_or_before(spec, now_ms))
    if latest > next_due_ms and fire_at(name, spec, latest) > now_ms:
        latest = max(next_due_ms, due_at_or_before(spec, latest - 1000))
    window = spec.start_within_s * 1000
    on_time = now_ms <= fire_at(name, spec, latest) + window
    fire = latest if on_time or spec.catch_up == "latest" else None
    last_missed = latest if fire is None else _before(spec, latest, next_due_ms)
    missed = None
    if last_missed is not None:
        missed = (next_due_ms, last_missed, count_between(spec, next_due_ms, last_missed))
    start_by = fire_at(name, spec, latest) + window if on_time else now_ms + window
    return Plan(fire, fire is not None and not on_time, start_by, missed, due_after(spec, latest))


def _before(spec: ScheduleSpec, due_ms: int, first_ms: int) -> int | None:
    """The due time before `due_ms`, if it is not before `first_ms`."""
    if due_ms <= first_ms:
        return None
    prev = due_at_or_before(spec, due_ms - 1000)
    return prev if prev >= first_ms else None


def count_between(spec: ScheduleSpec, first_ms: int, last_ms: int) -> int:
    """How many due times from `first_ms` to `last_ms` (both due times), counted up to
    COUNT_CAP."""
    if spec.every_s is not None:
        return (last_ms - first_ms) // (spec.every_s * 1000) + 1
    n, at = 1, first_ms
    while at < last_ms and n < COUNT_CAP:
        at = due_after(spec, at)
        n += 1
    return n


def describe(spec: ScheduleSpec) -> str:
    """When it runs, in a few words: `cron 30 2 * * * (Europe/Berlin)`, `every 10s`."""
    if spec.every_s is not None:
        return f"every {duration(spec.every_s)}"
    return f"cron {spec.cron} ({spec.tz})"


def duration(seconds: int) -> str:
    """90 -> 90s, 600 -> 10m, 7200 -> 2h, 86400 -> 1d: the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
