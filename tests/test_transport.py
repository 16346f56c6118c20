"""transport: what importing it costs a process that never looks for a proxy, and a
connection without a network thread."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from opsbay_mqtt.transport import BrokerURL, Connection, Inbound, disconnect_reason
from tests.conftest import restart
from tests.helpers import Broker, Bus, Watcher, stop_process, wait_until

CODE = """
import json, sys
from opsbay_mqtt.lazymodules import defer_urllib_request
defer_urllib_request()  # as the entry points do
import opsbay_mqtt.transport
before = sorted(m for m in ("http.client", "email.message", "tempfile") if m in sys.modules)
import urllib.request
from urllib.request import getproxies
proxies = urllib.request.getproxies()
print(json.dumps({
    "before": before,
    "real": type(sys.modules["urllib.request"]).__name__,
    "same": getproxies is sys.modules["urllib.request"].getproxies,
    "proxies": proxies,
}))
"""


def test_paho_is_imported_without_urllib_request_which_still_works_when_used() -> None:
    """paho imports urllib.request only to look for a proxy; the stand-in transport gives it
    must not import http.client and email up front, and must become the real module on use."""
    out = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "http_proxy": "http://127.0.0.1:3128"},
    )
    got = json.loads(out.stdout)
    assert got["before"] == []
    assert got["real"] == "module"
    assert got["same"] is True
    assert got["proxies"] == {"http": "http://127.0.0.1:3128"}


def test_an_unthreaded_connection_starts_no_thread_and_delivers(broker: Broker) -> None:
    """The caller's thread drives paho (receive/pump); nothing runs behind
    its back, and what it publishes reaches a plain subscriber and its own subscription."""
    topic = f"unthreaded/{uuid.uuid4().hex[:8]}"
    watcher = Watcher(broker.port, f"{topic}/#")
    before = threading.active_count()
    conn = Connection(url=BrokerURL.parse(broker.url), client_id=f"t-{uuid.uuid4().hex[:8]}")
    try:
        conn.connect(timeout_s=10)
        conn.subscribe([(f"{topic}/+", 1)])
        assert threading.active_count() == before
        conn.publish_wait(f"{topic}/a", b'{"n": 1}')
        got: list[Inbound] = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = conn.receive(0.2, 10)
        assert [(m.topic, m.payload, m.qos) for m in got] == [(f"{topic}/a", b'{"n": 1}', 1)]
        assert watcher.wait_for(lambda t, body, retained: t == f"{topic}/a", "the message")
        assert threading.active_count() == before
    finally:
        conn.close()
        watcher.close()


@contextmanager
def connection_lost(own: Bus) -> Iterator[Connection]:
    """A connection to the bus's own broker, which has just stopped under it (the test starts
    it again with `restart`); closed at the end."""
    conn = Connection(url=BrokerURL.parse(own.broker.url), client_id=f"t-{uuid.uuid4().hex[:8]}")
    try:
        conn.connect(timeout_s=10)
        stop_process(own.broker.process)
        wait_until(lambda: conn.pump(0.05) or not conn.connected, 10, "the connection lost")
        yield conn
    finally:
        conn.close()


def test_a_call_on_a_lost_connection_reconnects_first(own: Bus) -> None:
    """No thread reconnects behind the caller's back: after a broker restart, the next
    subscribe does it (with the usual backoff) before it goes on, as paho's thread would have."""
    topic = f"lost/{uuid.uuid4().hex[:8]}"
    with connection_lost(own) as conn:
        restart(own)
        conn.subscribe([(topic, 1)], wait=False)
        conn.publish_wait(topic, b"{}")
        assert conn.connected


def test_a_publish_made_while_disconnected_goes_out_on_reconnection(own: Bus) -> None:
    """paho queues a QoS 1 publish made with no connection and sends it once reconnected (its
    is_published() raises meanwhile): publish_wait waits for that PUBACK, within its timeout,
    instead of failing at once."""
    topic = f"{own.prefix}/queued/{uuid.uuid4().hex[:8]}"
    with connection_lost(own) as conn:
        info = conn.publish(topic, b'{"late": true}')  # no connection: queued by paho
        restart(own)
        watcher = own.watch(topic.removeprefix(f"{own.prefix}/"))
        conn.wait_published(info, topic, 30)
        watcher.wait_for(lambda t, b, r: b == {"late": True}, "the queued message", 10)


class _Flags:
    def __init__(self, from_server: bool) -> None:
        self.is_disconnect_packet_from_server = from_server


class _Code:
    def __init__(self, value: int, name: str) -> None:
        self.value, self.name = value, name

    def __str__(self) -> str:
        return self.name


@pytest.mark.parametrize(
    ("from_server", "code", "said"),
    [
        (True, 142, "another connection took over this session"),
        (True, 137, "the broker disconnected us: Server busy"),
        (False, 128, "closed by the broker or the network"),  # paho: "Unspecified error"
        (False, 0, "closed"),
    ],
)
def test_a_disconnect_is_explained_in_words(from_server: bool, code: int, said: str) -> None:
    names = {142: "Session taken over", 137: "Server busy", 128: "Unspecified error", 0: "Success"}
    text = disconnect_reason(_Flags(from_server), _Code(code, names[code]))
    assert said in text and "Unspecified" not in text
