"""Bus latency (in process, one job at a time), where it goes, and the idle worker's footprint."""

from __future__ import annotations

import json
import queue
import secrets
import statistics
import time
from collections.abc import Callable
from typing import Any

import psutil

from bench import baseline as paho_loop
from bench.common import (
    BenchError,
    Row,
    Suite,
    baseline,
    close_input,
    close_paho,
    iqr,
    mb,
    ms,
    paho_thread,
    private_bus,
    ratio,
    rss,
    summarize,
)
from bench.fig_cli import ECHO_TOPIC

HOPS = (
    ("t0", "submit", "client: SUBSCRIBE + publish"),
    ("submit", "dispatch", "coordinator: submission to dispatch"),
    ("dispatch", "result:running", "worker: dispatch to `running`"),
    ("result:running", "result:succeeded", "worker: run `true`, report"),
    ("result:succeeded", "job:succeeded", "coordinator: result to event"),
)


class Looper:
    """A paho client driven from the calling thread (no network thread), as the package's
    transport is: times a QoS 1 message until it comes back on `reply` (through the echo
    responder, or the relay chain of the floor)."""

    def __init__(self, port: int, reply: str) -> None:
        self.reply, self.seq = reply, 0
        self.client = paho_loop.client("looper", port, [reply])
        self.got: list[bytes] = []
        subscribed: list[bool] = []
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.append(True)
        self.client.on_message = lambda c, u, m: self.got.append(bytes(m.payload))
        if not paho_loop.drive(self.client, lambda: bool(subscribed), time.monotonic() + 10, False):
            raise BenchError(f"no SUBACK for {reply}")

    def round_trip(self, topic: str, props: Any = None, timeout_s: float = 5.0) -> float:
        self.seq += 1
        payload = f"{self.seq:010d}".encode() + b"x" * 390  # about a signed submission's size
        self.got.clear()
        t0 = time.perf_counter()
        self.client.publish(topic, payload, qos=1, properties=props)
        if not paho_loop.drive(self.client, lambda: payload in self.got, t0 + timeout_s, False):
            raise BenchError(f"no reply on {self.reply} within {timeout_s:g} s")
        return time.perf_counter() - t0

    def echo(self) -> float:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic, props.CorrelationData = self.reply, b"1"
        return self.round_trip(ECHO_TOPIC, props)


