"""One-thread paho relays that do nothing but pass messages on (and, as a worker, the work a
worker must do for a job): what the parts allow, for the figures' floors and ceilings.

Run as a script: `python bench/relay.py PORT ROLE BASE [EXTRA]`, paho and the standard library
only, one thread driving paho's loop_read/loop_write/loop_misc (no network thread to hand
messages to), subscriptions at QoS 1 with manual acknowledgement after the message is passed
on. Roles:

- `intake` (the coordinator intake figure's ceiling): a message on `BASE/in` is published at
  QoS 1 to `BASE/event` and to `BASE/out`, as the coordinator publishes an event and a dispatch
  for a submission; it asks for a Receive Maximum of 1,000, as the coordinator does. With EXTRA
  `shared`, it subscribes through the MQTT 5 shared subscription `$share/relays/BASE/in`.
- `coordinator` (the bus latency figure's floor): a message on `BASE/sub` is published at QoS 1
  to `BASE/disp`, a message on `BASE/res` to `BASE/evt`.
- `worker` (the floor; EXTRA is a SQLite file): for a message on `BASE/disp`, one commit in WAL
  mode with `synchronous=FULL` (an INSERT of a new row: the worker's promise never to run a job
  twice), then `sh -c true` spawned and reaped as the worker's runner does (stdin from
  /dev/null, stdout and stderr pipes read to the end, a new session), then it is published at
  QoS 1 to `BASE/res`.

Prints `ready` once subscribed; stops at end of input (stdin) or when the connection is lost.
"""

from __future__ import annotations

import contextlib
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

SUBACK_TIMEOUT_S = 15.0
USAGE = "usage: relay.py PORT intake|coordinator|worker BASE [shared|DBPATH]"


def promise(path: str) -> Callable[[], None]:
    """One commit per call: the INSERT of a new row, in WAL mode with synchronous=FULL."""
    db = sqlite3.connect(path, isolation_level=None)  # autocommit: each INSERT commits
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS started (job_id TEXT PRIMARY KEY, updated_ms INTEGER NOT NULL)"
    )
    run, n = secrets.token_hex(4), 0

    def insert() -> None:
        nonlocal n
        n += 1
        db.execute(
            "INSERT INTO started (job_id, updated_ms) VALUES (?, ?)",
            (f"{run}-{n}", int(time.time() * 1000)),
        )

    return insert


def spawn_true() -> None:
    subprocess.run(
        ["/bin/sh", "-c", "true"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        start_new_session=True,
        timeout=30,
    )


def routes(role: str, base: str, extra: str | None) -> tuple[dict[str, list[str]], str | None]:
    """For each topic filter to subscribe to, where its messages go on; and `extra` checked."""
    if role == "intake":
        into = f"$share/relays/{base}/in" if extra == "shared" else f"{base}/in"
        return {into: [f"{base}/event", f"{base}/out"]}, None
    if role == "coordinator":
        return {f"{base}/sub": [f"{base}/disp"], f"{base}/res": [f"{base}/evt"]}, None
    if role == "worker" and extra:
        return {f"{base}/disp": [f"{base}/res"]}, extra
    raise SystemExit(f"{USAGE}; got {role!r}")


def main(port: int, role: str, base: str, extra: str | None) -> int:
    onward, db_path = routes(role, base, extra)
    work: Callable[[], None] | None = None
    if db_path is not None:
        insert = promise(db_path)

        def work() -> None:
            insert()
            spawn_true()

    # A shared subscription's messages carry the plain topic.
    by_topic = {t.removeprefix("$share/relays/"): out for t, out in onward.items()}
    inbox: list[Any] = []
    subscribed = False
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-relay-{role}-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    c.manual_ack_set(True)

    def nodelay(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_subscribe(client: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
        nonlocal subscribed
        subscribed = True
        print("ready", flush=True)

    c.on_socket_open = nodelay
    c.on_connect = lambda client, u, f, rc, p: client.subscribe([(t, 1) for t in onward])
    c.on_subscribe = on_subscribe
    c.on_message = lambda client, u, msg: inbox.append(msg)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 1000  # as the coordinator asks
    c.connect("127.0.0.1", port, properties=props)
    sock = c.socket()
    assert sock is not None
    stdin = sys.stdin.fileno()
    poll = select.poll()
    poll.register(stdin, select.POLLIN)
    poll.register(sock.fileno(), select.POLLIN)
    deadline = time.monotonic() + SUBACK_TIMEOUT_S
    while True:
        events = dict(poll.poll(1000))
        if stdin in events and not os.read(stdin, 4096):
            break  # end of input: the suite is done with us
        if sock.fileno() in events and c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return 1  # the broker went away: nothing left to measure
        for msg in inbox:
            if work is not None:
                work()
            for topic in by_topic[msg.topic]:
                c.publish(topic, msg.payload, qos=1)
            c.ack(msg.mid, msg.qos)
        inbox.clear()
        if c.want_write():
            c.loop_write()
        c.loop_misc()
        if not subscribed and time.monotonic() > deadline:
            print(f"no SUBACK within {SUBACK_TIMEOUT_S:g} s", file=sys.stderr)
            return 1
    c.disconnect()
    return 0


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit(USAGE)
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], (sys.argv[4:] or [None])[0]))
