"""Store: a coordinator holding 1,000,000 finished jobs; how fast `opsbay results --limit 50` and
`opsbay result ID` answer, beyond the CLI's own start-up."""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    OPSBAY,
    BenchError,
    Row,
    Suite,
    interleaved,
    mb,
    ms,
    private_bus,
    sec,
    summarize,
    wait_until,
)
from opsbay_mqtt.protocol import Execution, Job
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import new_job_id

CHUNK = 100_000


def fill(path: Path, n: int) -> str:
    """Fill the record to `n` finished jobs; return the id of one in the middle."""
    store = Store(path)
    now_ms = int(time.time() * 1000)
    facts = {"hostname": "store-00", "uptime_s": 86400, "load_x100": [12, 9, 7]}
    template = Job(
        job_id=new_job_id(),
        state="succeeded",
        target="store-00",
        command="systemctl restart nginx && echo restarted",
        timeout_s=600,
        start_by_ms=now_ms + 600_000,
        submitted_ms=now_ms,
        submitted_by="shared",
        submitted_kid="default",
        executions=[
            Execution(
                node="store-00",
                state="succeeded",
                exit_code=0,
                stdout="restarted\n",
                stdout_bytes=10,
                dispatched_ms=now_ms,
                started_ms=now_ms + 2,
                finished_ms=now_ms + 180,
                duration_ms=178,
                host={**facts, "memory_available": 2_000_000_000, "disk_free": 9_000_000_000},
            )
        ],
    )
    store.insert_job(template)
    store.commit()
    db = store.db
    # Only for the fill: no journal, no fsync, a large cache (the random primary keys).
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-500000")
    db.execute("BEGIN")
    job_cols = [r[1] for r in db.execute("PRAGMA table_info(jobs)")]
    ex_cols = [r[1] for r in db.execute("PRAGMA table_info(executions)")]
    uuid = (
        "lower(hex(randomblob(4))) || '-' || lower(hex(randomblob(2))) || '-4' || "
        "substr(lower(hex(randomblob(2))), 2) || '-a' || substr(lower(hex(randomblob(2))), 2) "
        "|| '-' || lower(hex(randomblob(6)))"
    )
    job_expr = {
        "job_id": uuid,
        "target": "printf('store-%02d', s.i % 100)",
        "submitted_ms": "t.submitted_ms - s.i * 50",
        "start_by_ms": "t.start_by_ms - s.i * 50",
    }
    jobs_sql = (
        "WITH RECURSIVE s(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM s WHERE i < ?) "
        f"INSERT INTO jobs ({', '.join(job_cols)}) "
        f"SELECT {', '.join(job_expr.get(c, 't.' + c) for c in job_cols)} "
        "FROM s, jobs AS t WHERE t.job_id = ?"
    )
    shift = "(j.submitted_ms - t.submitted_ms)"
    ex_expr = {
        "job_id": "j.job_id",
        "node": "j.target",
        "dispatched_ms": f"e.dispatched_ms + {shift}",
        "started_ms": f"e.started_ms + {shift}",
        "finished_ms": f"e.finished_ms + {shift}",
    }
    ex_sql = (
        f"INSERT INTO executions ({', '.join(ex_cols)}) "
        f"SELECT {', '.join(ex_expr.get(c, 'e.' + c) for c in ex_cols)} "
        "FROM jobs AS j, jobs AS t, executions AS e "
        "WHERE t.job_id = ? AND e.job_id = t.job_id AND j.rowid BETWEEN ? AND ?"
    )
    first = 1
    while first < n:
        last = min(n - 1, first + CHUNK - 1)
        (lo,) = db.execute("SELECT max(rowid) + 1 FROM jobs").fetchone()
        db.execute(jobs_sql, (first, last, template.job_id))
        db.execute(ex_sql, (template.job_id, lo, lo + (last - first)))
        store.commit()
        first = last + 1
    (middle,) = db.execute(
        "SELECT job_id FROM jobs ORDER BY submitted_ms DESC LIMIT 1 OFFSET ?", (n // 2,)
    ).fetchone()
    (count,) = db.execute("SELECT count(*) FROM executions").fetchone()
    if count != n:
        raise BenchError(f"filled {count} executions, expected {n}")
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")  # as the coordinator keeps it
    db.execute("BEGIN")
    store.close()
    return str(middle)


def prune_time(path: Path, n: int) -> float:
    """One retention pass over the record (it deletes nothing: the limit is above the count)."""
    store = Store(path)
    try:
        t0 = time.perf_counter()
        deleted = store.prune(before_ms=int(time.time() * 1000) - 30 * 86_400_000, keep=n * 10)
        elapsed = time.perf_counter() - t0
        store.commit()
    finally:
        store.close()
    if deleted:
        raise BenchError(f"the retention pass deleted {deleted} jobs")
    return elapsed


def run(suite: Suite) -> list[Row]:
    from opsbay_mqtt.client import Client

    n, rounds, warm = suite.pick(1_000_000, 5_000), suite.pick(15, 3), suite.pick(2, 1)
    with private_bus(suite, "store") as bus:
        data = bus.directory / "coordinator"
        data.mkdir(parents=True, exist_ok=True)
        db = data / "opsbay.db"
        t0 = time.perf_counter()
        job_id = fill(db, n)
        fill_s = time.perf_counter() - t0
        prune_s = prune_time(db, n)
        size = sum(p.stat().st_size for p in data.glob("opsbay.db*"))
        bus.coordinator("--keep-jobs", str(n * 10))
        t0 = time.perf_counter()
        with Client(bus.client_config()) as client:
            wait_until(lambda: client.result(job_id, timeout_s=30), 60, "the first answer")
            first_answer_s = time.perf_counter() - t0
            in_results, in_result = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                if len(client.results(limit=50)) != 50:
                    raise BenchError("`results` did not list 50 jobs")
                in_results.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.result(job_id)
                in_result.append(time.perf_counter() - t)
        cmds = {
            "results": [str(OPSBAY), "results", "--limit", "50"],
            "result": [str(OPSBAY), "result", job_id],
            "help": [str(OPSBAY), "--help"],
        }
        s = interleaved(cmds, rounds, warm, bus.env())
    base = summarize(s["help"])
    rows = []
    for key, label, inproc in (
        ("results", "`opsbay results --limit 50`", in_results),
        ("result", "`opsbay result ID`", in_result),
    ):
        x, q = summarize(s[key]), summarize(inproc)
        beyond = x.p50 - base.p50
        rows.append(
            Row(
                "store",
                f"{label}, {n:,} jobs stored: median beyond start-up",
                ms(beyond),
                f"whole command {sec(x.p50)} (IQR {sec(x.q1)}-{sec(x.q3)}); "
                f"in-process query p50 {ms(q.p50)}",
                f"`opsbay --help` {sec(base.p50)}",
                f"{x.p50 / base.p50:.2f}x",
                "≤ 50 ms beyond start-up",
                beyond <= 0.050,
            )
        )
    rows.append(
        Row(
            "store",
            f"database with {n:,} jobs",
            mb(size),
            f"filled in {sec(fill_s)}; one retention pass {sec(prune_s)}; "
            f"coordinator's first answer {sec(first_answer_s)} after start",
        )
    )
    return rows
