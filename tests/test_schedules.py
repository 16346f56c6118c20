"""When schedules are due (`opsbay_mqtt.schedules`), pure: cron names and refusals, time zones,
daylight-saving time both ways in two zones, `every_s`, jitter, and what to do when due times
were missed (`plan`). Every instant is written out in UTC."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest

from opsbay_mqtt import schedules
from opsbay_mqtt.protocol import ScheduleSpec
from opsbay_mqtt.schedules import Plan


def utc(text: str) -> int:
    """Milliseconds since the epoch of an ISO time in UTC: `2026-03-29T01:00Z`."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")


def cron(expr: str, tz: str = "UTC", **fields: Any) -> ScheduleSpec:
    base: dict[str, Any] = dict(target="n1", command="true", timeout_s=10, start_within_s=60)
    return ScheduleSpec(cron=expr, tz=tz, **{**base, **fields})


def every(seconds: int, **fields: Any) -> ScheduleSpec:
    base: dict[str, Any] = dict(target="n1", command="true", timeout_s=10, start_within_s=5)
    return ScheduleSpec(every_s=seconds, **{**base, **fields})


def due_times(spec: ScheduleSpec, after: str, until: str) -> list[str]:
    """Every due time after `after` up to `until`, in UTC."""
    out, at, end = [], utc(after), utc(until)
    while (at := schedules.due_after(spec, at)) <= end:
        out.append(iso(at))
    return out


# -- cron expressions and zones
@pytest.mark.parametrize(
    ("name", "five", "first_after_2026_05_13"),
    [
        ("@yearly", "0 0 1 1 *", "2027-01-01T00:00Z"),
        ("@annually", "0 0 1 1 *", "2027-01-01T00:00Z"),
        ("@monthly", "0 0 1 * *", "2026-06-01T00:00Z"),
        ("@weekly", "0 0 * * 0", "2026-05-17T00:00Z"),  # 2026-05-17 is a Sunday
        ("@daily", "0 0 * * *", "2026-05-14T00:00Z"),
        ("@midnight", "0 0 * * *", "2026-05-14T00:00Z"),
        ("@hourly", "0 * * * *", "2026-05-13T11:00Z"),
        ("@Daily", "0 0 * * *", "2026-05-14T00:00Z"),  # cron's names in any case
    ],
)
def test_a_cron_name_runs_as_its_five_fields(
    name: str, five: str, first_after_2026_05_13: str
) -> None:
    assert schedules.check_cron(name) == name
    assert schedules.NAMED.get(name.lower()) == five
    start = utc("2026-05-13T10:17Z")
    named = schedules.upcoming(cron(name), start, 5)
    assert named == schedules.upcoming(cron(five), start, 5)
    assert iso(named[0]) == first_after_2026_05_13


@pytest.mark.parametrize(
    ("expr", "says"),
    [
        ("@reboot", "@reboot has no due time"),
        ("@REBOOT", "@reboot has no due time"),
        ("@fortnightly", "unknown name; use one of @yearly"),
        ("@", "unknown name"),
        ("", "five fields expected"),
        ("* * * *", "five fields expected (minute hour day-of-month month day-of-week), not 4"),
        ("* * * * * *", "not 6"),
        ("0 0 * * * 2026", "not 6"),  # no year field
        ("61 * * * *", "Bad minute"),
        ("*/0 * * * *", "Bad minute"),
        ("x * * * *", "Bad minute"),
        ("* 24 * * *", "Bad hour"),
        ("0 0 0 * *", "Bad day-of-month"),
        ("0 0 * 13 *", "Bad month"),
        ("0 0 * * 8", "Bad day-of-week"),
        ("0 0 31 2 *", "Bad day-of-month"),  # 31 February: never
        ("0 0 30 2 *", "Bad day-of-month"),
        ("0 0 31 4,6 *", "Bad day-of-month"),  # April and June have 30 days
    ],
)
def test_a_cron_expression_that_cannot_run_is_refused_saying_why(expr: str, says: str) -> None:
    with pytest.raises(ValueError) as refused:
        schedules.check_cron(expr)
    text = str(refused.value)
    assert text.startswith(f"{expr!r} is not a cron expression: "), text
    assert says in text


@pytest.mark.parametrize("expr", ["0 0 29 2 *", "0 0 31 2 1", "*/5 9-17 * * 1-5", " @daily "])
def test_rare_but_possible_cron_expressions_are_taken(expr: str) -> None:
    assert schedules.check_cron(expr) == expr


