"""An in-memory stand-in for `transport.Connection`, for stepping the worker (or anything that
only publishes, acknowledges and receives) in process, without a broker: what it published and
acknowledged is kept for the test to read."""

from __future__ import annotations

import itertools
import threading
from typing import Any, NamedTuple

from opsbay_mqtt.transport import BrokerURL, Inbound


class Published(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class _Sent:
    """What `publish` returns: acknowledged at once (a broker that never refuses)."""

    rc = 0

    def is_published(self) -> bool:
        return True


class MemoryConnection:
    def __init__(self, url: str = "mqtt://n1@127.0.0.1:1") -> None:
        self.url = BrokerURL.parse(url)
        self.published: list[Published] = []
        self.acked: list[int] = []
        self.reconnect = True
        self.connected = True
        self._lock = threading.Lock()  # job threads publish too
        self._mids = itertools.count(1)

    def message(self, topic: str, payload: bytes) -> Inbound:
        """An inbound QoS 1 message with a fresh packet id, as the broker would deliver it."""
        return Inbound(topic, payload, mid=next(self._mids), qos=1)

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, **_: Any
    ) -> _Sent:
        with self._lock:
            self.published.append(Published(topic, payload, qos, retain))
        return _Sent()

    def publish_wait(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        self.publish(topic, payload, retain=bool(kwargs.get("retain")))

    def ack(self, msg: Inbound) -> None:
        with self._lock:
            self.acked.append(msg.mid)

    def pump(self, timeout_s: float, most: int = 1000) -> None:
        """Nothing to read or write (the test hands messages over itself): wait, as the real
        one waits for the broker, up to `timeout_s` (a little, so callers' loops do not spin)."""
        threading.Event().wait(min(timeout_s, 0.01))

    def sent(self, part: str) -> list[Published]:
        with self._lock:
            return [p for p in self.published if part in p.topic]
