"""Fleet: 1,000 simulated workers connected at once to one Mosquitto (or 10,000 spread over a
3-server NATS cluster: `run_nats`); one job fanned out to all of them, then one job for each,
until every result is stored; the coordinator's memory meanwhile."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

from bench.common import (
    BenchError,
    Bus,
    Row,
    Suite,
    close_input,
    mb,
    nats_bus,
    peak_rss,
    private_bus,
    rss,
    sec,
)
from bench.driver import Driver
from bench.simworkers import node_name, start_fleet
from tests.harness import wait_until


def run(suite: Suite) -> list[Row]:
    total, timeout_s = suite.pick(1000, 40), suite.pick(120.0, 30.0)
    with private_bus(suite, "fleet") as bus:
        return measure(suite, bus, total, timeout_s, "Mosquitto", suite.pick(4, 2))


def run_nats(suite: Suite) -> list[Row]:
    # 3,000, not the 10,000 issue 14 asks for: each node's session is a replicated JetStream
    # consumer holding files open on every server, and at about 4,000 nodes a server here
    # passes this machine's limit of 20,000 open files per process, which cannot be raised
    # (docs/benchmarks.md). BENCH_NATS_NODES=10000 where the limit is higher.
    nodes = int(os.environ.get("BENCH_NATS_NODES", "3000"))
    total, timeout_s = suite.pick(nodes, 60), suite.pick(900.0, 120.0)
    with nats_bus(suite, "fleet-nats") as bus:
        rows = measure(suite, bus, total, timeout_s, "the NATS cluster", suite.pick(8, 2))
    return [dataclasses.replace(r, figure="fleet on NATS") for r in rows]


def measure(
    suite: Suite, bus: Bus, total: int, timeout_s: float, broker: str, processes: int
) -> list[Row]:
    from opsbay_mqtt.client import Client

    coord = bus.coordinator()
    t0 = time.perf_counter()
    sims = start_fleet(bus, total, processes, timeout_s)
    connected_s = time.perf_counter() - t0
    with Client(bus.client_config()) as client:

        def all_online() -> bool:
            nodes = client.nodes(timeout_s=30)
            return sum(1 for n in nodes if n.get("state") == "online") >= total

        wait_until(all_online, timeout_s, f"{total} nodes online", every=0.2)
    online_s = time.perf_counter() - t0
    idle_rss = rss(coord.pid)
    driver = Driver(bus)
    sampled, stop = [idle_rss], threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            sampled.append(rss(coord.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        started, done = driver.run([driver.sign("fleet-*")], timeout_s)
        fanned = max(done.values()) - started
        started, done = driver.run([driver.sign(node_name(i)) for i in range(total)], timeout_s)
        single = max(done.values()) - started
    finally:
        stop.set()
        sampler.join()
        driver.close()
    coord_peak, broker_rss = peak_rss(coord.pid), rss(bus.broker.pid)
    close_input(*sims)  # they print their counts as they stop
    handled = [s.expect("handled", 10).split() for s in sims]
    done_n, refused = sum(int(h[1]) for h in handled), sum(int(h[3]) for h in handled)
    if done_n != 2 * total or refused:
        raise BenchError(f"simulated workers handled {done_n} of {2 * total}, refused {refused}")
    return [
        Row(
            "fleet",
            f"one job fanned out to {total:,} simulated workers, all results stored",
            sec(fanned),
            f"connected + birth in {sec(connected_s)}; all online at the coordinator "
            f"after {sec(online_s)}",
            target="≤ 5 s",
            met=fanned <= 5,
        ),
        Row(
            "fleet", f"{total:,} single-target jobs, one per node, all results stored", sec(single)
        ),
        Row(
            "fleet",
            f"coordinator peak RSS with {total:,} nodes",
            mb(coord_peak),
            f"before the jobs {mb(idle_rss)}, sampled peak during them {mb(max(sampled))}; "
            f"{broker} RSS {mb(broker_rss)}" + (" (the first server)" if bus.v311 else ""),
            target="≤ 150 MB",
            met=coord_peak <= 150e6,
        ),
    ]