@pytest.mark.parametrize("zone", ["Europe/Berlin", "UTC", "America/New_York", "Etc/GMT+5"])
def test_iana_zones_are_taken(zone: str) -> None:
    assert schedules.check_zone(zone) == zone


@pytest.mark.parametrize(
    "zone", ["Mars/Base", "../etc/passwd", "", "/etc/localtime", "Europe/../UTC", "Berlin"]
)
def test_anything_but_an_iana_zone_is_refused(zone: str) -> None:
    with pytest.raises(ValueError, match="is not a time zone: give an IANA name such as UTC"):
        schedules.check_zone(zone)


# -- daylight-saving time
# Europe/Berlin: on 2026-03-29 the clocks go 02:00 CET -> 03:00 CEST (01:00Z); on 2026-10-25
# 03:00 CEST -> 02:00 CET (01:00Z), so local 02:00-03:00 comes twice: 00:00Z-01:00Z (CEST) and
# 01:00Z-02:00Z (CET). America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z); 2026-11-01
# 02:00 EDT -> 01:00 EST (06:00Z), local 01:00-02:00 twice: 05:00Z-06:00Z and 06:00Z-07:00Z.
#
# What cronsim yields is Debian cron's rule, and the values below show it:
# - a fixed-time job (neither minute nor hour a wildcard: `30 2 * * *`) whose local time the
#   clocks skip runs once, right after the change (03:00 CEST); one whose local time comes
#   twice runs once, on the first pass (CEST/EDT), never on the second;
# - a job with a wildcard in minute or hour (`0 * * * *`, `*/30 * * * *`, `*/15 2 * * *`)
#   follows real elapsed time: every real hour / half hour, so the repeated local hour gets
#   its runs twice (both passes), and the skipped hour none (there is no such time), with no
#   real hour left without its run.
@pytest.mark.parametrize(
    ("expr", "tz", "after", "until", "expected"),
    [
        # Spring, Berlin: 02:30 does not exist on 03-29: run once at 03:00 CEST.
        ("30 2 * * *", "Europe/Berlin", "2026-03-27T00:00Z", "2026-04-01T00:00Z",
         ["2026-03-27T01:30Z", "2026-03-28T01:30Z", "2026-03-29T01:00Z", "2026-03-30T00:30Z",
          "2026-03-31T00:30Z"]),
        ("0 2 * * *", "Europe/Berlin", "2026-03-28T00:00Z", "2026-03-30T12:00Z",
         ["2026-03-28T01:00Z", "2026-03-29T01:00Z", "2026-03-30T00:00Z"]),
        # Fall, Berlin: 02:30 comes twice on 10-25: once, at 02:30 CEST (00:30Z), not at 01:30Z.
        ("30 2 * * *", "Europe/Berlin", "2026-10-23T00:00Z", "2026-10-28T00:00Z",
         ["2026-10-23T00:30Z", "2026-10-24T00:30Z", "2026-10-25T00:30Z", "2026-10-26T01:30Z",
          "2026-10-27T01:30Z"]),
        # Hourly across the fall-back hour: every real hour, local 02:00 twice (CEST and CET).
        ("0 * * * *", "Europe/Berlin", "2026-10-24T22:30Z", "2026-10-25T03:30Z",
         ["2026-10-24T23:00Z", "2026-10-25T00:00Z", "2026-10-25T01:00Z", "2026-10-25T02:00Z",
          "2026-10-25T03:00Z"]),
        ("*/30 * * * *", "Europe/Berlin", "2026-10-24T23:10Z", "2026-10-25T02:40Z",
         ["2026-10-24T23:30Z", "2026-10-25T00:00Z", "2026-10-25T00:30Z", "2026-10-25T01:00Z",
          "2026-10-25T01:30Z", "2026-10-25T02:00Z", "2026-10-25T02:30Z"]),
        # Hourly across spring forward: 01:00 CET, then 03:00 CEST one real hour later.
        ("0 * * * *", "Europe/Berlin", "2026-03-28T23:30Z", "2026-03-29T02:30Z",
         ["2026-03-29T00:00Z", "2026-03-29T01:00Z", "2026-03-29T02:00Z"]),
        # Wildcard minutes in a fixed hour: none in the skipped hour, both passes of the other.
        ("*/15 2 * * *", "Europe/Berlin", "2026-03-28T12:00Z", "2026-03-30T12:00Z",
         ["2026-03-30T00:00Z", "2026-03-30T00:15Z", "2026-03-30T00:30Z", "2026-03-30T00:45Z"]),
        ("*/15 2 * * *", "Europe/Berlin", "2026-10-24T12:00Z", "2026-10-25T12:00Z",
         ["2026-10-25T00:00Z", "2026-10-25T00:15Z", "2026-10-25T00:30Z", "2026-10-25T00:45Z",
          "2026-10-25T01:00Z", "2026-10-25T01:15Z", "2026-10-25T01:30Z", "2026-10-25T01:45Z"]),
        # New York, spring: 02:30 does not exist on 03-08: 03:00 EDT (07:00Z).
        ("30 2 * * *", "America/New_York", "2026-03-06T00:00Z", "2026-03-09T12:00Z",
         ["2026-03-06T07:30Z", "2026-03-07T07:30Z", "2026-03-08T07:00Z", "2026-03-09T06:30Z"]),
        ("0 * * * *", "America/New_York", "2026-03-08T05:30Z", "2026-03-08T08:30Z",
         ["2026-03-08T06:00Z", "2026-03-08T07:00Z", "2026-03-08T08:00Z"]),
        # New York, fall: 01:30 comes twice on 11-01: once, at 01:30 EDT (05:30Z), not 06:30Z.
        ("30 1 * * *", "America/New_York", "2026-10-30T00:00Z", "2026-11-02T12:00Z",
         ["2026-10-30T05:30Z", "2026-10-31T05:30Z", "2026-11-01T05:30Z", "2026-11-02T06:30Z"]),
        ("30 2 * * *", "America/New_York", "2026-10-31T00:00Z", "2026-11-02T12:00Z",
         ["2026-10-31T06:30Z", "2026-11-01T07:30Z", "2026-11-02T07:30Z"]),  # 02:30 once: EST
        ("0 * * * *", "America/New_York", "2026-11-01T04:30Z", "2026-11-01T08:30Z",
         ["2026-11-01T05:00Z", "2026-11-01T06:00Z", "2026-11-01T07:00Z", "2026-11-01T08:00Z"]),
        ("*/30 * * * *", "America/New_York", "2026-11-01T04:50Z", "2026-11-01T07:10Z",
         ["2026-11-01T05:00Z", "2026-11-01T05:30Z", "2026-11-01T06:00Z", "2026-11-01T06:30Z",
          "2026-11-01T07:00Z"]),
        # Zones matter: the same fields in UTC.
        ("30 2 * * *", "UTC", "2026-03-28T12:00Z", "2026-03-30T12:00Z",
         ["2026-03-29T02:30Z", "2026-03-30T02:30Z"]),
    ],
)  # fmt: skip
def test_due_times_across_daylight_saving_changes(
    expr: str, tz: str, after: str, until: str, expected: list[str]
) -> None:
    assert due_times(cron(expr, tz), after, until) == expected


