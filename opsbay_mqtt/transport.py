"""The only module that imports paho: broker URLs, one connection, inbound messages as a queue.

paho callbacks only convert and enqueue; all work happens on the caller's threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

# The entry points give paho a stand-in for urllib.request first (lazymodules).
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from opsbay_mqtt.errors import BrokerError, BrokerRefused, ConfigError
from opsbay_mqtt.inbound import CONNECTED as CONNECTED
from opsbay_mqtt.inbound import Inbound as Inbound

log = logging.getLogger(__name__)

# Long enough that a worker or coordinator offline for a long weekend keeps its queued messages.
SESSION_EXPIRY_S = 14 * 24 * 3600

# CONNACK reason codes that retrying cannot fix (MQTT 5 codes; paho maps MQTT 3.1.1's onto them):
# what a person has to change, said once at ERROR level.
PERMANENT_CONNACK = {
    132: "the broker does not speak this MQTT version (try ?version=3.1.1 in the URL)",
    133: "the broker does not accept this client id",
    134: "check the user name and password in the broker URL",
    135: "check the user name and password in the broker URL (Mosquitto answers a wrong "
    "password this way) and the broker's password file",
    138: "the broker has banned this client",
    140: "the broker wants another authentication method",
}
SESSION_TAKEN_OVER = 142  # MQTT 5 DISCONNECT: another connection used our client id
# Between attempts after an error that only a person can fix.
PERMANENT_RETRY_S = 60.0


class BrokerURL(NamedTuple):
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    mqtt5: bool = True

    @classmethod
    def parse_list(cls, text: str) -> Brokers:
        """The brokers of --broker / OPSBAY_BROKER: one URL, or several separated by commas
        (`mqtt://a:1883,mqtt://b:1883`), tried in this order. A comma splits the value only
        where a URL starts after it (`,mqtt://`, `,mqtts://`, ...), so a password may hold one.
        Each entry is checked as `parse` checks one, the error naming the entry; all of them
        must speak the same MQTT version and agree on TLS (a process keeps one session, of
        one kind, wherever it is connected), and none may repeat another's host and port."""
        import re

        entries = re.split(r"\s*,\s*(?=(?:mqtts?|tcp|ssl)://)", text)
        if len(entries) == 1:
            return Brokers((cls.parse(text),))
        parsed = tuple(
            cls.parse(e, entry=f"entry {i} of {len(entries)}, ") for i, e in enumerate(entries, 1)
        )
        first = parsed[0]
        for i, b in enumerate(parsed[1:], 2):
            if (b.mqtt5, b.tls) != (first.mqtt5, first.tls):
                what = "MQTT version (?version=)" if b.mqtt5 != first.mqtt5 else "scheme"
                raise ConfigError(
                    f"--broker / OPSBAY_BROKER: entry {i}, {str(b)!r}, and entry 1, "
                    f"{str(first)!r}, differ in {what}: the brokers of a list speak one MQTT "
                    "version, all with TLS (mqtts://) or all without"
                )
            same = next((j for j, a in enumerate(parsed[: i - 1], 1) if a[:2] == b[:2]), None)
            if same is not None:
                raise ConfigError(
                    f"--broker / OPSBAY_BROKER: entry {i}, {str(b)!r}, is the broker of entry "
                    f"{same} again"
                )
        return Brokers(parsed)

    @classmethod
    def parse(cls, url: str, *, entry: str = "") -> BrokerURL:
        """The URL of --broker / OPSBAY_BROKER, or ConfigError (a setting: exit 78). The
        message shows the URL without its password: what stands between `://` and the last
        `@`, but the user name, is hidden; `entry` says which entry of a list it is."""
        import re

        head, sep, rest = url.partition("://")
        head, rest = (head + sep, rest) if sep else ("", url)
        userinfo, at, after = rest.rpartition("@")
        user, colon, secret = userinfo.partition(":")
        shown = f"{head}{user}{':***' if colon else ''}@{after}" if at else url
        # A password (or user) holding one of these cuts the URL short where it stands.
        hint = (
            "; if that comes from the password, percent-encode it: / ? # @ : % as "
            "%2F %3F %23 %40 %3A %25"
            if at and set(secret) & set("/?#@")
            else ""
        )
        if "," in after:
            hint += (
                "; for several brokers, give whole URLs, one comma between two: "
                "mqtt://a:1883,mqtt://b:1883"
            )

        def bad(problem: str) -> ConfigError:
            return ConfigError(f"--broker / OPSBAY_BROKER: {entry}{shown!r} {problem}{hint}")

        try:
            url.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"--broker / OPSBAY_BROKER: {entry or 'the URL '}is not valid UTF-8"
            ) from None
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed [ of an IPv6 address
            raise bad("is not a URL") from None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise bad("must look like mqtt://[user:pass@]host[:port] or mqtts://...")
        tls = parts.scheme in ("mqtts", "ssl")
        if parts.path not in ("", "/") or parts.fragment or "#" in url:
            raise bad("has a path or a # after the host; a broker URL has neither")
        try:
            port = parts.port
        except ValueError:
            raise bad("has a port that is not a number from 1 to 65535") from None
        if port == 0:
            raise bad(f"has port 0: give one from 1 to 65535, or none for {8883 if tls else 1883}")
        host = parts.hostname
        if not host:
            raise bad("has no host")
        if not re.fullmatch(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?", host):
            raise bad(
                "has a host that is not a DNS name or an IP address (for a name with other "
                "letters, give its ASCII form: xn--...)"
            )
        query = parse_qs(parts.query, keep_blank_values=True)
        version = query.pop("version", ["5"])[-1]
        if version not in ("5", "3.1.1") or query:
            raise bad("has an option other than ?version=5 or ?version=3.1.1")
        try:
            username = unquote(parts.username, errors="strict") if parts.username else None
            password = unquote(parts.password, errors="strict") if parts.password else None
        except UnicodeDecodeError:
            raise bad("has a user or password whose %-encoding is not UTF-8") from None
        return cls(
            host=host,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=username,
            password=password,
            mqtt5=version == "5",
        )

    def __str__(self) -> str:  # never shows the password
        from urllib.parse import quote

        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        version = "" if self.mqtt5 else "?version=3.1.1"
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}{version}"


class Brokers(tuple[BrokerURL, ...]):
    """The brokers to try, in order (`BrokerURL.parse_list`); shown as they were given, the
    passwords left out."""

    __slots__ = ()

    def __str__(self) -> str:
        return ",".join(str(b) for b in self)


def disconnect_reason(flags: Any, rc: Any) -> str:
    """Why a connection ended, in words: paho reports a closed socket as 'Unspecified error'."""
    if getattr(flags, "is_disconnect_packet_from_server", False):
        if getattr(rc, "value", None) == SESSION_TAKEN_OVER:
            return (
                f"the broker says another connection took over this session ({rc}): is "
                "another process running with the same client id?"
            )
        return f"the broker disconnected us: {rc}"
    if getattr(rc, "value", 0) == 0:
        return "closed"
    return (
        "the connection was closed by the broker or the network (the broker restarted, "
        "or another client connected with the same client id)"
    )


class TlsFiles(NamedTuple):
    """CA bundle (default: the system's) and an optional client certificate for mqtts://."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Will(NamedTuple):
    topic: str
    payload: bytes
    delay_s: int = 0


class Connection:
    """One MQTT connection, without paho's network thread: the thread that uses it drives it
    with `receive()` (or `pump()`), which reads into `inbox`, keeps it alive and reconnects when
    it is lost; whatever any thread publishes is written at once, under a lock. No message is
    handed between threads on its way in or out.

    `url` is one broker or a list of them (`BrokerURL.parse_list`): a failed attempt or a lost
    connection moves on to the next of the list, and only a whole round of failed attempts
    waits the backoff; `self.url` is the broker in use or being tried.
    """

    def __init__(
        self,
        *,
        url: BrokerURL | Sequence[BrokerURL],
        client_id: str,
        inbox: queue.Queue[Inbound] | None = None,
        persistent: bool = False,
        will: Callable[[], Will] | None = None,
        manual_ack: bool = False,
        tls: TlsFiles | None = None,
        keepalive_s: int = 30,
        receive_max: int | None = None,
        on_refused: Callable[[BrokerRefused], None] | None = None,
        log_refusals: bool = True,
    ) -> None:
        self.brokers = Brokers((url,)) if isinstance(url, BrokerURL) else Brokers(url)
        if not self.brokers:
            raise ValueError("Connection: no broker to connect to")
        self._index = 0  # of the broker in use in the list
        self.url = url = self.brokers[0]
        self._retry_at = 0.0  # when to try to reconnect next
        self._retry_delay = 1.0
        self._tries = 0  # reconnection attempts since the connection was lost
        self._permanent_streak = 0  # of those, how many in a row a person must fix
        self._idle = threading.Event()  # waited on between reconnection attempts; set by close
        # paho writes from the thread that publishes: one thread at a time.
        self._io = threading.RLock()
        # A write the socket could not take at once (a full buffer) wakes `pump`.
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.client_id = client_id
        self.inbox: queue.Queue[Inbound] = inbox if inbox is not None else queue.Queue()
        self.persistent = persistent
        self._subscriptions: list[tuple[str, int]] = []
        self._connected = threading.Event()
        self._ever_connected = False
        self._closing = False
        self._connect_error: str | None = None
        self._acked_mids: set[int] = set()
        # What the broker refused (MQTT 5 PUBACK / SUBACK failure codes), by packet id, and the
        # topic of every QoS 1 publish until its PUBACK, to name it when refused.
        self._in_flight: dict[int, str] = {}
        self._refused_mids: dict[int, BrokerRefused] = {}
        self._sub_topics: dict[int, list[str]] = {}
        self._resubscribed = -1  # packet id of the last re-subscription after a reconnect
        self.on_refused = on_refused
        self.log_refusals = log_refusals  # False: the caller raises them (the CLI)
        self.permanent_error = False  # the last attempt failed for a reason only a person fixes
        # False: once lost, the connection stays down (a worker stepping down).
        self.reconnect = True
        self.keepalive_s = keepalive_s
        # MQTT 5: how many unacknowledged QoS 1 messages the broker may send us at once
        # (Mosquitto's default is 20, which caps a busy coordinator's batches).
        self.receive_max = receive_max
        self.reconnects = 0
        if url.mqtt5:
            c = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=MQTTProtocolVersion.MQTTv5,
            )
        else:  # MQTT 3.1.1: no properties, so no session expiry, will delay or message expiry
            c = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=MQTTProtocolVersion.MQTTv311,
                clean_session=not persistent,
            )
        if url.username:
            c.username_pw_set(url.username, url.password)
        if url.tls:
            t = tls or TlsFiles()
            try:
                c.tls_set(
                    ca_certs=t.ca_file,
                    certfile=t.cert_file,
                    keyfile=t.key_file,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (OSError, ssl.SSLError) as e:
                named = ", ".join(
                    f"{setting} {path}"
                    for setting, path in (
                        ("--ca-file / OPSBAY_CA_FILE", t.ca_file),
                        ("--client-cert / OPSBAY_CLIENT_CERT", t.cert_file),
                        ("--client-key / OPSBAY_CLIENT_KEY", t.key_file),
                    )
                    if path
                )
                raise ConfigError(
                    f"{named or 'the TLS files'}: not usable ({e}); PEM files are expected"
                ) from e
        self._will = will
        self._will_topic = ""  # of the last attempt
        self.manual_ack = manual_ack
        c.manual_ack_set(manual_ack)
        c.on_pre_connect = self._on_pre_connect
        c.on_socket_open = self._on_socket_open
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        self._client = c

    # -- paho callbacks: convert and enqueue only
    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        # The Will is made afresh for every attempt, so it can name the connection it belongs to.
        if self._will is None:
            return
        will = self._will()
        self._will_topic = will.topic
        props = None
        if will.delay_s and self.url.mqtt5:
            props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            props.WillDelayInterval = will.delay_s
        client.will_set(will.topic, will.payload, qos=1, retain=True, properties=props)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # Nagle turns a QoS 1 round trip from 0.3 ms into 40-90 ms.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            hint = PERMANENT_CONNACK.get(rc.value)
            self.permanent_error = hint is not None
            self._connect_error = f"broker {self.url} refused the connection: {rc}" + (
                f"; {hint}" if hint else ""
            )
            return
        self.permanent_error = False
        if self._subscriptions:
            _, resubscribed = client.subscribe(self._subscriptions)
            if resubscribed is not None:
                self._sub_topics[resubscribed] = [t for t, _ in self._subscriptions]
                self._resubscribed = resubscribed
        self._connect_error = None
        self._retry_delay = 1.0
        self._tries = self._permanent_streak = 0
        self._connected.set()
        if self._ever_connected:
            log.info("%s: reconnected to %s", self.client_id, self.url)
            self.inbox.put(Inbound(CONNECTED, b""))
        self._ever_connected = True

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not self._ever_connected and not self._closing and self._connect_error is None:
            # Closed before the broker accepted us: with TLS 1.3 this is how a listener that
            # requires a client certificate says no; without TLS, how a TLS port answers.
            hint = (
                "does it require a client certificate (--client-cert, --client-key)?"
                if self.url.tls
                else "is it a TLS port? Then the URL starts with mqtts://"
            )
            if set(self._will_topic) & {".", " "}:
                hint += (
                    f" Or does it refuse the Will's topic {self._will_topic!r}? NATS's MQTT "
                    "gateway refuses a ' ' in a topic, and releases before mid-2023 a '.'"
                )
            self._connect_error = (
                f"broker {self.url} closed the connection before accepting it ({rc}); {hint}"
            )
        if self._connected.is_set() and not self._closing:
            self.reconnects += 1
            why = disconnect_reason(flags, rc)
            log.warning("%s: disconnected from %s: %s", self.client_id, self.url, why)
        self._connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.inbox.put(Inbound(msg.topic, msg.payload, bool(msg.retain), msg.mid, msg.qos))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        topics = self._sub_topics.pop(mid, [])
        for topic, code in zip(topics, rcs, strict=False):
            # MQTT 3.1.1 says no with 0x80, MQTT 5 with any code of 0x80 or more.
            value = getattr(code, "value", code)
            if value >= 0x80:
                name = getattr(code, "getName", lambda: "Failure")()
                self._refuse(
                    mid,
                    BrokerRefused(
                        action="read", topic=topic, reason=name, code=value, login=self.url.username
                    ),
                )
        self._acked_mids.add(mid)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        topic = self._in_flight.pop(mid, None)
        if topic is not None and getattr(rc, "is_failure", False):
            self._refuse(
                mid,
                BrokerRefused(
                    action="publish to",
                    topic=topic,
                    reason=rc.getName(),
                    code=rc.value,
                    login=self.url.username,
                ),
            )

    def _refuse(self, mid: int, refused: BrokerRefused) -> None:
        log.log(
            logging.ERROR if self.log_refusals else logging.DEBUG, "%s: %s", self.client_id, refused
        )
        self._refused_mids[mid] = refused
        if len(self._refused_mids) > 100:  # nobody asked about the oldest: forget it
            self._refused_mids.pop(next(iter(self._refused_mids)))
        if self.on_refused is not None:
            self.on_refused(refused)

    # -- API
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def connect(
        self, timeout_s: float = 10.0, retry: bool = False, stop: threading.Event | None = None
    ) -> bool:
        """Connect and wait for the broker's CONNACK; raise `BrokerError` saying why not.

        With `retry` (the daemons), keep trying instead: 0.5 s doubling to 30 s while the broker
        cannot be reached, and every 60 s, logged as an error with what to fix, while it refuses
        us for a reason only a person can fix (credentials, a certificate). Returns False, at
        once, when `stop` is set meanwhile.

        With a list of brokers, each round tries every one in turn, from the first; the delays
        come between rounds, and the error of a round names every broker and why it failed."""
        stop = stop or threading.Event()
        delay = 0.5
        n = len(self.brokers)
        while not stop.is_set():
            errors: list[str] = []
            permanent = True
            for _ in range(n):
                error, refused = self._attempt(timeout_s)
                if error is None:
                    return True
                errors.append(error)
                permanent = permanent and refused
                if n > 1:
                    self._use(self._index + 1)
                    if retry:
                        log.log(
                            logging.ERROR if refused else logging.WARNING,
                            "%s: %s",
                            self.client_id,
                            error,
                        )
                if stop.is_set():
                    return False
            error = errors[0] if n == 1 else f"no broker of {self.brokers} accepted the connection"
            if not retry:
                self.close()
                raise BrokerError(error if n == 1 else f"{error}: {'; '.join(errors)}")
            if permanent:
                log.error("%s: %s; trying again in %g s", self.client_id, error, PERMANENT_RETRY_S)
                stop.wait(PERMANENT_RETRY_S)
            else:
                log.warning("%s: %s; trying again in %.1f s", self.client_id, error, delay)
                stop.wait(delay)
                delay = min(delay * 2, 30.0)
        return False

    def _use(self, index: int) -> None:
        """Make broker `index` (modulo the list) the one the next attempt goes to."""
        self._index = index % len(self.brokers)
        self.url = self.brokers[self._index]
        with self._io:
            self._client.username_pw_set(self.url.username, self.url.password)

    def _connect_options(self) -> dict[str, Any]:
        if not self.url.mqtt5:
            return {}
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S if self.persistent else 0
        if self.receive_max is not None:
            props.ReceiveMaximum = self.receive_max
        return {"clean_start": not self.persistent, "properties": props}

    def _unverified(self, e: ssl.SSLCertVerificationError) -> str:
        return (
            f"the certificate of broker {self.url} does not verify ({e}); give the CA that "
            "signed it with --ca-file / OPSBAY_CA_FILE, and make sure the certificate names "
            "this host"
        )

    def _attempt(self, timeout_s: float) -> tuple[str | None, bool]:
        """One connection attempt: (None, _) once connected, else (why not, is it permanent)."""
        self._connect_error = None
        try:
            self._client.connect(
                self.url.host, self.url.port, keepalive=self.keepalive_s, **self._connect_options()
            )
        except ssl.SSLCertVerificationError as e:
            return self._unverified(e), True
        except (OSError, ssl.SSLError) as e:
            return f"cannot reach broker {self.url}: {e}", False
        deadline = time.monotonic() + timeout_s
        while not self._connected.is_set():
            self.pump(0.05)
            if self._connect_error:
                with self._io, contextlib.suppress(Exception):
                    self._client.disconnect()
                return self._connect_error, self.permanent_error
            if time.monotonic() > deadline:
                with self._io, contextlib.suppress(Exception):
                    self._client.disconnect()
                return f"no answer from broker {self.url} within {timeout_s:g} s", False
        return None, False

    def subscribe(
        self, topics: list[tuple[str, int]], timeout_s: float = 10.0, wait: bool = True
    ) -> None:
        """Subscribe (and again after every reconnect); wait for the broker's SUBACK unless
        `wait` is false: a broker handles one connection's packets in order, so a publish sent
        after the SUBSCRIBE is routed after the subscription exists."""
        deadline = time.monotonic() + timeout_s
        while not self._connected.is_set() and time.monotonic() < deadline:
            # Lost (a broker restart): nothing reconnects but this thread, so do it first.
            self.pump(min(0.05, deadline - time.monotonic()))
        self._subscriptions.extend(t for t in topics if t not in self._subscriptions)
        with self._io:
            rc, mid = self._client.subscribe(topics)
            if mid is not None:
                self._sub_topics[mid] = [t for t, _ in topics]
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"subscribe failed: {mqtt.error_string(rc)}")
        if not wait:
            return
        before = self._resubscribed
        while mid not in self._acked_mids:
            if self._resubscribed != before and self._resubscribed in self._acked_mids:
                # Reconnected meanwhile: the re-subscription (every topic, these included)
                # was acknowledged instead; the first SUBACK will never come.
                mid = self._resubscribed
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"no SUBACK from broker {self.url} within {timeout_s:g} s "
                    f"(subscribing to {', '.join(t for t, _ in topics)})"
                )
            self.pump(min(left, 0.05))
        self._acked_mids.discard(mid)
        refused = self._refused_mids.pop(mid, None)
        if refused is not None:
            raise refused

    def check_refused(self) -> None:
        """Raise the first refusal nobody has asked about yet (a subscribe sent without waiting)."""
        if self._refused_mids:
            raise self._refused_mids.pop(next(iter(self._refused_mids)))

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> mqtt.MQTTMessageInfo:
        props = None
        if expiry_s is not None and self.url.mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = max(1, int(expiry_s))
        with self._io:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self._in_flight[info.mid] = topic
                if len(self._in_flight) > 100_000:  # never acknowledged (a lost clean session)
                    self._in_flight.pop(next(iter(self._in_flight)))
        self._wake_if_unwritten()
        return info

    def publish_wait(
        self, topic: str, payload: bytes, *, timeout_s: float = 10.0, retain: bool = False
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        self.wait_published(self.publish(topic, payload, retain=retain), topic, timeout_s)

    def wait_published(self, info: mqtt.MQTTMessageInfo, topic: str, timeout_s: float) -> None:
        """Wait for the PUBACK of a QoS 1 publish (sent again on reconnection, if need be)."""
        deadline = time.monotonic() + timeout_s
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        # Published while disconnected (NO_CONN), paho keeps it and sends it on reconnection,
        # but its is_published() then raises: wait for the PUBACK as `_in_flight` sees it.
        while info.mid in self._in_flight and time.monotonic() < deadline:
            self.pump(min(0.05, deadline - time.monotonic()))
        if info.mid in self._in_flight:
            raise BrokerError(f"broker {self.url} did not acknowledge a publish to {topic}")
        refused = self._refused_mids.pop(info.mid, None)
        if refused is not None:
            raise refused

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a message received with `manual_ack`, once it is safely handled."""
        if self.manual_ack and msg.qos > 0 and msg.topic != CONNECTED:
            with self._io:
                self._client.ack(msg.mid, msg.qos)
            self._wake_if_unwritten()

    def _wake_if_unwritten(self) -> None:
        if self._client.want_write():
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"w")

    def close(self) -> None:
        """Disconnect cleanly, after queued QoS 1 publishes have gone out (bounded)."""
        self._closing = True
        self._idle.set()
        try:
            with self._io:
                self._client.disconnect()
            deadline = time.monotonic() + 2.0  # what the socket did not take at once (bounded)
            while self._client.want_write() and time.monotonic() < deadline:
                with self._io:
                    if self._client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                        break
                self._wait_writable(deadline - time.monotonic())
        finally:
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        self._connected.clear()

    # -- driving the connection
    def receive(self, timeout_s: float, most: int) -> list[Inbound]:
        """Up to `most` received messages, waiting up to `timeout_s` for the first one."""
        self.pump(0.0 if self.inbox.qsize() else timeout_s, most)
        batch: list[Inbound] = []
        with contextlib.suppress(queue.Empty):
            while len(batch) < most:
                batch.append(self.inbox.get_nowait())
        return batch

    def pump(self, timeout_s: float, most: int = 1000) -> None:
        """Wait up to `timeout_s` for the broker, read what has come (into `inbox`, up to about
        `most` messages), write what is queued, keep the connection alive, and when it is lost,
        reconnect with a growing delay (1 s to 30 s)."""
        c = self._client
        sock = c.socket()
        if sock is None:
            self._reconnect(timeout_s)
            return
        pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted, not polled
        if pending is not None and pending():
            readable = True
        else:
            waiting = select.poll()
            try:
                waiting.register(sock, select.POLLIN | (select.POLLOUT if c.want_write() else 0))
            except (ValueError, OSError):  # closed by another thread's failed write
                return
            waiting.register(self._wake_r, select.POLLIN)
            ready = dict(waiting.poll(max(0, int(timeout_s * 1000))))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
            readable = bool(ready.get(sock.fileno(), 0) & ~select.POLLOUT)
        rc = mqtt.MQTT_ERR_SUCCESS
        with self._io:
            # Another thread's publish may have failed and closed the socket meanwhile.
            if c.socket() is not sock or sock.fileno() < 0:
                return
            reading = select.poll()
            reading.register(sock, select.POLLIN)
            for _ in range(most):  # loop_read reads a few packets a time: on while more waits
                if not readable:
                    break
                rc = c.loop_read()
                if rc != mqtt.MQTT_ERR_SUCCESS or c.socket() is None:
                    break
                if self.inbox.qsize() >= most:
                    break
                readable = bool(reading.poll(0)) or (pending is not None and pending() > 0)
            if rc == mqtt.MQTT_ERR_SUCCESS and c.want_write():
                rc = c.loop_write()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                c.loop_misc()

    def _reconnect(self, timeout_s: float) -> None:
        """One attempt to get the lost connection back, when it is due. With a list, every
        attempt goes to the next broker (the first to the one after the broker lost), at once,
        and the growing delay comes after each whole round of the list."""
        if self._closing or not self.reconnect:
            self._idle.wait(timeout_s)
            return
        now = time.monotonic()
        if now < self._retry_at:
            self._idle.wait(min(timeout_s, self._retry_at - now))
            return
        n = len(self.brokers)
        if self._tries:  # the previous attempt failed: how
            self._permanent_streak = self._permanent_streak + 1 if self.permanent_error else 0
            if n > 1 and self._connect_error and not self.permanent_error:
                log.warning("%s: %s", self.client_id, self._connect_error)
        if n > 1:
            self._use(self._index + 1)
        self._tries += 1
        if self._tries % n:
            self._retry_at = now  # the rest of the round at once
        else:
            # Jittered (50-100 % of the delay): clients that lost the broker together, or two
            # that take one session from each other, do not come back in step.
            self._retry_at = now + self._retry_delay * (0.5 + os.urandom(1)[0] / 510)
            self._retry_delay = min(self._retry_delay * 2, 30.0)
            if self._permanent_streak >= n:  # credentials or a certificate: a person must act
                self._retry_at = now + PERMANENT_RETRY_S
                log.error(
                    "%s: %s; trying again in %g s",
                    self.client_id,
                    self._connect_error if n == 1 else f"no broker of {self.brokers} accepts us",
                    PERMANENT_RETRY_S,
                )
        self.permanent_error, self._connect_error = False, None
        try:
            with self._io:
                if n == 1:
                    self._client.reconnect()
                else:
                    self._client.connect(
                        self.url.host,
                        self.url.port,
                        keepalive=self.keepalive_s,
                        **self._connect_options(),
                    )
        except ssl.SSLCertVerificationError as e:  # as a refused login: a person must act
            self.permanent_error, self._connect_error = True, self._unverified(e)
            log.error("%s: %s", self.client_id, self._connect_error)
        except (OSError, ssl.SSLError) as e:
            then = "retrying" if n == 1 else f"trying {self.brokers[(self._index + 1) % n]} next"
            log.warning("%s: cannot reach broker %s (%s); %s", self.client_id, self.url, e, then)

    def _wait_writable(self, timeout_s: float) -> None:
        sock = self._client.socket()
        if sock is not None and timeout_s > 0:
            poll = select.poll()
            poll.register(sock, select.POLLOUT)
            poll.poll(int(timeout_s * 1000))
