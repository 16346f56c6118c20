"""Component costs behind the figures, in one process and without a broker:
`python -m bench.micro` (about 30 s; `--runner-only` for the runner's lines alone). Not part of
the table: it is what "What the profiles showed" in docs/benchmarks.md quotes, so that a fix can
be checked against it quickly.

- the coordinator's `handle()` per message kind (SQLite in a temporary directory, logging to
  /dev/null, commits every 20 messages as its loop does with Mosquitto's 20 in flight), and one
  deadline `tick()` with 10,000 open executions;
- a worker's dispatch-to-result path without MQTT (a fake connection), 8 jobs at a time, with
  its ledger as shipped (synchronous=FULL) and with synchronous=NORMAL;
- `runner.run("true")` against a bare `Popen` of `sh -c true`;
- the resident memory that each import adds.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import spawn_true
from opsbay_mqtt.inbound import Inbound
from opsbay_mqtt.protocol import Dispatch, Result, Submit, encode
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics, new_job_id
from tests.harness import stepped_coordinator, wait_until
from tests.memconn import MemoryConnection

KEYRING = Keyring.shared("s" * 32)
TOPICS = Topics("micro")


def _submit(node: str) -> tuple[str, bytes]:
    now = time.time()
    job_id = new_job_id()
    msg = Submit(
        job_id=job_id,
        target=node,
        command="true",
        timeout_s=60,
        start_by_ms=int(now * 1000) + 600_000,
    )
    return job_id, encode(msg, KEYRING, int(now))


def _result(job_id: str, node: str, state: str) -> bytes:
    now = time.time()
    ms = int(now * 1000)
    done = state != "running"
    msg = Result(
        job_id=job_id,
        node=node,
        state=state,  # type: ignore[arg-type]
        started_ms=ms,
        finished_ms=ms if done else None,
        exit_code=0 if done else None,
    )
    return encode(msg, KEYRING, int(now))


def coordinator(directory: Path, n: int = 3000) -> list[str]:
    coord = stepped_coordinator(directory / "opsbay.db", TOPICS, KEYRING)
    store = coord.store

    def feed(messages: list[Inbound]) -> float:
        t0 = time.perf_counter()
        for i, m in enumerate(messages, 1):
            coord.handle(m)
            if i % 20 == 0:
                store.commit()
                coord.outbox.clear()
        store.commit()
        coord.outbox.clear()
        return (time.perf_counter() - t0) / len(messages)

    subs = [_submit(f"n{i % 100}") for i in range(n)]
    per = feed([Inbound(TOPICS.submit, p) for _, p in subs])
    out = [f"coordinator handle(submit): {per * 1e6:.0f} µs"]
    for state in ("running", "succeeded"):
        msgs = [
            Inbound(TOPICS.result(f"n{i % 100}", j), _result(j, f"n{i % 100}", state))
            for i, (j, _) in enumerate(subs)
        ]
        out.append(f"coordinator handle(result {state}): {feed(msgs) * 1e6:.0f} µs")
    feed([Inbound(TOPICS.submit, _submit(f"m{i % 100}")[1]) for i in range(10_000)])
    t0 = time.perf_counter()
    with store.atomic():
        coord.tick()
    took = time.perf_counter() - t0
    out.append(f"coordinator tick() with 10,000 open executions: {took * 1000:.0f} ms")
    store.close()
    return out


def worker(directory: Path, synchronous: str, n: int = 600) -> str:
    from opsbay_mqtt.ledger import Ledger
    from opsbay_mqtt.worker import Worker, WorkerConfig

    ledger = Ledger(directory / f"ledger-{synchronous}.db", node="n1")
    ledger.db.execute(f"PRAGMA synchronous={synchronous}")
    w = Worker(WorkerConfig(node="n1", topics=TOPICS, keyring=KEYRING), ledger)
    conn = MemoryConnection()
    w.conn = conn  # type: ignore[assignment]
    now = time.time()
    msgs = [
        Inbound(
            TOPICS.node_jobs("n1"),
            encode(
                Dispatch(
                    job_id=new_job_id(),
                    node="n1",
                    command="true",
                    timeout_s=60,
                    start_by_ms=int(now * 1000) + 600_000,
                ),
                KEYRING,
                int(now),
            ),
            qos=1,
            mid=i + 1,
        )
        for i in range(n)
    ]
    cpu0, kids0, t0 = time.process_time(), os.times(), time.perf_counter()
    for m in msgs:
        w.handle(m)
    ended = b'"state":"succeeded"'
    wait_until(lambda: sum(ended in p.payload for p in conn.published) >= n, 60, "the jobs")
    elapsed = time.perf_counter() - t0
    cpu, kids = time.process_time() - cpu0, os.times()
    sh = (kids.children_user - kids0.children_user) + (kids.children_system - kids0.children_system)
    w.shutdown()
    ledger.close()
    return (
        f"worker without MQTT, ledger synchronous={synchronous}: {n / elapsed:.0f} jobs/s, "
        f"{cpu / n * 1000:.2f} ms CPU per job in the worker + {sh / n * 1000:.2f} ms in `sh`"
    )


def _median_ms(fn: Callable[[], object], n: int = 200) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1000


def runner_interleaved(n: int = 300) -> list[str]:
    """`runner.run("true")` and a bare Popen of the same, alternating in one loop so that both
    see the same machine: medians and quartiles of `n` calls each."""
    from opsbay_mqtt import runner as r

    fns: dict[str, Callable[[], object]] = {
        "runner.run('true')": lambda: r.run("true", timeout_s=60),
        "bare Popen().communicate()": spawn_true,
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    out = []
    for name, xs in times.items():
        q1, q2, q3 = (q * 1000 for q in statistics.quantiles(xs, n=4))
        out.append(f"{name}, interleaved, n={n}: median {q2:.2f} ms (quartiles {q1:.2f}-{q3:.2f})")
    return out


def imports() -> list[str]:
    steps = [
        "",
        "typer",
        "pydantic",
        "paho.mqtt.client",
        "typer,pydantic,paho.mqtt.client,psutil,sqlite3,ssl",
        "pydantic,opsbay_mqtt.protocol",
        "opsbay_mqtt.worker,opsbay_mqtt.daemons",
        "opsbay_mqtt.cli.app,opsbay_mqtt.cli.admin,opsbay_mqtt.cli.jobs,opsbay_mqtt.daemons",
    ]
    code = (
        "import importlib, sys, psutil\n"
        "for m in sys.argv[1].split(','):\n"
        "    m and importlib.import_module(m)\n"
        "i = psutil.Process().memory_full_info()\n"
        "print(f'{i.rss / 1e6:.1f} MB RSS, {i.uss / 1e6:.1f} MB USS')\n"
    )
    out = []
    for mods in steps:
        got = subprocess.run(
            [sys.executable, "-c", code, mods], capture_output=True, text=True, timeout=60
        )
        out.append(f"python + psutil + {mods or 'nothing'}: {got.stdout.strip() or got.stderr}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.micro", description="Component costs.")
    ap.add_argument("--runner-only", action="store_true", help="only runner.run against Popen")
    ap.add_argument("-n", type=int, default=300, help="calls of each in the interleaved loop")
    args = ap.parse_args(argv)
    if args.runner_only:
        for line in runner_interleaved(args.n):
            print(line)
        return 0
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
    with tempfile.TemporaryDirectory(prefix="opsbay-micro-") as tmp:
        d = Path(tmp)
        lines = coordinator(d)
        lines += [worker(d, "FULL"), worker(d, "NORMAL")]
    lines += runner_interleaved()
    lines += imports()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
