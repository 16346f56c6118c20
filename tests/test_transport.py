"""transport: what importing it costs a process that never looks for a proxy, a connection
without a network thread, and a list of brokers to move along."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from opsbay_mqtt.errors import BrokerError, ConfigError
from opsbay_mqtt.transport import CONNECTED, BrokerURL, Connection, Inbound, disconnect_reason
from tests.conftest import restart, start_broker
from tests.harness import free_port
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


# -- a list of brokers


@pytest.mark.parametrize(
    ("value", "brokers"),
    [
        ("mqtt://a:1883", ["mqtt://a:1883"]),
        ("mqtt://a,mqtt://b:1884", ["mqtt://a:1883", "mqtt://b:1884"]),
        ("mqtt://a , tcp://b", ["mqtt://a:1883", "mqtt://b:1883"]),  # spaces around the comma
        ("mqtts://a,ssl://b", ["mqtts://a:8883", "mqtts://b:8883"]),
        (
            "mqtt://a?version=3.1.1,mqtt://[::1]:2?version=3.1.1",
            ["mqtt://a:1883?version=3.1.1", "mqtt://[::1]:2?version=3.1.1"],
        ),
        # A comma splits only before a URL: a password (or a lone URL's) may hold one.
        ("mqtt://ci:Se,cret@a,mqtt://ci:x@b", ["mqtt://ci@a:1883", "mqtt://ci@b:1883"]),
        ("mqtt://ci:Se,cret@a", ["mqtt://ci@a:1883"]),
    ],
)
def test_a_broker_list_is_parsed_in_order(value: str, brokers: list[str]) -> None:
    parsed = BrokerURL.parse_list(value)
    assert [str(b) for b in parsed] == brokers
    assert str(parsed) == ",".join(brokers)


def test_a_one_url_list_is_that_url_and_fails_as_it_did() -> None:
    assert BrokerURL.parse_list("mqtt://ci:p%40ss@h:1") == (
        BrokerURL.parse("mqtt://ci:p%40ss@h:1"),
    )
    for bad in ("mqtt://h:0", "http://h", "mqtt://ci:Top#Secret@h"):
        with pytest.raises(ConfigError) as one:
            BrokerURL.parse(bad)
        with pytest.raises(ConfigError) as listed:
            BrokerURL.parse_list(bad)
        assert str(listed.value) == str(one.value)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("mqtt://a,mqtt://ci:Secret@b:0", "entry 2 of 2, 'mqtt://ci:***@b:0' has port 0"),
        ("mqtt://ci:Secret@a:x,mqtt://b", "entry 1 of 2, 'mqtt://ci:***@a:x' has a port"),
        ("mqtt://a,mqtt://b,http://c", "entry 2 of 2, 'mqtt://b,http://c' has a path"),
        ("mqtt://a:1883,b:1883", "give whole URLs, one comma between two"),
        ("mqtt://a,,mqtt://b", "give whole URLs, one comma between two"),
        ("mqtt://a,mqtt://b?version=3.1.1", "entry 2, 'mqtt://b:1883?version=3.1.1', and entry 1"),
        ("mqtt://a,mqtts://ci:Secret@b", "differ in scheme"),
        ("mqtt://a:1883,mqtt://b,mqtt://a", "entry 3, 'mqtt://a:1883', is the broker of entry 1"),
    ],
)
def test_a_bad_broker_list_names_the_entry_and_never_its_password(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        BrokerURL.parse_list(value)
    assert str(e.value).startswith("--broker / OPSBAY_BROKER: ")
    assert "Secret" not in str(e.value)


def dead_url() -> str:
    """A loopback port nobody listens on."""
    return f"mqtt://127.0.0.1:{free_port()}"


def test_a_connection_takes_the_first_broker_of_the_list_that_answers(broker: Broker) -> None:
    dead = dead_url()
    conn = Connection(url=BrokerURL.parse_list(f"{dead},{broker.url}"), client_id="t-first")
    try:
        assert conn.connect(timeout_s=10)
        assert str(conn.url) == broker.url
    finally:
        conn.close()


def test_a_connection_that_no_broker_takes_names_every_broker_and_why() -> None:
    dead = [dead_url(), dead_url()]
    conn = Connection(url=BrokerURL.parse_list(",".join(dead)), client_id="t-none")
    with pytest.raises(BrokerError) as e:
        conn.connect(timeout_s=5)
    said = str(e.value)
    assert said.startswith(f"no broker of {dead[0]},{dead[1]} accepted the connection: ")
    assert all(f"cannot reach broker {d}: " in said for d in dead), said


def test_a_lost_connection_moves_on_to_the_next_broker(own: Bus, tmp_path: Path) -> None:
    """Broker A stops for good: the connection goes on through B, with its subscriptions, and
    says it reconnected (CONNECTED in the inbox); a message published while neither held it
    goes out through B."""
    other = start_broker(tmp_path / "second-broker")
    topic = f"moved/{uuid.uuid4().hex[:8]}"
    conn = Connection(
        url=BrokerURL.parse_list(f"{own.broker.url},{other.url}"), client_id="t-moves"
    )
    try:
        conn.connect(timeout_s=10)
        assert str(conn.url) == own.broker.url
        conn.subscribe([(topic, 1)])
        stop_process(own.broker.process)
        wait_until(lambda: conn.pump(0.05) or not conn.connected, 10, "the connection lost")
        info = conn.publish(topic, b'{"through": "b"}')
        conn.wait_published(info, topic, 30)
        assert str(conn.url) == other.url
        got: list[Inbound] = []
        wait_until(lambda: got.extend(conn.receive(0.1, 10)) or len(got) >= 2, 10, "delivery")
        assert [(m.topic, m.payload) for m in got] == [
            (CONNECTED, b""),
            (topic, b'{"through": "b"}'),
        ]
    finally:
        conn.close()
        stop_process(other.process)


def test_the_cli_tries_the_next_broker_and_names_every_one_it_tried(running: Bus) -> None:
    dead, dead_too = dead_url(), dead_url()
    out = running.cli(
        "submit",
        "-t",
        "n1",
        "-c",
        "echo via the list",
        "--wait",
        OPSBAY_BROKER=f"{dead},{running.broker.url}",
    )
    assert (out.returncode, out.stdout) == (0, "via the list\n"), out.stderr
    out = running.cli("nodes", OPSBAY_BROKER=f"{dead},{dead_too}")
    assert out.returncode == 69, out.stderr
    assert f"cannot reach broker {dead}: " in out.stderr
    assert f"cannot reach broker {dead_too}: " in out.stderr
