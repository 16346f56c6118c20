"""The baselines' processes, paho and the standard library only: one thread drives paho (no
network thread), MQTT 5 with TCP_NODELAY on 127.0.0.1. `python -m bench.baseline ROLE PORT ...`:

- `oneshot PORT TOPIC`: one QoS 1 request (MQTT 5 response topic), exit 0 at the QoS 1 reply
  (2: no SUBACK, 3: no reply). `echo PORT TOPIC`: answers such requests at QoS 1.
- `sink PORT TOPIC COUNT TIMEOUT_S`: acknowledges and counts; at COUNT or the timeout prints
  `{"count": N, "times": [time.monotonic() of each]}`.
- `intake PORT BASE [shared]`: BASE/in -> BASE/event + BASE/out, Receive Maximum 1,000, manual
  acknowledgement after passing it on, as the coordinator (`shared`: `$share/relays/BASE/in`).
- `coordinator PORT BASE`: BASE/sub -> BASE/disp, BASE/res -> BASE/evt (the latency floor).
- `worker PORT BASE DBPATH`: BASE/disp -> one INSERT committed with WAL and synchronous=FULL,
  `sh -c true` spawned and reaped as the runner does -> BASE/res (the latency floor).

Each prints `ready` once subscribed; the long-lived roles stop at the end of standard input.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = "127.0.0.1"


def client(name: str, port: int, subscribe: list[str], manual_ack: bool = False) -> mqtt.Client:
    """Connected (CONNECT sent) and subscribing at QoS 1 once the CONNACK is in; `ready` is
    printed at the SUBACK."""
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-{name}-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    c.manual_ack_set(manual_ack)

    def nodelay(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_socket_open = nodelay
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe([(t, 1) for t in subscribe])
    c.on_subscribe = lambda cl, u, mid, rcs, p: print("ready", flush=True)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 1000  # as the coordinator asks
    c.connect(HOST, port, properties=props)
    return c


def drive(c: mqtt.Client, done: Callable[[], bool], deadline: float, stdin: bool = True) -> bool:
    """Drive paho from this thread until `done()` (True), the deadline, the end of standard
    input or a lost connection (False)."""
    sock = c.socket()
    assert sock is not None
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    if stdin:
        poll.register(sys.stdin.fileno(), select.POLLIN)
    while True:
        if done():
            return True
        if c.want_write():
            c.loop_write()
        c.loop_misc()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        events = dict(poll.poll(int(min(1.0, left) * 1000) + 1))
        if stdin and sys.stdin.fileno() in events and not os.read(sys.stdin.fileno(), 4096):
            return False
        if sock.fileno() in events and c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return False


def forever(c: mqtt.Client, handle: Callable[[Any], None]) -> int:
    """Run `handle` on each message until the end of standard input."""
    inbox: list[Any] = []
    c.on_message = lambda cl, u, m: inbox.append(m)

    def step() -> bool:
        for m in inbox:
            handle(m)
        inbox.clear()
        return False

    drive(c, step, float("inf"))
    c.disconnect()
    return 0


def oneshot(port: int, topic: str) -> int:
    reply = f"bench/echo/reply/{secrets.token_hex(8)}"
    c = client("oneshot", port, [reply])
    answered: list[bool] = []
    subscribed: list[bool] = []
    c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.append(True)
    c.on_message = lambda cl, u, m: answered.append(True)
    deadline = time.monotonic() + 10
    if not drive(c, lambda: bool(subscribed), deadline, stdin=False):
        return 2
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic, props.CorrelationData = reply, b"1"
    c.publish(topic, b"ping", qos=1, properties=props)
    ok = drive(c, lambda: bool(answered), deadline, stdin=False)
    c.disconnect()
    return 0 if ok else 3


def echo(port: int, topic: str) -> int:
    c = client("echo", port, [topic])

    def reply(m: Any) -> None:
        got: Any = getattr(m, "properties", None)
        if getattr(got, "ResponseTopic", None):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.CorrelationData = getattr(got, "CorrelationData", b"")
            c.publish(got.ResponseTopic, m.payload, qos=1, properties=props)

    return forever(c, reply)


def sink(port: int, topic: str, count: int, timeout_s: float) -> int:
    c = client("sink", port, [topic])
    times: list[float] = []
    c.on_message = lambda cl, u, m: times.append(time.monotonic())
    drive(c, lambda: len(times) >= count, time.monotonic() + timeout_s, stdin=False)
    print(json.dumps({"count": len(times), "times": times}), flush=True)
    c.disconnect()
    return 0


def promise(path: str) -> Callable[[], None]:
    """One commit per call: the INSERT of a new row, in WAL mode with synchronous=FULL."""
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: each INSERT commits
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS started (job_id TEXT PRIMARY KEY, at_ms INTEGER)")
    run = secrets.token_hex(4)
    n = [0]

    def insert() -> None:
        n[0] += 1
        db.execute("INSERT INTO started VALUES (?, ?)", (f"{run}-{n[0]}", int(time.time() * 1e3)))

    return insert


def relay(port: int, role: str, base: str, extra: str | None) -> int:
    work: Callable[[], None] | None = None
    if role == "intake":
        into = f"$share/relays/{base}/in" if extra == "shared" else f"{base}/in"
        onward = {into: [f"{base}/event", f"{base}/out"]}
    elif role == "coordinator":
        onward = {f"{base}/sub": [f"{base}/disp"], f"{base}/res": [f"{base}/evt"]}
    else:
        assert extra, "worker: DBPATH"
        onward, insert = {f"{base}/disp": [f"{base}/res"]}, promise(extra)

        def work() -> None:
            insert()
            subprocess.run(
                ["/bin/sh", "-c", "true"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                start_new_session=True,
                timeout=30,
            )

    by_topic = {t.removeprefix("$share/relays/"): out for t, out in onward.items()}
    c = client(f"relay-{role}", port, list(onward), manual_ack=True)

    def handle(m: Any) -> None:
        if work is not None:
            work()
        for topic in by_topic[m.topic]:
            c.publish(topic, m.payload, qos=1)
        c.ack(m.mid, m.qos)

    return forever(c, handle)


def main(argv: list[str]) -> int:
    role, port, rest = argv[0], int(argv[1]), argv[2:]
    if role == "oneshot":
        return oneshot(port, rest[0])
    if role == "echo":
        return echo(port, rest[0])
    if role == "sink":
        return sink(port, rest[0], int(rest[1]), float(rest[2]))
    if role in ("intake", "coordinator", "worker"):
        return relay(port, role, rest[0], rest[1] if len(rest) > 1 else None)
    raise SystemExit(f"unknown role {role!r}; see python -m bench.baseline's docstring")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
