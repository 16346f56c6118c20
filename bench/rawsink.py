"""A QoS 1 subscriber that only acknowledges: counts messages on a topic filter and prints, as
one JSON line, when each arrived (time.monotonic(), the same clock in every process here).

Run as a script (`python bench/rawsink.py PORT TOPIC COUNT TIMEOUT_S`): paho and the standard
library only. Prints `ready` once subscribed, then `{"count": N, "times": [...]}` when COUNT
messages are in or the timeout has passed. paho acknowledges each message (PUBACK) as it
arrives; nothing else is done with it. Used as the raw QoS 1 baseline's receiver, and as the
coordinator intake figure's "workers that only acknowledge".
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def main(port: int, topic: str, count: int, timeout_s: float) -> int:
    times: list[float] = []
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-sink-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )

    def nodelay(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        times.append(time.monotonic())

    c.on_socket_open = nodelay
    c.on_connect = lambda client, u, f, rc, p: client.subscribe(topic, qos=1)
    c.on_subscribe = lambda client, u, mid, rcs, p: print("ready", flush=True)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    deadline = time.monotonic() + timeout_s
    while len(times) < count and time.monotonic() < deadline:
        c.loop(0.1)
    print(json.dumps({"count": len(times), "times": times}), flush=True)
    c.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