@pytest.mark.parametrize(
    ("expr", "tz", "at", "expected"),
    [
        # Inside the repeated hour (01:29Z = 02:29 CET, second pass): the first pass's 02:30.
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T01:29Z", "2026-10-25T00:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T01:30Z", "2026-10-25T00:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T01:31Z", "2026-10-25T00:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T00:30Z", "2026-10-25T00:30Z"),  # at: itself
        ("30 2 * * *", "Europe/Berlin", "2026-10-25T00:29Z", "2026-10-24T00:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-10-26T01:29Z", "2026-10-25T00:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T00:59Z", "2026-03-28T01:30Z"),
        ("30 2 * * *", "Europe/Berlin", "2026-03-29T02:00Z", "2026-03-29T01:00Z"),
        ("0 * * * *", "Europe/Berlin", "2026-10-25T00:59Z", "2026-10-25T00:00Z"),
        ("0 * * * *", "Europe/Berlin", "2026-10-25T01:30Z", "2026-10-25T01:00Z"),
        ("* * * * *", "Europe/Berlin", "2026-10-25T01:30Z", "2026-10-25T01:30Z"),
        ("15,45 * * * *", "Europe/Berlin", "2026-10-25T01:00Z", "2026-10-25T00:45Z"),
        ("15,45 * * * *", "Europe/Berlin", "2026-10-25T01:30Z", "2026-10-25T01:15Z"),
        ("30 1 * * *", "America/New_York", "2026-11-01T06:45Z", "2026-11-01T05:30Z"),
    ],
)  # fmt: skip
def test_the_last_due_time_at_or_before_an_instant(
    expr: str, tz: str, at: str, expected: str
) -> None:
    assert iso(schedules.due_at_or_before(cron(expr, tz), utc(at))) == expected


