"""Bus latency (in-process, one job at a time) and the footprint of an idle worker."""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from bench.common import (
    HOST,
    REPO,
    BenchError,
    Bus,
    Lines,
    Row,
    Suite,
    iqr,
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
echo responder and its QoS 1 reply, through the same broker (two hops instead of four).

Floor, interleaved in the same blocks: the same four hops through two paho processes
(`bench/relay.py`) that do nothing but relay and the worker's mandatory work. The suite sends
a 400-byte QoS 1 message from its own paho client, driven from one thread, and waits for it to
come back. A relay "coordinator" passes it on to a relay "worker", which commits one new SQLite
row (WAL, `synchronous=FULL`: the promise never to run a job twice), spawns and reaps `sh -c
true` as the worker's runner does, and sends it back through the relay coordinator. Every
message is QoS 1, received with manual acknowledgement (acknowledged after the message is
passed on); the relays drive paho from one thread (no network thread)."""

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


class Chain:
    """The floor: a QoS 1 message around the bus's four hops through `bench/relay.py`'s relays
    (a coordinator, a worker that commits a row and runs `sh -c true`), timed by a paho client
    driven from the calling thread (no network thread)."""

    def __init__(self, bus: Bus) -> None:
        base = f"bench/floor/{secrets.token_hex(4)}"
        argv = [sys.executable, str(REPO / "bench" / "relay.py"), str(bus.port)]
        self.relays: list[subprocess.Popen[Any]] = []
        for role, extra in (("worker", [str(bus.directory / "floor.sqlite")]), ("coordinator", [])):
            p = bus.start(f"floor-{role}", [*argv, role, base, *extra], piped=True)
            self.relays.append(p)
            Lines(p).expect("ready", 15)
        self.topic, self.seq = f"{base}/sub", 0
        self.replies: list[bytes] = []
        subscribed: list[bool] = []
        self.client = new_paho(f"bench-floor-client-{secrets.token_hex(4)}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{base}/evt", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.append(True)
        self.client.on_message = lambda c, u, m: self.replies.append(bytes(m.payload))
        self.client.connect(HOST, bus.port)
        sock = self.client.socket()
        assert sock is not None
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        try:
            self._pump_until(lambda: bool(subscribed), 10, "the floor client's SUBACK")
        except BaseException:
            self.client.disconnect()
            raise

    def _pump_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Drive paho from this thread until `done()`, at most `timeout_s`."""
        deadline = time.perf_counter() + timeout_s
        while not done():
            left = deadline - time.perf_counter()
            if left <= 0:
                raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
            readable = self.poll.poll(min(1000, int(left * 1000) + 1))
            if readable and self.client.loop_read() != 0:
                raise BenchError("the floor client lost its connection")
            if self.client.want_write():
                self.client.loop_write()
            self.client.loop_misc()

    def round_trip(self, timeout_s: float = 5.0) -> float:
        self.seq += 1
        payload = f"{self.seq:010d}".encode() + b"x" * 390  # 400 bytes
        self.replies.clear()
        t0 = time.perf_counter()
        self.client.publish(self.topic, payload, qos=1)  # written at once: no network thread
        self._pump_until(lambda: payload in self.replies, timeout_s, "the floor's reply")
        t = time.perf_counter() - t0
        if self.client.want_write():  # the reply's PUBACK
            self.client.loop_write()
        return t

    def close(self) -> None:
        self.client.disconnect()
        for p in self.relays:  # end of input: each relay disconnects and exits
            if p.stdin is not None:
                p.stdin.close()
        for p in self.relays:
            with contextlib.suppress(subprocess.TimeoutExpired):  # else stopped with the bus
                p.wait(5)


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
        chain: Chain | None = None
        lat: list[float] = []
        raw: list[float] = []
        floor: list[float] = []
        try:
            chain = Chain(bus)
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
                    chain.round_trip()
                while len(lat) < jobs:
                    for _ in range(min(block, jobs - len(lat))):
                        t0, t1 = one_job()
                        lat.append(t1 - t0)
                    raw.extend(pinger.round_trip() for _ in range(block))
                    floor.extend(chain.round_trip() for _ in range(block))
                tap = Tap(bus.port, bus.prefix)
                try:
                    hops = breakdown(tap, one_job, suite.pick(200, 10))
                finally:
                    tap.close()
        finally:
            if chain is not None:
                chain.close()
            pinger.close()
            echo.close()
        after_rss = rss(worker.pid)
    b, r, f = summarize(lat), summarize(raw), summarize(floor)
    spread = f"min {ms(b.lo)}, IQR {ms(b.q1)}-{ms(b.q3)}, max {ms(b.hi)}"
    return [
        Row(
            "bus latency",
            f"submit → result, `true`, p50 of {b.n}",
            ms(b.p50),
            spread,
            f"raw paho echo p50 {ms(r.p50)}; relay-chain floor p50 {ms(f.p50)}",
            f"{ratio(b.p50, r.p50)}; {ratio(b.p50, f.p50)}",
            "p50 ≤ 3 ms",
            b.p50 <= 0.003,
        ),
        Row(
            "bus latency",
            f"submit → result, `true`, p99 of {b.n}",
            ms(b.p99),
            "",
            f"raw paho echo p99 {ms(r.p99)}; relay-chain floor p99 {ms(f.p99)}",
            f"{ratio(b.p99, r.p99)}; {ratio(b.p99, f.p99)}",
            "p99 ≤ 15 ms",
            b.p99 <= 0.015,
        ),
        Row(
            "bus latency",
            f"baseline: raw paho QoS 1 echo round trip, {r.n}",
            f"p50 {ms(r.p50)}, p99 {ms(r.p99)}",
            f"min {ms(r.lo)}, IQR {ms(r.q1)}-{ms(r.q3)}, max {ms(r.hi)}",
        ),
        Row(
            "bus latency",
            "floor: the same 4 hops through one-thread paho relays, one FULL commit + "
            f"`sh -c true` at the worker, p50 / p99 of {f.n}",
            f"p50 {ms(f.p50)}, p99 {ms(f.p99)}",
            f"min {ms(f.lo)}, {iqr(f, ms)}",
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
