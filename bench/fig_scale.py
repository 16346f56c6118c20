"""Scaling the coordinator: the job cycle (submission → dispatch → result stored → event) per
second, and the coordinators' CPU per job, with one coordinator on SQLite (the baseline), one on
PostgreSQL, and two on one PostgreSQL record: each handling every message (any broker), and
splitting them through an MQTT 5 shared subscription (`--share`). Simulated workers answer at
once (nothing run), as in the intake figure's job cycle; PostgreSQL is a server the suite starts
(tests/pg.py), on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from bench.common import OPSBAY, Bus, Row, Suite, chunk_rates, per_s, private_bus, tenths
from bench.driver import Driver
from bench.simworkers import node_name, start_fleet


@contextmanager
def postgresql() -> Iterator[Any]:
    from tests.pg import find_bin_dir, start_pg

    server = start_pg(find_bin_dir())
    try:
        yield server
    finally:
        server.stop()


def coordinators(bus: Bus, count: int, store: str, share: bool) -> list[Any]:
    """Start `count` coordinators on `store` ("" for SQLite), named c1, c2, ..."""
    procs = []
    for k in range(1, count + 1):
        argv = [str(OPSBAY), "coordinator", "--data-dir", str(bus.directory / f"c{k}")]
        if store:
            argv += ["--store", store, "--name", f"c{k}"]
        if share:
            argv += ["--share", "bench"]
        procs.append(bus.daemon(f"coordinator-c{k}", argv, "coordinator: ready"))
    return procs


def cycle(
    suite: Suite, label: str, n: int, nodes: int, timeout_s: float, count: int, store: str,
    share: bool = False,
) -> tuple[float, str, float]:  # fmt: skip
    """(jobs/s, per-tenth rates, the coordinators' CPU ms per job) for `n` jobs."""
    with private_bus(suite, f"scale-{label}") as bus:
        procs = [psutil.Process(p.pid) for p in coordinators(bus, count, store, share)]
        start_fleet(bus, nodes, 1, timeout_s)
        driver = Driver(bus)
        try:
            cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            started, done = driver.run(
                [driver.sign(node_name(i % nodes)) for i in range(n)], timeout_s
            )
            cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
        finally:
            driver.close()
    ends = list(done.values())
    return n / (max(ends) - started), tenths(chunk_rates(ends, started)), 1000 * cpu / n


def run(suite: Suite) -> list[Row]:
    n, nodes, timeout_s = suite.pick(3000, 200), suite.pick(100, 10), suite.pick(180.0, 60.0)
    sqlite = cycle(suite, "sqlite", n, nodes, timeout_s, 1, "")
    with postgresql() as server:
        urls = [server.url(server.create_database()) for _ in range(3)]
        one = cycle(suite, "pg1", n, nodes, timeout_s, 1, urls[0])
        two = cycle(suite, "pg2", n, nodes, timeout_s, 2, urls[1])
        shared = cycle(suite, "pg2-share", n, nodes, timeout_s, 2, urls[2], share=True)
    fig = "coordinators"
    base = f"1 on SQLite {per_s(sqlite[0])}"

    def row(
        what: str, got: tuple[float, str, float], target: str = "—", met: bool | None = None
    ) -> Row:
        return Row(
            fig, f"{what}: job cycle/s, {n:,} jobs, {nodes} simulated nodes", per_s(got[0]),
            f"{got[1]}; coordinators' CPU {got[2]:.2f} ms/job", base,
            f"{got[0] / sqlite[0]:.2f}x", target, met,
        )  # fmt: skip

    return [
        row("1 coordinator on SQLite (baseline)", sqlite),
        row(
            "1 coordinator on PostgreSQL",
            one,
            "CPU per job ≤ 2x SQLite's",
            one[2] <= 2 * sqlite[2],
        ),
        row("2 coordinators on one PostgreSQL record, each handling every message", two),
        row("2 coordinators on one PostgreSQL record, one shared subscription", shared),
    ]