@pytest.mark.parametrize(
    ("expr", "tz", "start"),
    [
        ("30 2 * * *", "Europe/Berlin", "2026-10-23T00:00Z"),
        ("*/5 * * * *", "Europe/Berlin", "2026-10-24T23:00Z"),
        ("*/7 * * * *", "America/New_York", "2026-11-01T04:00Z"),
        ("*/10 1-3 * * *", "Europe/Berlin", "2026-03-28T23:00Z"),
    ],
)
def test_due_at_or_before_agrees_with_due_after_minute_by_minute(
    expr: str, tz: str, start: str
) -> None:
    spec = cron(expr, tz)
    first = utc(start)
    dues = [schedules.due_at_or_before(spec, first)]
    while dues[-1] < first + 6 * 3_600_000:
        dues.append(schedules.due_after(spec, dues[-1]))
    for at in range(first, first + 6 * 3_600_000, 37_000):
        expected = max(d for d in dues if d <= at)
        assert schedules.due_at_or_before(spec, at) == expected, iso(at)


# -- every_s
@pytest.mark.parametrize("period", [10, 60, 3600, 86400, 7 * 86400])
@pytest.mark.parametrize("after", [utc("2026-10-25T00:59Z") + 1, 1_800_000_000_123])
def test_every_is_due_at_multiples_of_its_period_since_the_epoch(period: int, after: int) -> None:
    spec = every(period)
    dues = schedules.upcoming(spec, after, 4)
    assert all(d % (period * 1000) == 0 for d in dues)
    assert after < dues[0] <= after + period * 1000
    assert [b - a for a, b in itertools.pairwise(dues)] == [period * 1000] * 3
    assert schedules.due_at_or_before(spec, dues[1]) == dues[1]
    assert schedules.due_at_or_before(spec, dues[1] - 1) == dues[0]
    assert schedules.due_after(spec, dues[0]) == dues[1]


def test_every_hour_runs_at_the_top_of_each_utc_hour_across_daylight_saving() -> None:
    spec = every(3600)
    assert due_times(spec, "2026-10-24T23:30Z", "2026-10-25T02:30Z") == [
        "2026-10-25T00:00Z", "2026-10-25T01:00Z", "2026-10-25T02:00Z",
    ]  # fmt: skip


# -- jitter
def test_jitter_is_the_same_for_the_same_due_time_within_bounds_and_varies() -> None:
    dues = [1_800_000_000_000 + i * 60_000 for i in range(200)]
    delays = [schedules.jitter_ms("backup", d, 30) for d in dues]
    assert delays == [schedules.jitter_ms("backup", d, 30) for d in dues]  # deterministic
    assert all(0 <= x <= 30_000 for x in delays)
    assert len(set(delays)) > 150  # not one delay for all
    assert max(delays) > 20_000 and min(delays) < 10_000  # spread over the range
    others = [schedules.jitter_ms("restore", d, 30) for d in dues]
    assert others != delays  # another schedule, other delays
    assert all(schedules.jitter_ms("backup", d, 0) == 0 for d in dues)
    spec = every(60, jitter_s=30)
    assert [schedules.fire_at("backup", spec, d) for d in dues] == [
        d + x for d, x in zip(dues, delays, strict=True)
    ]


# -- what to do when due times came (plan)
T = 1_800_000_000_000  # a multiple of 10 s
S = 1000


@pytest.mark.parametrize(
    ("spec", "now", "expected"),
    [
        # Not due yet.
        (every(10), T + 10 * S - 1, None),
        # On time: that due time, start-by = due + start window; nothing missed.
        (every(10), T + 10 * S, Plan(T + 10 * S, False, T + 15 * S, None, T + 20 * S)),
        (every(10), T + 15 * S, Plan(T + 10 * S, False, T + 15 * S, None, T + 20 * S)),
        # Back after several due times (10, 20, 30, 40 s), within the latest's window: run
        # only the latest (40 s); 10, 20, 30 were missed (three due times).
        (every(10), T + 43 * S,
         Plan(T + 40 * S, False, T + 45 * S, (T + 10 * S, T + 30 * S, 3), T + 50 * S)),
        # Beyond the latest's window, catch_up latest: run it anyway, as caught up, with a
        # start window from now.
        (every(10), T + 48 * S,
         Plan(T + 40 * S, True, T + 53 * S, (T + 10 * S, T + 30 * S, 3), T + 50 * S)),
        (every(10, start_within_s=5), T + 15 * S + 1,
         Plan(T + 10 * S, True, T + 20 * S + 1, None, T + 20 * S)),
        # Beyond the window, catch_up none: nothing runs; every due time was missed.
        (every(10, catch_up="none"), T + 48 * S,
         Plan(None, False, T + 53 * S, (T + 10 * S, T + 40 * S, 4), T + 50 * S)),
        (every(10, catch_up="none"), T + 15 * S + 1,
         Plan(None, False, T + 20 * S + 1, (T + 10 * S, T + 10 * S, 1), T + 20 * S)),
        # catch_up none, back within the latest's window: the latest runs.
        (every(10, catch_up="none"), T + 42 * S,
         Plan(T + 40 * S, False, T + 45 * S, (T + 10 * S, T + 30 * S, 3), T + 50 * S)),
    ],
)  # fmt: skip
def test_plan(spec: ScheduleSpec, now: int, expected: Plan | None) -> None:
    assert schedules.plan("p", spec, T + 10 * S, now) == expected