class Tap:
    """Stamps every message of the bus with its arrival time (a raw paho subscriber)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.seen: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.client = paho_thread("tap", port, [(f"{prefix}/#", 0)], self.seen)

    def stamps(self) -> dict[str, float]:
        """First arrival of each kind of message seen since the last call."""
        out: dict[str, float] = {}
        while not self.seen.empty():
            t, payload = self.seen.get_nowait()
            with_type: dict[str, Any] = json.loads(payload)
            kind = with_type.get("type")
            if kind in ("result", "job"):
                state = with_type["state"] if kind == "result" else with_type["job"]["state"]
                kind = f"{kind}:{state}"
            if isinstance(kind, str):
                out.setdefault(kind, t)
        return out


def breakdown(tap: Tap, one_job: Callable[[], tuple[float, float]], jobs: int) -> str:
    hops: dict[str, list[float]] = {label: [] for _, _, label in HOPS}
    for _ in range(jobs):
        tap.stamps()
        t0, t1 = one_job()
        time.sleep(0.005)  # the last messages reach the tap too
        marks = {**tap.stamps(), "t0": t0, "t1": t1}
        for a, b, label in HOPS:
            if a in marks and b in marks:
                hops[label].append(marks[b] - marks[a])
    return "; ".join(f"{label} {ms(statistics.median(xs))}" for label, xs in hops.items() if xs)


def run(suite: Suite) -> list[Row]:
    from opsbay_mqtt.client import Client

    jobs, block = suite.pick(1000, 30), suite.pick(50, 10)
    lat: list[float] = []
    raw: list[float] = []
    floor: list[float] = []
    with private_bus(suite, "latency") as bus:
        bus.coordinator()
        worker = bus.worker("lat-node")
        time.sleep(suite.pick(2.0, 0.5))  # let the worker settle: it is the idle footprint
        proc = psutil.Process(worker.pid)
        idle_rss, idle_uss = proc.memory_info().rss, proc.memory_full_info().uss
        base = f"bench/floor/{secrets.token_hex(4)}"
        relays = [
            baseline(bus, "worker", base, str(bus.directory / "floor.sqlite")),
            baseline(bus, "coordinator", base),
            baseline(bus, "echo", ECHO_TOPIC),
        ]
        pinger = Looper(bus.port, f"bench/echo/reply/{secrets.token_hex(6)}")
        chain = Looper(bus.port, f"{base}/evt")
        with Client(bus.client_config()) as client:

            def one_job() -> tuple[float, float]:
                t0 = time.perf_counter()
                jid = client.submit(target="lat-node", command="true", timeout_s=60, start_by_s=600)
                job = client.wait(jid, 30)
                t1 = time.perf_counter()
                if getattr(job, "state", None) != "succeeded":
                    raise BenchError(f"job {jid} ended {job!r}")
                return t0, t1

            for _ in range(5):  # warm-up
                one_job(), pinger.echo(), chain.round_trip(f"{base}/sub")
            while len(lat) < jobs:
                for _ in range(min(block, jobs - len(lat))):
                    t0, t1 = one_job()
                    lat.append(t1 - t0)
                raw.extend(pinger.echo() for _ in range(block))
                floor.extend(chain.round_trip(f"{base}/sub") for _ in range(block))
            tap = Tap(bus.port, bus.prefix)
            try:
                hops = breakdown(tap, one_job, suite.pick(200, 10))
            finally:
                close_paho(tap.client)
        pinger.client.disconnect()
        chain.client.disconnect()
        close_input(*relays)
        after_rss = rss(worker.pid)
    b, r, f = summarize(lat), summarize(raw), summarize(floor)
    fig, p50 = "bus latency", f"raw paho echo p50 {ms(r.p50)}; relay-chain floor p50 {ms(f.p50)}"
    p99 = f"raw paho echo p99 {ms(r.p99)}; relay-chain floor p99 {ms(f.p99)}"
    floor_what = "floor: the same 4 hops through one-thread paho relays, one FULL commit + "
    return [
        Row(
            fig,
            f"submit → result, `true`, p50 of {b.n}",
            ms(b.p50),
            f"min {ms(b.lo)}, IQR {ms(b.q1)}-{ms(b.q3)}, max {ms(b.hi)}",
            p50,
            f"{ratio(b.p50, r.p50)}; {ratio(b.p50, f.p50)}",
            "p50 ≤ 3 ms",
            b.p50 <= 0.003,
        ),
        Row(
            fig,
            f"submit → result, `true`, p99 of {b.n}",
            ms(b.p99),
            "",
            p99,
            f"{ratio(b.p99, r.p99)}; {ratio(b.p99, f.p99)}",
            "p99 ≤ 15 ms",
            b.p99 <= 0.015,
        ),
        Row(
            fig,
            f"baseline: raw paho QoS 1 echo round trip, one-thread client, {r.n}",
            f"p50 {ms(r.p50)}, p99 {ms(r.p99)}",
            f"min {ms(r.lo)}, {iqr(r, ms)}",
        ),
        Row(
            fig,
            f"{floor_what}`sh -c true` at the worker, p50 / p99 of {f.n}",
            f"p50 {ms(f.p50)}, p99 {ms(f.p99)}",
            f"min {ms(f.lo)}, {iqr(f, ms)}",
        ),
        Row(fig, "where it goes: p50 of each hop (with a tap)", hops),
        Row(
            "agent footprint",
            "RSS of one idle `opsbay worker`",
            mb(idle_rss),
            f"USS {mb(idle_uss)}; RSS after {len(lat) + 5} jobs {mb(after_rss)}",
            target="≤ 40 MB",
            met=idle_rss <= 40e6,
        ),
    ]
