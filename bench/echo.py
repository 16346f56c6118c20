"""The baselines' other end: an MQTT echo responder, and a raw paho client that times round
trips through it. Nothing of opsbay: only paho and the broker."""

from __future__ import annotations

import queue
import secrets
import threading
import time
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import HOST, BenchError, new_paho

ECHO_TOPIC = "bench/echo/request"
PAYLOAD = b"x" * 300  # about the size of a signed submission


def _connect(client: Any, port: int, topic: str) -> None:
    subscribed = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.connect(HOST, port)
    client.loop_start()
    if not subscribed.wait(10):
        client.loop_stop()
        raise BenchError(f"no SUBACK for {topic}")


class EchoResponder:
    """Answers every request on ECHO_TOPIC with its payload, at QoS 1, on the request's MQTT 5
    response topic with its correlation data (what `mosquitto_rr` expects)."""

    def __init__(self, port: int) -> None:
        self.client = new_paho(f"bench-echo-{secrets.token_hex(4)}")
        self.client.on_message = self._reply
        _connect(self.client, port, ECHO_TOPIC)

    @staticmethod
    def _reply(client: Any, userdata: Any, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        topic = getattr(props, "ResponseTopic", None)
        if not topic:
            return
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            out.CorrelationData = corr
        client.publish(topic, msg.payload, qos=1, properties=out)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Pinger:
    """A long-lived raw paho client: QoS 1 request to the echo responder, QoS 1 reply back."""

    def __init__(self, port: int) -> None:
        self.reply_topic = f"bench/echo/reply/{secrets.token_hex(6)}"
        self.replies: queue.Queue[bytes] = queue.Queue()
        self.client = new_paho(f"bench-ping-{secrets.token_hex(4)}")
        self.client.on_message = lambda c, u, m: self.replies.put(
            getattr(m.properties, "CorrelationData", b"")
        )
        _connect(self.client, port, self.reply_topic)
        self.seq = 0

    def round_trip(self, timeout_s: float = 5.0) -> float:
        self.seq += 1
        corr = str(self.seq).encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        t0 = time.perf_counter()
        self.client.publish(ECHO_TOPIC, PAYLOAD, qos=1, properties=props)
        deadline = t0 + timeout_s
        while True:
            try:
                got = self.replies.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                raise BenchError(f"no echo within {timeout_s:g} s") from None
            if got == corr:
                return time.perf_counter() - t0

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