def test_plan_with_jitter_waits_for_the_delay_and_runs_the_latest_whose_delay_passed() -> None:
    spec = every(10, jitter_s=5, start_within_s=60)
    due = T + 10 * S
    fire = schedules.fire_at("j", spec, due)
    assert fire > due  # (this name and due time have a delay: checked, not assumed)
    assert schedules.plan("j", spec, due, fire - 1) is None
    planned = schedules.plan("j", spec, due, fire)
    assert planned == Plan(due, False, fire + 60 * S, None, due + 10 * S)
    # Back at 30 s: the 30 s due time's own delay has not passed yet unless it is 0.
    now = T + 30 * S
    later = schedules.plan("j", spec, due, now)
    assert later is not None
    latest = T + 30 * S if schedules.fire_at("j", spec, T + 30 * S) <= now else T + 20 * S
    assert later.fire_due_ms == latest
    assert later.next_due_ms == latest + 10 * S


def test_plan_across_the_fall_back_hour_runs_the_daily_job_once() -> None:
    spec = cron("30 2 * * *", "Europe/Berlin", start_within_s=3600)
    first = utc("2026-10-25T00:30Z")
    assert schedules.plan("d", spec, first, first - 1) is None
    on_time = schedules.plan("d", spec, first, utc("2026-10-25T00:31Z"))
    assert on_time == Plan(first, False, first + 3_600_000, None, utc("2026-10-26T01:30Z"))
    # Coming back during the second 02:30 (01:30Z), still within the hour's window.
    again = schedules.plan("d", spec, first, utc("2026-10-25T01:30Z"))
    assert again is not None and (again.fire_due_ms, again.missed) == (first, None)
    assert again.next_due_ms == utc("2026-10-26T01:30Z")


def test_plan_after_days_down_counts_the_missed_cron_due_times() -> None:
    spec = cron("0 * * * *", "Europe/Berlin", start_within_s=600)
    first = utc("2026-10-24T22:00Z")
    p = schedules.plan("h", spec, first, utc("2026-10-25T04:05Z"))
    # 22:00Z .. 03:00Z: 6 real hours (the repeated local hour counted twice), 04:00Z runs.
    assert p == Plan(
        utc("2026-10-25T04:00Z"), False, utc("2026-10-25T04:10Z"),
        (first, utc("2026-10-25T03:00Z"), 6), utc("2026-10-25T05:00Z"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "first", "last", "count"),
    [
        (every(10), T, T, 1),
        (every(10), T, T + 90 * S, 10),
        (every(10), T, T + 10_000_000 * S, 1_000_001),  # every_s: counted exactly, no cap
        (cron("0 * * * *", "Europe/Berlin"), utc("2026-10-25T00:00Z"),
         utc("2026-10-25T02:00Z"), 3),
        (cron("30 2 * * *", "Europe/Berlin"), utc("2026-10-24T00:30Z"),
         utc("2026-10-26T01:30Z"), 3),
        # cron: counted one by one up to the cap (more than 10 000 minutes here).
        (cron("* * * * *"), utc("2026-01-01T00:00Z"), utc("2026-01-15T00:00Z"),
         schedules.COUNT_CAP),
        (cron("* * * * *"), utc("2026-01-01T00:00Z"), utc("2026-01-01T00:00Z") + 9_998 * 60 * S,
         9_999),
    ],
)  # fmt: skip
def test_count_between(spec: ScheduleSpec, first: int, last: int, count: int) -> None:
    assert schedules.count_between(spec, first, last) == count


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (every(10), "every 10s"),
        (every(600), "every 10m"),
        (every(7200), "every 2h"),
        (every(86400), "every 1d"),
        (every(90), "every 90s"),
        (cron("30 2 * * *", "Europe/Berlin"), "cron 30 2 * * * (Europe/Berlin)"),
        (cron("@daily"), "cron @daily (UTC)"),
    ],
)
def test_describe(spec: ScheduleSpec, text: str) -> None:
    assert schedules.describe(spec) == text
