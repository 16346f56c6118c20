"""Coordinator intake: submissions verified, stored and dispatched per second, with workers that
only acknowledge; against raw paho QoS 1 messages per second through the same broker."""

from __future__ import annotations

import json
import secrets
import sys
import time
from typing import Any

from bench.common import (
    HOST,
    REPO,
    BenchError,
    Bus,
    Lines,
    Row,
    Suite,
    chunk_rates,
    new_paho,
    per_s,
    private_bus,
    summarize,
)
from bench.driver import Driver
from bench.simworkers import node_name
from opsbay_mqtt.states import TERMINAL

INTAKE = """\
**Coordinator intake**: one coordinator (default settings but `--max-open-per-node` raised
above the burst, since nothing finishes) on a private Mosquitto. The suite signs 20,000
submissions for 100 node names beforehand, then publishes them all at once (QoS 1, one paho
connection). "Workers that only acknowledge" are one separate process (`bench/rawsink.py`)
subscribed at QoS 1 to `<prefix>/nodes/+/jobs`: paho acknowledges each dispatch (PUBACK) and
nothing else happens, no result is published. The figure is dispatches received ÷ time from
the first publish to the last dispatch, so each submission was verified, checked for replay
and queue limit, stored (committed), answered with an event and dispatched. The spread is the
rate over each tenth. Baseline, just before on the same broker: the same publisher and the
same receiver process, 20,000 raw QoS 1 messages of the same size on one topic. Ceiling, in
the same way: the same messages through `bench/relay.py intake`, a paho process that does
nothing but what the coordinator's messaging does for a submission (receive it at QoS 1 with
manual acknowledgement and a Receive Maximum of 1,000, publish two QoS 1 messages,
acknowledge), driving paho from one thread: what any coordinator built on paho could reach
here. And again with two such relays sharing one MQTT 5 subscription (`$share/...`), as
several coordinators could: the burst is then dealt out between two processes on two cores.

**Coordinator job cycle** (no target; it bounds the throughput figure from above): a fresh
coordinator and one process of 100 simulated workers (`bench/simworkers.py`, as in the fleet
figure: each dispatch verified, then a signed `running` and `succeeded` result, nothing run).
The suite publishes 5,000 submissions at once, round-robin over the nodes, and times the first
publish to the last `succeeded` event: every job costs the coordinator a submission, two
results, three events and a dispatch."""


def sink(bus: Bus, topic: str, count: int, timeout_s: float) -> tuple[Lines, Any]:
    argv = [sys.executable, str(REPO / "bench" / "rawsink.py"), str(bus.port), topic]
    p = bus.start(f"sink-{secrets.token_hex(2)}", [*argv, str(count), str(timeout_s)], piped=True)
    lines = Lines(p)
    lines.expect("ready", 15)
    return lines, p


def collect(
    lines: Lines, count: int, started: float, timeout_s: float
) -> tuple[float, list[float]]:
    """(rate, per-tenth rates) of what the sink received."""
    got = json.loads(lines.expect("{", timeout_s + 10))
    times: list[float] = got["times"]
    if got["count"] < count:
        raise BenchError(f"only {got['count']} of {count} messages arrived within {timeout_s:g} s")
    return count / (times[-1] - started), chunk_rates(times, started)


def burst(
    bus: Bus, topic: str, payloads: list[bytes], lines: Lines, timeout_s: float
) -> tuple[float, list[float]]:
    """Publish every payload at once (QoS 1, one paho connection); what `lines`' sink got."""
    pub = new_paho(f"bench-burst-{secrets.token_hex(4)}")
    pub.connect(HOST, bus.port)
    pub.loop_start()
    try:
        started = time.monotonic()
        for p in payloads:
            pub.publish(topic, p, qos=1)
        return collect(lines, len(payloads), started, timeout_s)
    finally:
        pub.disconnect()
        pub.loop_stop()


def raw_qos1(bus: Bus, payloads: list[bytes], timeout_s: float) -> tuple[float, list[float]]:
    topic = f"bench/raw/{secrets.token_hex(4)}"
    lines, _ = sink(bus, topic, len(payloads), timeout_s)
    return burst(bus, topic, payloads, lines, timeout_s)


def relay(
    bus: Bus, payloads: list[bytes], timeout_s: float, processes: int = 1
) -> tuple[float, list[float]]:
    """The same burst through `bench/relay.py` (two QoS 1 messages out per message in, nothing
    else) to the same kind of receiver: the most paho processes can do as a coordinator. With
    several, they share one MQTT 5 subscription (the broker deals the messages out)."""
    base = f"bench/relay/{secrets.token_hex(4)}"
    lines, _ = sink(bus, f"{base}/out", len(payloads), timeout_s)
    argv = [sys.executable, str(REPO / "bench" / "relay.py"), str(bus.port), "intake", base]
    argv += ["shared"] if processes > 1 else []
    for i in range(processes):
        Lines(bus.start(f"relay-{i}", argv, piped=True)).expect("ready", 15)
    return burst(bus, f"{base}/in", payloads, lines, timeout_s)


