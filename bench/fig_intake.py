"""Coordinator intake: submissions verified, stored and dispatched per second, with workers that
only acknowledge; against raw paho QoS 1 messages through the same broker, paho relays doing no
work (the ceiling), and the whole job cycle with simulated workers."""

from __future__ import annotations

import json
import secrets
import time

from bench.common import (
    BenchError,
    Bus,
    Lines,
    Row,
    Suite,
    baseline,
    chunk_rates,
    close_input,
    close_paho,
    paho_thread,
    per_s,
    private_bus,
    tenths,
)
from bench.driver import Driver
from bench.simworkers import node_name, start_fleet


def received(sink: Lines, count: int, started: float, timeout_s: float) -> tuple[float, str]:
    """(rate, per-tenth rates) of what the sink received from `started` on."""
    got = json.loads(sink.expect("{", timeout_s + 10))
    times: list[float] = got["times"]
    if got["count"] < count:
        raise BenchError(f"only {got['count']} of {count} messages arrived within {timeout_s:g} s")
    return count / (times[-1] - started), tenths(chunk_rates(times, started))


def burst(
    bus: Bus, topic: str, payloads: list[bytes], sink: Lines, timeout_s: float
) -> tuple[float, str]:
    """Publish every payload at once (QoS 1, one paho connection); what the sink got."""
    pub = paho_thread("burst", bus.port, [])
    try:
        started = time.monotonic()
        for p in payloads:
            pub.publish(topic, p, qos=1)
        return received(sink, len(payloads), started, timeout_s)
    finally:
        close_paho(pub)


def through(bus: Bus, payloads: list[bytes], timeout_s: float, relays: int) -> tuple[float, str]:
    """The burst straight to a receiver (`relays=0`), or through relays that publish two QoS 1
    messages per message in and nothing else (several share one MQTT 5 subscription)."""
    base = f"bench/relay/{secrets.token_hex(4)}"
    into = f"{base}/in" if relays else f"{base}/out"
    sink = baseline(bus, "sink", f"{base}/out", str(len(payloads)), str(timeout_s))
    shared = ["shared"] if relays > 1 else []
    started = [baseline(bus, "intake", base, *shared) for _ in range(relays)]
    try:
        return burst(bus, into, payloads, sink, timeout_s)
    finally:
        close_input(*started)


def job_cycle(suite: Suite, n: int, nodes: int, timeout_s: float) -> tuple[float, str]:
    """Jobs/s through a coordinator whose workers answer at once (simulated, nothing run)."""
    with private_bus(suite, "cycle") as bus:
        bus.coordinator()
        start_fleet(bus, nodes, 1, timeout_s)
        driver = Driver(bus)
        try:
            started, done = driver.run(
                [driver.sign(node_name(i % nodes)) for i in range(n)], timeout_s
            )
        finally:
            driver.close()
    return n / (max(done.values()) - started), tenths(chunk_rates(list(done.values()), started))


def run(suite: Suite) -> list[Row]:
    n, nodes, timeout_s = suite.pick(20_000, 500), suite.pick(100, 10), suite.pick(120.0, 30.0)
    with private_bus(suite, "intake") as bus:
        driver = Driver(bus, follow=False)
        try:
            signed = [driver.sign(f"ack-{i % nodes:03d}")[1] for i in range(n)]
            raw = through(bus, signed, timeout_s, 0)
            ceiling, ceiling2 = (through(bus, signed, timeout_s, k) for k in (1, 2))
            bus.coordinator("--max-open-per-node", str(n + 1))
            sink = baseline(bus, "sink", f"{bus.prefix}/nodes/+/jobs", str(n), str(timeout_s))
            started = time.monotonic()
            for payload in signed:
                driver.publish(payload)
            rate, spread = received(sink, n, started, timeout_s)
        finally:
            driver.close()
    n_cycle = suite.pick(5000, 200)
    cycle, cycle_spread = job_cycle(suite, n_cycle, nodes, timeout_s)
    fig, vs_raw = "coordinator intake", f"raw paho QoS 1 {per_s(raw[0])}"
    return [
        Row(
            fig,
            f"submissions verified + stored + dispatched/s, burst of {n:,}",
            per_s(rate),
            spread,
            vs_raw,
            f"{rate / raw[0]:.0%}",
            "≥ 5,000/s",
            rate >= 5000,
        ),
        Row(
            fig,
            f"baseline: raw paho QoS 1 messages/s, {n:,} to one receiver process",
            per_s(raw[0]),
            raw[1],
        ),
        Row(
            fig,
            f"ceiling: a paho relay, 2 QoS 1 messages out per message in, no work, {n:,}",
            per_s(ceiling[0]),
            ceiling[1],
            vs_raw,
            f"{ceiling[0] / raw[0]:.0%}",
        ),
        Row(
            fig,
            f"ceiling: two such relays on one shared subscription, {n:,}",
            per_s(ceiling2[0]),
            ceiling2[1],
            vs_raw,
            f"{ceiling2[0] / raw[0]:.0%}",
        ),
        Row(
            fig,
            f"job cycle/s with simulated workers (nothing run), {n_cycle:,} jobs",
            per_s(cycle),
            cycle_spread,
            vs_raw,
            f"{cycle / raw[0]:.0%}",
        ),
    ]
