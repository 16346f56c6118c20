"""The CLI round trip's baseline: a one-shot Python process that connects with paho, publishes
one request (QoS 1) to the echo responder and exits when the reply (QoS 1) is in.

Run as a script (`python bench/oneshot.py PORT TOPIC`) so that it imports nothing but paho and
the standard library: what any minimal MQTT request/reply tool in Python costs.
Exit codes: 0 answered, 2 no connection, 3 no answer.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main(port: int, topic: str) -> int:
    reply = f"bench/echo/reply/{secrets.token_hex(8)}"
    connected, subscribed, answered = threading.Event(), threading.Event(), threading.Event()
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-oneshot-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )

    def nodelay(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_socket_open = nodelay
    c.on_connect = lambda client, u, f, rc, p: connected.set()
    c.on_subscribe = lambda client, u, mid, rcs, p: subscribed.set()
    c.on_message = lambda client, u, m: answered.set() if m.topic == reply else None
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        if not connected.wait(10):
            return 2
        c.subscribe(reply, qos=1)
        if not subscribed.wait(10):
            return 2
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply
        props.CorrelationData = b"1"
        c.publish(topic, b"ping", qos=1, properties=props)
        return 0 if answered.wait(10) else 3
    finally:
        c.disconnect()
        c.loop_stop()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2]))