def job_cycle(suite: Suite, n: int, nodes: int, timeout_s: float) -> tuple[float, list[float]]:
    """Jobs/s through a coordinator whose workers answer at once (simulated, nothing run)."""
    with private_bus(suite, "cycle") as bus:
        bus.coordinator()
        argv = [sys.executable, "-m", "bench.simworkers", "--port", str(bus.port)]
        argv += ["--prefix", bus.prefix, "--first", "0", "--count", str(nodes)]
        sims = Lines(bus.start("sim", argv, piped=True, BENCH_SECRET=bus.secret))
        sims.expect("ready", 30)
        driver = Driver(bus)
        try:
            signed = [driver.sign(node_name(i % nodes)) for i in range(n)]
            pending = {job_id for job_id, _ in signed}
            done: list[float] = []
            started = time.perf_counter()
            for _, payload in signed:
                driver.publish(payload)
            deadline = started + timeout_s
            while pending:
                if time.perf_counter() > deadline:
                    raise BenchError(f"{len(pending)} of {n} jobs not done in {timeout_s:g} s")
                for t, job_id, state in driver.poll(0.5):
                    if job_id in pending and state in TERMINAL:
                        if state != "succeeded":
                            raise BenchError(f"job {job_id} {state}: {driver.rejected[:1]}")
                        pending.discard(job_id)
                        done.append(t)
        finally:
            driver.close()
    return n / (max(done) - started), chunk_rates(done, started)


def run(suite: Suite) -> list[Row]:
    n, nodes = suite.pick(20_000, 500), suite.pick(100, 10)
    timeout_s = suite.pick(120.0, 30.0)
    with private_bus(suite, "intake") as bus:
        driver = Driver(bus, follow=False)
        try:
            signed = [driver.sign(f"ack-{i % nodes:03d}")[1] for i in range(n)]
            raw, raw_chunks = raw_qos1(bus, signed, timeout_s)
            ceiling, ceiling_chunks = relay(bus, signed, timeout_s)
            ceiling2, ceiling2_chunks = relay(bus, signed, timeout_s, processes=2)
            bus.coordinator("--max-open-per-node", str(n + 1))
            lines, _ = sink(bus, f"{bus.prefix}/nodes/+/jobs", n, timeout_s)
            started = time.monotonic()
            for payload in signed:
                driver.publish(payload)
            rate, chunks = collect(lines, n, started, timeout_s)
        finally:
            driver.close()
    n_cycle = suite.pick(5000, 200)
    cycle, cycle_chunks = job_cycle(suite, n_cycle, nodes, timeout_s)
    c, r, y = summarize(chunks), summarize(raw_chunks), summarize(cycle_chunks)
    e, e2 = summarize(ceiling_chunks), summarize(ceiling2_chunks)
    return [
        Row(
            "coordinator intake",
            f"submissions verified + stored + dispatched/s, burst of {n:,}",
            per_s(rate),
            f"per tenth: min {per_s(c.lo)}, median {per_s(c.p50)}, max {per_s(c.hi)}",
            f"raw paho QoS 1 {per_s(raw)}",
            f"{rate / raw:.0%}",
            "≥ 5,000/s",
            rate >= 5000,
        ),
        Row(
            "coordinator intake",
            f"baseline: raw paho QoS 1 messages/s, {n:,} to one receiver process",
            per_s(raw),
            f"per tenth: min {per_s(r.lo)}, median {per_s(r.p50)}, max {per_s(r.hi)}",
        ),
        Row(
            "coordinator intake",
            f"ceiling: a paho relay, 2 QoS 1 messages out per message in, no work, {n:,}",
            per_s(ceiling),
            f"per tenth: min {per_s(e.lo)}, median {per_s(e.p50)}, max {per_s(e.hi)}",
            f"raw paho QoS 1 {per_s(raw)}",
            f"{ceiling / raw:.0%}",
        ),
        Row(
            "coordinator intake",
            f"ceiling: two such relays on one shared subscription, {n:,}",
            per_s(ceiling2),
            f"per tenth: min {per_s(e2.lo)}, median {per_s(e2.p50)}, max {per_s(e2.hi)}",
            f"raw paho QoS 1 {per_s(raw)}",
            f"{ceiling2 / raw:.0%}",
        ),
        Row(
            "coordinator intake",
            f"job cycle/s with simulated workers (nothing run), {n_cycle:,} jobs",
            per_s(cycle),
            f"per tenth: min {per_s(y.lo)}, median {per_s(y.p50)}, max {per_s(y.hi)}",
            f"raw paho QoS 1 {per_s(raw)}",
            f"{cycle / raw:.0%}",
        ),
    ]
