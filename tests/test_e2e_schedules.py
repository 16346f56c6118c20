"""Schedules through a real Mosquitto, coordinator and worker, driven by the `opsbay` CLI:
real runs of `--every` schedules, waited for (no clock is faked here)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from opsbay_mqtt.cli.schedule_view import problem
from tests.helpers import Bus, wait_until

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_url, a database of its own for each test

EVERY = "10s"  # the shortest interval: a test waits for real runs


def runs(bus: Bus, name: str) -> list[dict[str, Any]]:
    jobs = bus.cli_json("results", "--schedule", name, "--limit", "100")
    assert isinstance(jobs, list)
    return jobs


def test_every_runs_for_real_and_is_watchable_and_checked(running: Bus) -> None:
    watcher = running.watch("jobs/#")
    out = running.cli("schedule", "add", "hc", "--every", EVERY, "-t", "n1", "-c", "echo tick")
    assert out.returncode == 0, out.stderr
    assert "schedule hc added: every 10s; next run" in out.stdout

    done = wait_until(
        lambda: len(j := [x for x in runs(running, "hc") if x["state"] == "succeeded"]) >= 2 and j,
        40,
        "two runs of hc to succeed",
    )
    assert all(j["schedule"] == "hc" and j["target"] == "n1" for j in done)
    assert all(j["executions"][0]["stdout"] == "tick\n" for j in done)
    # Each run is an ordinary job: a plain MQTT subscriber sees its events.
    seen = watcher.wait_for(
        lambda topic, body, retained: body.get("job", {}).get("schedule") == "hc",
        "a job event of a run of hc",
    )
    assert seen

    shown = running.cli_json("schedule", "show", "hc")
    assert shown["name"] == "hc" and shown["every_s"] == 10 and len(shown["upcoming"]) == 5
    fired = [r for r in shown["runs"] if r["code"] == "scheduled"]
    assert len({r["due_at"] for r in fired}) == len(fired) >= 2  # one run per due time
    assert {r["job_id"] for r in fired} >= {j["job_id"] for j in done}

    check = running.cli("schedule", "check")
    assert (check.returncode, check.stdout.strip()) == (0, "ok: 1 schedule(s)"), check.stderr

    # A failing schedule: `check` names it and exits 1; paused, it is not checked.
    failing = running.cli("schedule", "add", "bad", "--every", EVERY, "-t", "n1", "-c", "exit 3")
    assert failing.returncode == 0, failing.stderr
    run_now = running.cli("schedule", "run", "bad", "--wait")
    assert run_now.returncode == 3, run_now.stderr
    check = running.cli("schedule", "check")
    assert check.returncode == 1
    assert check.stdout.startswith("bad: last run ") and "failed" in check.stdout
    assert check.stdout.rstrip().endswith(": on n1 failed, exit 3"), check.stdout
    assert "hc" not in check.stdout
    assert running.cli("schedule", "check", "hc").returncode == 0
    assert running.cli("schedule", "check", "nope").returncode == 66
    assert running.cli("schedule", "pause", "bad").returncode == 0
    listed = {s["name"]: s for s in running.cli_json("schedule", "list")}
    assert listed["bad"]["paused"] is True and listed["bad"]["next_fire_at"] is None
    assert running.cli("schedule", "check").returncode == 0

    # The same name again is bad usage; removed, the name is free again.
    again = running.cli("schedule", "add", "hc", "--every", EVERY, "-t", "n1", "-c", "true")
    assert again.returncode == 2 and "schedule_exists" in again.stderr
    assert running.cli("schedule", "remove", "bad").returncode == 0
    assert running.cli("schedule", "remove", "bad").returncode == 66
    assert "bad" not in {s["name"] for s in running.cli_json("schedule", "list")}
    assert running.cli("schedule", "add", "bad", "--every", "1h", "-t", "n1", "-c", "true")
    assert all(p.poll() is None for p in running.procs)


def test_coordinator_killed_then_back_runs_each_due_time_at_most_once(running: Bus) -> None:
    out = running.cli("schedule", "add", "tick", "--every", EVERY, "-t", "n1", "-c", "echo t")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: runs(running, "tick"), 30, "a first run of tick")
    coordinator = running.procs[0]
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(10)
    before = {j["job_id"] for j in runs_offline(running)}
    killed_at = time.time()
    # Down across two due times at least: nothing but time passing is waited for here.
    wait_until(lambda: time.time() > killed_at + 21, 30, "two due times to pass")
    running.coordinator()
    shown = wait_until(
        lambda: (s := running.cli_json("schedule", "show", "tick", "--runs", "100"))["runs"]
        and any(r["code"] in ("scheduled", "caught_up") and r["job_id"] not in before
                for r in s["runs"]) and s,
        40,
        "a run after the restart",
    )  # fmt: skip
    dues = [r["due_at"] for r in shown["runs"]]
    assert len(dues) == len(set(dues)), "a due time recorded twice"
    jobs = runs(running, "tick")
    missed = [r for r in shown["runs"] if r["code"] == "missed"]
    assert missed and missed[0]["count"] >= 1, shown["runs"]
    run_ids = [r["job_id"] for r in shown["runs"] if r["job_id"]]
    assert sorted(run_ids) == sorted(j["job_id"] for j in jobs), "a run without its job"
    assert len(run_ids) == len(set(run_ids))


def runs_offline(bus: Bus) -> list[dict[str, Any]]:
    """The runs recorded before the coordinator died, read from its SQLite record directly."""
    import sqlite3

    db = sqlite3.connect(bus.tmp / "data" / "opsbay.db")
    try:
        rows = db.execute("SELECT job_id FROM jobs WHERE schedule IS NOT NULL").fetchall()
    finally:
        db.close()
    return [{"job_id": r[0]} for r in rows]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cron", "61 * * * *"], "--cron: '61 * * * *' is not a cron expression"),
        (["--cron", "* * *"], "five fields expected"),
        (["--cron", "@reboot"], "@reboot has no due time"),
        (["--cron", "0 3 * * *", "--tz", "Mars/Base"], "--tz: 'Mars/Base' is not a time zone"),
        (["--every", "5s"], "--every: '5s' is below the minimum interval, 10s"),
        (["--every", "10s", "--tz", "Europe/Berlin"], "--tz: applies to --cron only"),
        (["--every", "1m", "--jitter", "1m"], "--jitter: must be shorter than the --every"),
        (["--every", "1m", "--overlap", "queue"], "--overlap: 'queue': give skip or allow"),
        (["--every", "1m", "--catch-up", "all"], "--catch-up: 'all': give latest or none"),
        (["--cron", "0 3 * * *", "--tz", "localtime"], "--tz: 'localtime' is not a time zone"),
        (["--cron", "* * * * *", "--jitter", "1m"], "--jitter: 1m is not shorter than"),
        ([], "give --cron EXPR or --every DURATION"),
        (["--cron", "@daily", "--every", "1m"], "give --cron EXPR or --every DURATION"),
    ],
)
def test_bad_schedules_exit_2_before_anything_is_sent(bus: Bus, args: list[str], says: str) -> None:
    # No coordinator runs on this bus: all of these are refused before connecting.
    out = bus.cli("schedule", "add", "x", *args, "-t", "n1", "-c", "true", timeout=20)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr


def test_bad_name_exits_2(bus: Bus) -> None:
    out = bus.cli("schedule", "add", "a/b", "--every", "1m", "-t", "n1", "-c", "true")
    assert out.returncode == 2 and "a schedule name is 1-63 of" in out.stderr


def test_import_crontab_adds_each_entry_and_refuses_reboot(running: Bus, tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text(
        "# backups\n"
        "MAILTO=ops@example.com\n"
        "PATH=/usr/bin:/bin\n"
        "CRON_TZ=Europe/Berlin\n"
        "30 2 * * * echo backup\n"
        "@hourly echo hourly\n"
        "@reboot echo booted\n"
    )
    refused = running.cli("schedule", "import", str(crontab), "-t", "n1")
    assert refused.returncode == 2
    assert "line 7: refused: @reboot" in refused.stderr and "nothing added" in refused.stderr
    assert running.cli_json("schedule", "list") == []

    out = running.cli("schedule", "import", str(crontab), "-t", "n1", "--skip-refused")
    assert out.returncode == 0, out.stderr
    listed = {s["name"]: s for s in running.cli_json("schedule", "list")}
    assert set(listed) == {"n1-5", "n1-6"}
    assert (listed["n1-5"]["cron"], listed["n1-5"]["tz"]) == ("30 2 * * *", "Europe/Berlin")
    assert listed["n1-5"]["command"] == "export PATH=/usr/bin:/bin; echo backup"
    assert listed["n1-6"]["cron"] == "@hourly"
    # Imported again, or edited so that every line moved: nothing is scheduled twice.
    crontab.write_text("# moved\n# down\n" + crontab.read_text())
    again = running.cli("schedule", "import", str(crontab), "-t", "n1", "--skip-refused")
    assert again.returncode == 0, again.stderr
    assert "n1-7: already scheduled as n1-5; left as it is" in again.stderr
    assert set(s["name"] for s in running.cli_json("schedule", "list")) == {"n1-5", "n1-6"}
    # Several names at once.
    paused = running.cli("schedule", "pause", "n1-5", "n1-6")
    assert paused.returncode == 0 and paused.stdout.count("paused") == 2, paused.stderr
    assert all(s["paused"] for s in running.cli_json("schedule", "list"))
    assert running.cli("schedule", "resume", "n1-5", "n1-6").returncode == 0
    # The commands run as the crontab meant them: PATH exported.
    job = json.loads(running.cli("schedule", "run", "n1-6", "--wait", "--json").stdout)
    assert job["state"] == "succeeded" and job["executions"][0]["stdout"] == "hourly\n"


def test_check_reports_overdue_and_skips() -> None:
    base: dict[str, Any] = {"paused": False, "next_fire_ms": 1_000_000, "last_run": None}
    assert problem(base, 1_000_000 + 59_000, 60) is None
    late = problem(base, 1_000_000 + 120_000, 60)
    assert late is not None and late.startswith("overdue: due ") and "120s later" in late
    assert problem({**base, "paused": True}, 10**9, 60) is None
    skipped = {"job_id": None, "due_ms": 990_000, "code": "overlap", "reason": "still running"}
    said = problem({**base, "last_run": skipped}, 1_000_000, 60)
    assert said is not None and "skipped: overlap: still running" in said
    running_run = {"job_id": "j", "due_ms": 990_000, "state": "running"}
    assert problem({**base, "last_run": running_run}, 1_000_000, 60) is None


def test_two_coordinators_on_postgresql_run_each_due_time_once_through_a_kill(
    bus: Bus, pg_url: str, tmp_path: Path
) -> None:
    """20 schedules every 10 s, two coordinators on one PostgreSQL record; one is killed with
    -9 between due times. Every due time from the first run to the last has exactly one run
    (none twice, none skipped), each ran on its node once, and a run's job exists for each."""
    import psycopg

    from tests.test_e2e_coordinators import start_coordinator

    a = start_coordinator(bus, "a", pg_url)
    start_coordinator(bus, "b", pg_url)
    bus.worker("n1")
    marks = tmp_path / "marks"
    marks.mkdir()
    for i in range(20):
        out = bus.cli(
            "schedule", "add", f"s{i}", "--every", EVERY, "-t", "n1",
            "-c", f"echo run >> {marks / str(i)}",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr

    def fired() -> list[tuple[str, int, str | None, str]]:
        with psycopg.connect(pg_url) as db:
            rows = db.execute("SELECT name, due_ms, job_id, code FROM schedule_runs").fetchall()
        return [(str(n), int(d), j, str(c)) for n, d, j, c in rows]

    def rounds() -> int:
        return len({d for _, d, _, _ in fired()})

    wait_until(lambda: rounds() >= 2, 40, "two rounds of runs")
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    wait_until(lambda: rounds() >= 4, 40, "two more rounds with one coordinator left")

    rows = fired()
    by_name: dict[str, list[int]] = {}
    for name, due, job_id, code in rows:
        assert code == "scheduled" and job_id, (name, due, code)
        by_name.setdefault(name, []).append(due)
    last_round = max(d for _, d, _, _ in rows)
    for name, dues in by_name.items():
        ordered = sorted(dues)
        assert len(ordered) == len(set(ordered)), f"{name}: a due time ran twice"
        if ordered[-1] == last_round:  # not the round still being fired as we read
            assert ordered == list(range(ordered[0], ordered[-1] + 1, 10_000)), (
                f"{name}: a due time without its run: {ordered}"
            )
    jobs = {j["job_id"]: j for name in by_name for j in runs(bus, name)}
    assert {job_id for _, _, job_id, _ in rows} <= set(jobs)
    # What ran on the node: once per succeeded run, never twice (paused: no more runs).
    for name in by_name:
        assert bus.cli("schedule", "pause", name).returncode == 0
    wait_until(lambda: all(jobs_done(bus, name) for name in by_name), 30, "every run to end")
    for i in range(20):
        succeeded = [j for j in runs(bus, f"s{i}") if j["state"] == "succeeded"]
        ran = (marks / str(i)).read_text().splitlines() if (marks / str(i)).exists() else []
        assert len(ran) == len(succeeded), f"s{i}: {len(ran)} runs on the node"


def jobs_done(bus: Bus, name: str) -> bool:
    return all(j["state"] in ("succeeded", "failed") for j in runs(bus, name))


def test_help_lists_the_schedule_commands() -> None:
    import subprocess
    import sys

    for args in (
        [],
        ["--help"],
        ["schedule"],
        ["schedule", "--help"],
        ["schedule", "add", "--help"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "opsbay_mqtt", *args], capture_output=True, text=True, timeout=30
        )
        assert out.returncode in (0, 2) and "Traceback" not in out.stderr, (args, out.stderr)
        assert "schedule" in out.stdout or "schedule" in out.stderr, args
    add = subprocess.run([sys.executable, "-m", "opsbay_mqtt", "schedule", "add", "--help"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    for option in ("--cron", "--tz", "--every", "--overlap", "--catch-up", "--jitter"):
        assert option in add.stdout
