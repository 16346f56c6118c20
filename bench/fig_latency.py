"""Bus latency (in-process, one job at a time) and the footprint of an idle worker."""

from __future__ import annotations

import json
import queue
import secrets
import statistics
import threading
import time
from typing import Any

import psutil

from bench.common import (
    HOST,
    BenchError,
    Row,
    Suite,
    mb,
    ms,
    new_paho,
    private_bus,
    ratio,
    rss,
    summarize,
)
from bench.echo import EchoResponder, Pinger

LATENCY = """\
**Bus latency**: in one process, the package's `Client` (one connection for the whole run):
`submit(target=NODE, command="true")` then `wait()` until the job is terminal, one job at a
time, against a coordinator and one `opsbay worker` (default settings) on a private Mosquitto.
The time covers the client's SUBSCRIBE to the job's topic and its PUBACK wait, the
coordinator's verify/store/dispatch, the worker spawning `sh -c true`, the result and the
final event. Baseline, interleaved in blocks of 50: a raw paho client's QoS 1 request to an
echo responder and its QoS 1 reply, through the same broker (two hops instead of four)."""

FOOTPRINT = """\
**Agent footprint**: resident set (RSS; USS is the memory only this process holds; MB are
10^6 bytes) of one `opsbay worker` started with default settings, connected and idle for 2 s;
and again after the latency run's jobs. The pid is the one started: once its options are
parsed, `opsbay worker` replaces itself with the agent process (`python -m opsbay_mqtt.agent`)."""

BREAKDOWN = """\
**Where the bus latency goes**: after the latency run, 200 more jobs (one at a time) with a
tap: a raw paho client subscribed to `<prefix>/#` at QoS 0 that stamps every message it sees
(the submission, the dispatch, the worker's `running` and `succeeded` results, the
coordinator's events). Each hop is the median over the jobs of the difference between two
stamps (the tap adds a little load of its own; the stamps are when the tap got each message,
so the client's own last step, which the tap sees at about the same time, is not split out)."""

HOPS = (
    ("t0", "submit", "client: SUBSCRIBE + publish"),
    ("submit", "dispatch", "coordinator: submission to dispatch"),
    ("dispatch", "result:running", "worker: dispatch to `running`"),
    ("result:running", "result:succeeded", "worker: run `true`, report"),
    ("result:succeeded", "job:succeeded", "coordinator: result to event"),
)


class Tap:
    """Stamps every message of the bus with its arrival time (a raw paho subscriber)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.seen: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.client = new_paho(f"bench-tap-{secrets.token_hex(4)}")
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=0)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = lambda c, u, m: self.seen.put(
            (time.perf_counter(), bytes(m.payload))
        )
        self.client.connect(HOST, port)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise BenchError("tap: no SUBACK")

    def stamps(self) -> dict[str, float]:
        """First arrival of each kind of message seen since the last call."""
        out: dict[str, float] = {}
        while True:
            try:
                t, payload = self.seen.get_nowait()
            except queue.Empty:
                return out
            try:
                obj: dict[str, Any] = json.loads(payload)
            except ValueError:
                continue
            kind = obj.get("type")
            if kind in ("result", "job"):
                state = obj["state"] if kind == "result" else obj["job"]["state"]
                kind = f"{kind}:{state}"
            if isinstance(kind, str):
                out.setdefault(kind, t)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def breakdown(tap: Tap, one_job: Any, jobs: int) -> str:
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
    with private_bus(suite, "latency") as bus:
        bus.coordinator()
        worker = bus.worker("lat-node")
        time.sleep(suite.pick(2.0, 0.5))  # let the worker settle: it is the idle footprint
        proc = psutil.Process(worker.pid)
        idle_rss, idle_uss = proc.memory_info().rss, proc.memory_full_info().uss
        echo = EchoResponder(bus.port)
        pinger = Pinger(bus.port)
        lat: list[float] = []
        raw: list[float] = []
        try:
            with Client(bus.client_config()) as client:

                def one_job() -> tuple[float, float]:
                    t0 = time.perf_counter()
                    jid = client.submit(
                        target="lat-node", command="true", timeout_s=60, start_by_s=600
                    )
                    job = client.wait(jid, 30)
                    t1 = time.perf_counter()
                    if getattr(job, "state", None) != "succeeded":
                        raise BenchError(f"job {jid} ended {job!r}")
                    return t0, t1

                for _ in range(5):  # warm-up
                    one_job()
                    pinger.round_trip()
                while len(lat) < jobs:
                    for _ in range(min(block, jobs - len(lat))):
                        t0, t1 = one_job()
                        lat.append(t1 - t0)
                    raw.extend(pinger.round_trip() for _ in range(block))
                tap = Tap(bus.port, bus.prefix)
                try:
                    hops = breakdown(tap, one_job, suite.pick(200, 10))
                finally:
                    tap.close()
        finally:
            pinger.close()
            echo.close()
        after_rss = rss(worker.pid)
    b, r = summarize(lat), summarize(raw)
    spread = f"min {ms(b.lo)}, IQR {ms(b.q1)}-{ms(b.q3)}, max {ms(b.hi)}"
    return [
        Row(
            "bus latency",
            f"submit → result, `true`, p50 of {b.n}",
            ms(b.p50),
            spread,
            f"raw paho echo p50 {ms(r.p50)}",
            ratio(b.p50, r.p50),
            "p50 ≤ 3 ms",
            b.p50 <= 0.003,
        ),
        Row(
            "bus latency",
            f"submit → result, `true`, p99 of {b.n}",
            ms(b.p99),
            "",
            f"raw paho echo p99 {ms(r.p99)}",
            ratio(b.p99, r.p99),
            "p99 ≤ 15 ms",
            b.p99 <= 0.015,
        ),
        Row(
            "bus latency",
            f"baseline: raw paho QoS 1 echo round trip, {r.n}",
            f"p50 {ms(r.p50)}, p99 {ms(r.p99)}",
            f"min {ms(r.lo)}, IQR {ms(r.q1)}-{ms(r.q3)}, max {ms(r.hi)}",
        ),
        Row("bus latency", "where it goes: p50 of each hop (with a tap)", hops),
        Row(
            "agent footprint",
            "RSS of one idle `opsbay worker`",
            mb(idle_rss),
            f"USS {mb(idle_uss)}; RSS after {len(lat) + 5} jobs {mb(after_rss)}",
            target="≤ 40 MB",
            met=idle_rss <= 40e6,
        ),
    ]
