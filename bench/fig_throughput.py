"""Throughput: `true` jobs completed per second by four workers, against the machine's own
limit on spawning `sh -c true`."""

from __future__ import annotations

import os
import threading
import time

from bench.common import CpuMeter, Row, Suite, chunk_rates, per_s, private_bus, spawn_true, tenths
from bench.driver import Driver


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
        pids = {"coordinator": bus.coordinator().pid, "Mosquitto": bus.broker.pid}
        nodes = [f"tp-{i}" for i in range(4)]
        pids.update((node, bus.worker(node).pid) for node in nodes)
        driver = Driver(bus)
        cpu = CpuMeter(pids)
        try:
            driver.run([driver.sign(nodes[i % 4]) for i in range(40)], 60, window)  # warm-up
            cpu.start()  # signing included, as a submitter must sign
            signed = [driver.sign(nodes[i % 4]) for i in range(n)]
            started, done = driver.run(signed, suite.pick(120, 60), window)
            cpu.stop()
        finally:
            driver.close()
    after = spawn_rate(4, spawn_s)
    elapsed = max(done.values()) - started
    rate, spawn = n / elapsed, (before + after) / 2
    u = cpu.used

    def per(seconds: float) -> str:
        return f"{1000 * seconds / n:.2f} ms"

    per_job = (
        f"coordinator {per(u['coordinator'][0])}, 4 workers "
        f"{per(sum(u[x][0] for x in nodes))} + their `sh` {per(sum(u[x][1] for x in nodes))}, "
        f"Mosquitto {per(u['Mosquitto'][0])}, the suite's driver {per(u['bench'][0])}"
    )
    cores = os.cpu_count() or 1
    busy = sum(a + b for a, b in u.values()) / (elapsed * cores)
    return [
        Row(
            "throughput",
            f"`true` jobs/s, 4 workers, {n:,} jobs, window {window}",
            per_s(rate),
            tenths(chunk_rates(list(done.values()), started)),
            f"spawn limit {per_s(spawn)}",
            f"{rate / spawn:.0%}",
            "≥ 500/s and ≥ 20% of the spawn limit",
            rate >= 500 and rate >= 0.2 * spawn,
        ),
        Row("throughput", "CPU per job", per_job, f"{busy:.0%} of {cores} cores busy"),
        Row(
            "throughput",
            "baseline: `sh -c true` spawned/s from 4 threads",
            per_s(spawn),
            f"before the bus {per_s(before)}, after {per_s(after)}",
        ),
    ]
