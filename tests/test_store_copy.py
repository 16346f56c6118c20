"""Choosing the record (`opsbay coordinator --store`) and moving a SQLite record to PostgreSQL
(`opsbay store copy`), through the CLI as a user runs it; the PostgreSQL is the suite's own
(tests/pg.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest

from opsbay_mqtt.errors import ConfigError
from opsbay_mqtt.pgstore import PgStore
from opsbay_mqtt.protocol import Execution, Job, Schedule, ScheduleRun, ScheduleSpec, fields_of
from opsbay_mqtt.store import Store

if TYPE_CHECKING:
    from tests.helpers import Bus
    from tests.pg import PgServer

pytest_plugins = ("tests.pg",)  # PostgreSQL: pg_server, pg_url, own_pg

MS = 1_700_000_000_000


def opsbay(*args: str, code: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """`opsbay ARGS` in a process of its own, without the caller's OPSBAY_* settings; `code`
    runs first in that process."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OPSBAY_", "PG"))}
    main = "import sys; from opsbay_mqtt.cli.app import main; sys.argv[0] = 'opsbay'; main()"
    return subprocess.run(
        [sys.executable, "-c", f"{code}\n{main}", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def assert_no_password(out: subprocess.CompletedProcess[str], password: str) -> None:
    for form in (password, quote(password, safe="")):
        assert form not in out.stdout + out.stderr


def seed(data_dir: Path) -> Store:
    """A SQLite record as a coordinator leaves it: jobs on one node and on many, output with
    NUL, node facts, keys, a conflict, remembered nonces."""
    data_dir.mkdir()
    s = Store(data_dir / "opsbay.db")
    for n in range(1, 6):
        nodes = [f"web-{i:02d}" for i in range(1, n * 3)]
        s.insert_job(
            Job(
                job_id=f"00000000-0000-0000-0000-00000000000{n}",
                state="pending",
                target=",".join(nodes),
                command=f"echo {n}",
                timeout_s=60,
                start_by_ms=MS + 60_000,
                submitted_ms=MS + n,
                submitted_by="ci",
                submitted_kid="ci-1",
                where={"role": "web"} if n == 2 else {},
                batch="2" if n == 3 else None,
                executions=[],
            )
        )
        for node in nodes:
            s.write_execution(
                f"00000000-0000-0000-0000-00000000000{n}",
                Execution(
                    node=node,
                    state="succeeded" if n % 2 else "running",
                    exit_code=0 if n % 2 else None,
                    stdout=f"out {node}\x00\u00e9",
                    stderr="",
                    stdout_bytes=12,
                    truncated=n == 5,
                    dispatched_ms=MS + 10,
                    start_by_ms=MS + 60_000,
                    started_ms=MS + 11,
                    host={"hostname": node, "load_x100": [1, 2]},
                ),
                None,
            )
    s.node_seen("web-01", MS, state="online", session=7, seq=3, kid="web-01-k",
                info={"labels": {"role": "web"}, "agent_version": "0.1.0"})  # fmt: skip
    s.node_seen("web-02", MS + 5)
    s.node_conflict("web-01", MS + 6, "two agents named web-01", 7)
    s.remember_nonce("ci-1", "a" * 32, 1_700_000_000)
    s.remember_nonce("ci-1", "b" * 32, 1_700_000_001)
    spec = ScheduleSpec(cron="30 2 * * *", tz="Europe/Berlin", target="web-01",
                        command="echo nightly", timeout_s=60, start_within_s=600)  # fmt: skip
    nightly = Schedule(**fields_of(spec), name="nightly", owner="ci", owner_kid="ci-1",
                       created_ms=MS, updated_ms=MS, next_due_ms=MS + 3_600_000)  # fmt: skip
    s.schedules.add(nightly, MS + 3_600_000)
    s.schedules.add_run(ScheduleRun(name="nightly", due_ms=MS - 86_400_000, recorded_ms=MS,
                                    job_id="00000000-0000-0000-0000-000000000001",
                                    code="scheduled"))  # fmt: skip
    s.commit()
    return s


def picture(record: Any) -> dict[str, Any]:
    """What a coordinator reads from a record: its jobs with their executions, its nodes."""
    jobs = record.list_jobs(limit=1000)
    return {
        "jobs": [(j, j.executions) for j in jobs],
        "nodes": record.list_nodes(),
        "kids": {n["node"]: record.node_kid(n["node"]) for n in record.list_nodes()},
        "labels": record.node_labels_all(),
        "schedules": record.schedules.listing(),
        "runs": record.schedules.runs("nightly", 10),
        "next_fire": record.schedules.next_fire(),
    }


def test_store_copy_moves_a_sqlite_record_into_postgresql(tmp_path: Path, pg_url: str) -> None:
    source = seed(tmp_path / "data")
    expected = picture(source)
    source.close()
    out = opsbay("store", "copy", "--from", str(tmp_path / "data"), "--to", pg_url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "copied 5 jobs, 40 executions, 2 nodes, 2 nonces, 1 schedules and 1 schedule runs to "
    )
    copied = PgStore(pg_url)
    try:
        assert picture(copied) == expected
        assert copied.remember_nonce("ci-1", "a" * 32, 1_700_000_000) is False  # seen: copied
        assert copied.remember_nonce("ci-1", "c" * 32, 1_700_000_000) is True
        # The conflict's session came along: an agent started since clears it, an older doesn't.
        copied.node_seen("web-01", MS + 9, state="online", session=8, seq=0)
        assert "conflict" not in copied.list_nodes()[0]
        copied.rollback()
    finally:
        copied.close()
    # A second copy into the same (now not empty) record is refused, and changes nothing.
    again = opsbay("store", "copy", "--from", str(tmp_path / "data" / "opsbay.db"), "--to", pg_url)
    assert again.returncode == 78
    assert (
        "already holds a record (5 jobs, 40 executions, 2 nodes, 2 nonces, 1 schedules, "
        "1 schedule_runs)" in again.stderr
    )
    check = PgStore(pg_url)
    assert picture(check) == expected
    check.close()


def test_store_copy_says_what_is_wrong(tmp_path: Path, pg_url: str) -> None:
    missing = opsbay("store", "copy", "--from", str(tmp_path / "nothing"), "--to", pg_url)
    assert (missing.returncode, missing.stderr.strip()) == (
        78,
        f"opsbay: --from: no SQLite record at {tmp_path / 'nothing'}",
    )
    not_pg = opsbay("store", "copy", "--from", str(tmp_path), "--to", "sqlite:///x.db")
    assert not_pg.returncode == 2 and "--to: give a postgresql://... URL" in not_pg.stderr


def test_store_copy_to_an_unreachable_server_hides_the_password(
    tmp_path: Path, own_pg: PgServer
) -> None:
    seed(tmp_path / "data").close()
    url = own_pg.url("x", own_pg.password_user, own_pg.password).replace(f":{own_pg.port}/", ":1/")
    out = opsbay("store", "copy", "--from", str(tmp_path / "data"), "--to", url)
    assert out.returncode == 69
    assert f"cannot connect to postgresql://{own_pg.password_user}:***@127.0.0.1:1/x" in out.stderr
    assert_no_password(out, own_pg.password)


def test_a_coordinator_refuses_a_store_it_cannot_use(tmp_path: Path) -> None:
    args = ("coordinator", "--data-dir", str(tmp_path / "data"))
    env = {"OPSBAY_SECRET": "x" * 32}
    other = opsbay(*args, "--store", "mysql://u:hunter2@db/opsbay", **env)
    assert other.returncode == 78
    assert other.stderr.strip().endswith(
        "--store / OPSBAY_STORE: a mysql:// URL; give postgresql://[user@]host[:port]/dbname, "
        "or nothing for SQLite (opsbay.db under --data-dir)"
    )
    assert "hunter2" not in other.stderr
    # Without psycopg (the `postgresql` extra not installed): what to install.
    blocked = "import sys; sys.modules['psycopg'] = None"
    bare = opsbay(*args, code=blocked, OPSBAY_STORE="postgresql://db/opsbay", **env)
    assert bare.returncode == 78
    assert "pip install 'opsbay-mqtt[postgresql]'" in bare.stderr


def test_a_coordinator_that_cannot_reach_postgresql_exits_for_its_supervisor(
    tmp_path: Path, own_pg: PgServer
) -> None:
    url = own_pg.url("x", own_pg.password_user, own_pg.password).replace(f":{own_pg.port}/", ":1/")
    out = opsbay("coordinator", "--data-dir", str(tmp_path), "--store", url,
                 OPSBAY_SECRET="x" * 32)  # fmt: skip
    # Not 78 (a setting: systemd's RestartPreventExitStatus): a store that is down may be back.
    assert out.returncode not in (0, 78)
    assert f"cannot connect to postgresql://{own_pg.password_user}:***@127.0.0.1:1/x" in out.stderr
    assert_no_password(out, own_pg.password)


def test_a_coordinator_on_postgresql_runs_jobs_and_records_them_there(
    bus: Bus, pg_url: str
) -> None:
    bus.coordinator("--store", pg_url)
    assert "record: PostgreSQL postgresql://" in bus.log("coordinator")
    bus.worker("n1")
    out = bus.cli("submit", "--target", "n1", "--command", "printf 'a\\0b'", "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a\x00b"
    record = PgStore(pg_url)
    [job] = record.list_jobs()
    assert (job.state, job.executions[0].stdout) == ("succeeded", "a\x00b")
    record.close()
    assert not (bus.tmp / "data" / "opsbay.db").exists()  # the SQLite record is not used


def test_a_password_with_an_unencoded_at_sign_is_refused_before_libpq_can_quote_it() -> None:
    """libpq ends a password at its first '@', opsbay at the last: a piece of the password
    would be read as the host, and shown in libpq's error. Refused first, quoting nothing."""
    with pytest.raises(ConfigError, match="percent-encode") as e:
        PgStore("postgresql://opsbay:Tr0ub4dor@secrethost99/x@127.0.0.1:1/db")
    assert "Tr0ub4dor" not in str(e.value) and "secrethost99" not in str(e.value)


def test_a_source_that_is_not_a_sqlite_record_is_refused(tmp_path: Path, pg_url: str) -> None:
    junk = tmp_path / "notdb.txt"
    junk.write_text("hi\n" * 100)
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", "store", "copy", "--from", str(junk), "--to", pg_url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 78 and "not an opsbay SQLite record" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
