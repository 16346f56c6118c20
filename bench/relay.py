"""The most a paho process can relay: for each QoS 1 message in, two QoS 1 messages out, then
the acknowledgement (the coordinator's pattern for a submission: an event and a dispatch),
with no other work at all. The coordinator intake figure's ceiling.

Run as a script (`python bench/relay.py PORT IN_TOPIC EVENT_TOPIC OUT_TOPIC`): paho and the
standard library only, one thread driving paho's loop_read/loop_write/loop_misc (no network
thread to hand messages to). Prints `ready` once subscribed; stops at end of input (stdin) or
when the connection is lost.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import sys
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def main(port: int, in_topic: str, event_topic: str, out_topic: str) -> int:
    inbox: list[Any] = []
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-relay-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    c.manual_ack_set(True)

    def nodelay(client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    c.on_socket_open = nodelay
    c.on_connect = lambda client, u, f, rc, p: client.subscribe(in_topic, qos=1)
    c.on_subscribe = lambda client, u, mid, rcs, p: print("ready", flush=True)
    c.on_message = lambda client, u, msg: inbox.append(msg)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 1000  # as the coordinator asks
    c.connect("127.0.0.1", port, properties=props)
    poll = select.poll()
    poll.register(sys.stdin.fileno(), select.POLLIN)
    sock = c.socket()
    assert sock is not None
    poll.register(sock.fileno(), select.POLLIN)
    while True:
        events = dict(poll.poll(1000))
        if sys.stdin.fileno() in events:
            break
        if sock.fileno() in events and c.loop_read() != mqtt.MQTT_ERR_SUCCESS:
            return 1  # the broker went away: nothing left to measure
        for msg in inbox:
            c.publish(event_topic, msg.payload, qos=1)
            c.publish(out_topic, msg.payload, qos=1)
            c.ack(msg.mid, msg.qos)
        inbox.clear()
        if c.want_write():
            c.loop_write()
        c.loop_misc()
    c.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]))
