"""The bus latency figure's floor: two paho relays that carry a message over the bus's four
broker hops (client -> coordinator -> worker -> coordinator -> client) and do only the work
the worker must do for a job, nothing else.

Run as a script (`python bench/floor.py PORT ROLE BASE [DBPATH]`): paho and the standard
library only, one thread driving paho's loop_read/loop_write/loop_misc (no network thread to
hand messages to), subscriptions at QoS 1 with manual acknowledgement.

- `coordinator`: a message on `BASE/sub` is published at QoS 1 to `BASE/disp`, a message on
  `BASE/res` to `BASE/evt`; then it is acknowledged.
- `worker` (needs DBPATH): for a message on `BASE/disp`, one SQLite commit in WAL mode with
  `synchronous=FULL` (an INSERT of a new row: the worker's promise never to run a job twice),
  then `sh -c true` spawned and reaped as the worker's runner does (stdin from /dev/null,
  stdout and stderr pipes read to the end, a new session), then the message is published at
  QoS 1 to `BASE/res` and acknowledged.

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

SUBACK_TIMEOUT_S = 15.0


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


def main(port: int, role: str, base: str, db_path: str | None) -> int:
    if role == "coordinator":
        topics = [f"{base}/sub", f"{base}/res"]
        onward = {f"{base}/sub": f"{base}/disp", f"{base}/res": f"{base}/evt"}
        work: Callable[[], None] | None = None
    elif role == "worker" and db_path:
        topics = [f"{base}/disp"]
        onward = {f"{base}/disp": f"{base}/res"}
        insert = promise(db_path)

        def work() -> None:
            insert()
            spawn_true()

    else:
        print(
            f"usage: floor.py PORT coordinator|worker BASE [DBPATH]; got {role!r}", file=sys.stderr
        )
        return 2

    inbox: list[Any] = []
    subscribed = False
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-floor-{role}-{secrets.token_hex(4)}",
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
    c.on_connect = lambda client, u, f, rc, p: client.subscribe([(t, 1) for t in topics])
    c.on_subscribe = on_subscribe
    c.on_message = lambda client, u, msg: inbox.append(msg)
    c.connect("127.0.0.1", port)
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
            return 1  # the broker went away
        for msg in inbox:
            if work is not None:
                work()
            c.publish(onward[msg.topic], msg.payload, qos=1)
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
    sys.exit(
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    )
