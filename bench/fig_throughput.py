"""Throughput: `true` jobs completed per second by four workers, against the machine's own
limit on spawning `sh -c true`."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from bench.common import (
    BenchError,
    CpuMeter,
    Row,
    Suite,
    chunk_rates,
    per_s,
    private_bus,
    spawn_true,
    summarize,
)
from bench.driver import Driver
from opsbay_mqtt.states import TERMINAL

THROUGHPUT = """\
**Throughput**: four `opsbay worker` processes (nodes `tp-0`..`tp-3`, default settings: 8 jobs
at a time each), one coordinator, a private Mosquitto. The suite's driver (`bench/driver.py`:
signed submissions published without waiting, one subscription to every job's events) keeps a
sliding window of 256 jobs in flight, spread round-robin over the four nodes, until 5,000
`true` jobs have ended; the figure is jobs ended ÷ time from the first submission to the last
terminal event, the spread the rate over each tenth of the jobs. Baseline, on the same
machine in the same run: `sh -c true` spawned (as the worker's runner does: pipes, a new
session) and reaped from 4 threads for 1.5 s before the bus starts and 1.5 s after it stops."""


@dataclass(frozen=True)
class Window:
    started: float
    done: dict[str, float]
    states: dict[str, str]


def drive(driver: Driver, targets: list[str], n: int, window: int, timeout_s: float) -> Window:
    """Submit `n` jobs keeping at most `window` in flight; return when all have ended."""
    signed = [driver.sign(targets[i % len(targets)]) for i in range(n)]
    in_flight: set[str] = set()
    done: dict[str, float] = {}
    states: dict[str, str] = {}
    nxt = 0
    started = time.perf_counter()
    deadline = started + timeout_s
    while len(done) < n:
        while nxt < n and len(in_flight) < window:
            job_id, payload = signed[nxt]
            in_flight.add(job_id)
            driver.publish(payload)
            nxt += 1
        if time.perf_counter() > deadline:
            raise BenchError(f"{len(done)} of {n} jobs ended within {timeout_s:g} s")
        for t, job_id, state in driver.poll(0.5):
            if job_id in in_flight and state in TERMINAL:
                in_flight.discard(job_id)
                done[job_id] = t
                states[job_id] = state
    return Window(started, done, states)


def spawn_rate(threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = time.perf_counter() + seconds

    def spawn(i: int) -> None:
        while time.perf_counter() < stop:
            spawn_true()
            counts[i] += 1

    t0 = time.perf_counter()
    pool = [threading.Thread(target=spawn, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def run(suite: Suite) -> list[Row]:
    n, window, spawn_s = suite.pick(5000, 100), suite.pick(256, 32), suite.pick(1.5, 0.3)
    before = spawn_rate(4, spawn_s)
    with private_bus(suite, "throughput") as bus:
        coord = bus.coordinator()
        nodes = [f"tp-{i}" for i in range(4)]
        pids = {"coordinator": coord.pid, "Mosquitto": bus.broker.pid}
        for node in nodes:
            pids[node] = bus.worker(node).pid
        driver = Driver(bus)
        cpu = CpuMeter(pids)
        try:
            drive(driver, nodes, 40, window, 60)  # warm-up
            cpu.start()
            w = drive(driver, nodes, n, window, suite.pick(120, 60))
            cpu.stop()
        finally:
            driver.close()
    after = spawn_rate(4, spawn_s)
    bad = {s for s in w.states.values() if s != "succeeded"}
    if bad or driver.rejected:
        raise BenchError(f"jobs ended {sorted(bad)}; refusals: {driver.rejected[:3]}")
    elapsed = max(w.done.values()) - w.started
    rate = n / elapsed
    spawn = (before + after) / 2
    chunks = summarize(chunk_rates(list(w.done.values()), w.started))
    u = cpu.used
    workers = sum(u[node][0] for node in nodes)
    spawned = sum(u[node][1] for node in nodes)
    total = sum(a + b for a, b in u.values())

    def per(seconds: float) -> str:
        return f"{1000 * seconds / n:.2f} ms"

    per_job = (
        f"coordinator {per(u['coordinator'][0])}, 4 workers {per(workers)} + their `sh` "
        f"{per(spawned)}, Mosquitto {per(u['Mosquitto'][0])}, the suite's driver "
        f"{per(u['bench'][0])}"
    )
    busy = f"{total / (elapsed * (os.cpu_count() or 1)):.0%} of {os.cpu_count()} cores busy"
    return [
        Row(
            "throughput",
            f"`true` jobs/s, 4 workers, {n:,} jobs, window {window}",
            per_s(rate),
            f"per tenth: min {per_s(chunks.lo)}, median {per_s(chunks.p50)}, "
            f"max {per_s(chunks.hi)}",
            f"spawn limit {per_s(spawn)}",
            f"{rate / spawn:.0%}",
            "≥ 500/s and ≥ 20% of the spawn limit",
            rate >= 500 and rate >= 0.2 * spawn,
        ),
        Row("throughput", "CPU per job", per_job, busy),
        Row(
            "throughput",
            "baseline: `sh -c true` spawned/s from 4 threads",
            per_s(spawn),
            f"before the bus {per_s(before)}, after {per_s(after)}",
        ),
    ]
