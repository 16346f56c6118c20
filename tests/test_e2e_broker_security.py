"""The broker enforces its part: the shipped `mosquitto/production.conf` and `acl.example` on a
real Mosquitto of this module's own, checked by what plain MQTT clients can and cannot do, and a
whole bus (coordinator, worker, CLI) running under them over TLS."""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from opsbay_mqtt.cli.stack import find_mosquitto, wait_for_port
from tests.conftest import free_port
from tests.helpers import Broker, Bus, stop_process, wait_until

SHIPPED = Path(__file__).resolve().parent.parent / "mosquitto"
PREFIX = "opsbay"  # acl.example grants topics under this prefix only
# production.conf gives the daemons (coordinator, nodes) one password file and listeners where
# a login's client id is its username, and clients and watchers another. "+" is no opsbay user:
# it checks that the ACL's `pattern` lines cannot be turned into wildcards. "probe" is a
# test-only login with the coordinator's rights (its own ACL block, appended to a copy of
# acl.example), to publish probes without taking over the session of a running coordinator.
DAEMON_USERS = ("coordinator", "web-01", "web-02", "probe", "+")
CLIENT_USERS = ("ci", "watcher", "+")
USERS = (*DAEMON_USERS, *CLIENT_USERS[:-1])
PROBE_ACL = "\n# test only\nuser probe\ntopic readwrite opsbay/#\n"
NOT_AUTHORIZED = 135  # MQTT 5 reason code of a refused login or a denied publish
WAIT_S = 10


def run(*argv: str, cwd: Path) -> None:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{argv[:3]} failed: {out.stderr}"


def make_pki(d: Path) -> None:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=opsbay test CA", cwd=d)  # fmt: skip
    for name, cn, ext in (
        ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
         "extendedKeyUsage=serverAuth\n"),
        ("client", "ci", "extendedKeyUsage=clientAuth\n"),
    ):  # fmt: skip
        (d / f"{name}.ext").write_text(ext)
        run("openssl", "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d)  # fmt: skip


def replace_line(text: str, old: str, new: str) -> str:
    """Replace the one line `old`; fail if the shipped config no longer has exactly one."""
    out, n = re.subn(rf"^{re.escape(old)}$", new, text, flags=re.MULTILINE)
    assert n == 1, f"production.conf: expected one line {old!r}, found {n}"
    return out


@dataclass(frozen=True)
class Ports:
    plain: int  # the daemons' loopback listener (1883)
    tls: int  # the daemons' TLS listener (8883)
    clients: int  # the clients' TLS listener (8884)
    clients_plain: int  # test-only: the clients' logins without TLS, for plain MQTT peers
    mtls: int  # test-only: the clients' logins, TLS with a client certificate required

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())

    def all(self) -> tuple[int, ...]:
        return (self.plain, self.tls, self.clients, self.clients_plain, self.mtls)


def production_config(d: Path, ports: Ports) -> str:
    """production.conf with its files in `d`, its three listeners moved to free loopback ports,
    and two test-only listeners for the clients' logins: plain, and TLS with a client
    certificate required."""
    text = (SHIPPED / "production.conf").read_text(encoding="utf-8")
    text = text.replace("/etc/mosquitto/opsbay/", f"{d}/").replace(
        "/var/lib/mosquitto/", f"{d}/data/"
    )
    text = replace_line(text, "listener 1883 127.0.0.1", f"listener {ports.plain} 127.0.0.1")
    text = replace_line(text, "listener 8883", f"listener {ports.tls} 127.0.0.1")
    text = replace_line(text, "listener 8884", f"listener {ports.clients} 127.0.0.1")
    settings = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert not [ln for ln in settings if "/etc/" in ln or "/var/" in ln], settings
    # Started as root, Mosquitto drops to user `mosquitto` before reading passwd, acl and the key,
    # and pytest's tmp dirs are 0700 root: chowning the files would not be enough, every parent
    # would need opening too. The file has no `user` line (a second one is fatal), so append ours;
    # for a non-root user it has no effect. What the test loses: the file modes of production.
    text += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
    clients = f"allow_anonymous false\npassword_file {d}/passwd-clients\nacl_file {d}/acl\n"
    text += f"\nlistener {ports.clients_plain} 127.0.0.1\n{clients}"
    # This one differs from the shipped clients' listener only by asking for a certificate.
    text += (
        f"\nlistener {ports.mtls} 127.0.0.1\n{clients}"
        f"cafile {d}/ca.crt\ncertfile {d}/server.crt\nkeyfile {d}/server.key\n"
        "tls_version tlsv1.2\nrequire_certificate true\n"
    )
    return text


def write_logins(d: Path, passwords: dict[str, str]) -> None:
    """The two password files (daemons, clients) and a copy of acl.example (+ `probe`)."""
    for name, users in (("passwd-daemons", DAEMON_USERS), ("passwd-clients", CLIENT_USERS)):
        for i, user in enumerate(u for u in users if u in passwords):
            create = ("-c",) if i == 0 else ()
            run("mosquitto_passwd", *create, "-b", str(d / name), user, passwords[user], cwd=d)
    (d / "acl").write_text((SHIPPED / "acl.example").read_text() + PROBE_ACL)


@dataclass(frozen=True)
class SecureBroker:
    """Mosquitto running production.conf + acl.example; passwords and PKI in `dir`."""

    broker: Broker
    dir: Path
    ports: Ports
    passwords: dict[str, str]

    @property
    def plain_port(self) -> int:
        return self.ports.plain

    @property
    def tls_port(self) -> int:
        return self.ports.tls

    @property
    def client_port(self) -> int:
        return self.ports.clients

    @property
    def mtls_port(self) -> int:
        return self.ports.mtls

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def tls_port_of(self, user: str) -> int:
        return self.ports.tls if user in DAEMON_USERS else self.ports.clients

    def plain_port_of(self, user: str) -> int:
        return self.ports.plain if user in DAEMON_USERS else self.ports.clients_plain

    def url(self, user: str, port: int | None = None) -> str:
        port = port or self.tls_port_of(user)
        return f"mqtts://{user}:{self.passwords[user]}@localhost:{port}"


@contextmanager
def production_broker(d: Path, users: Iterable[str]) -> Iterator[SecureBroker]:
    """Mosquitto on production.conf in `d` (which holds the PKI), a login for each user."""
    (d / "data").mkdir()
    passwords = {u: secrets.token_urlsafe(12) for u in users}
    write_logins(d, passwords)
    ports = Ports.free()
    conf = d / "mosquitto.conf"
    conf.write_text(production_config(d, ports), encoding="utf-8")
    log = d / "mosquitto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [find_mosquitto(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        for port in ports.all():
            wait_for_port(port, 10, proc)
        broker = Broker(port=ports.plain, process=proc, conf=conf, log=log)
        yield SecureBroker(broker, d, ports, passwords=passwords)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    d = tmp_path_factory.mktemp("secure-broker")
    make_pki(d)
    with production_broker(d, {*DAEMON_USERS, *CLIENT_USERS}) as b:
        yield b


class Peer:
    """A plain paho MQTT 5 client (no opsbay code) logged in as one user (TLS if given a CA): its
    CONNACK, SUBACK and PUBACK reason codes and every message it receives."""

    def __init__(
        self, port: int, user: str | None, password: str | None = None, ca: Path | None = None
    ) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._acks: dict[int, list[ReasonCode]] = {}
        self._acked = threading.Condition()
        self._connack = threading.Event()
        self.connack: ReasonCode | None = None
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"opsbay-peer-{user}-{uuid.uuid4().hex[:8]}",  # clientid_prefixes
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if user is not None:
            c.username_pw_set(user, password)
        if ca is not None:
            c.tls_set(ca_certs=str(ca))
        c.on_connect = self._on_connect
        c.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload)))
        c.on_subscribe = lambda c, u, mid, rcs, p: self._ack(mid, list(rcs))
        c.on_publish = lambda c, u, mid, rc, p: self._ack(mid, [rc])
        self.client = c
        c.connect("localhost" if ca else "127.0.0.1", port)
        c.loop_start()
        assert self._connack.wait(WAIT_S), f"no CONNACK for {user}"

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.connack = rc
        self._connack.set()
        if rc.is_failure:
            c.disconnect()  # or paho's loop would keep retrying with the refused login

    def _ack(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._acked:
            self._acks[mid] = codes
            self._acked.notify_all()

    def _wait_ack(self, mid: int, what: str) -> list[ReasonCode]:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._acks, WAIT_S), f"no {what}"
            return self._acks.pop(mid)

    def subscribe(self, topic: str) -> ReasonCode:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None, f"could not send SUBSCRIBE for {topic}"
        return self._wait_ack(mid, f"SUBACK for {topic}")[0]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code. Mosquitto handles one packet at
        a time and routes a publish before it acknowledges it, so anything published after this
        returns reaches each subscriber after this message (if this one reaches it at all)."""
        info = self.client.publish(topic, payload, qos=1)
        return self._wait_ack(info.mid, f"PUBACK for {topic}")[0]

    def wait_for(self, topic: str, payload: bytes) -> None:
        wait_until(lambda: (topic, payload) in self.received, WAIT_S, f"{payload!r} on {topic}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(secure: SecureBroker) -> Iterator[Callable[[str], Peer]]:
    """`peers(user)`: a connected Peer on the plain listener, closed after the test."""
    made: list[Peer] = []

    def connect(user: str) -> Peer:
        p = Peer(secure.plain_port_of(user), user, secure.passwords[user])
        made.append(p)
        assert p.connack is not None and not p.connack.is_failure, f"{user}: {p.connack}"
        return p

    yield connect
    for p in made:
        p.close()


def token() -> bytes:
    return f"probe-{uuid.uuid4()}".encode()


def concrete(topic: str) -> str:
    return topic.format(job=uuid.uuid4(), reply=f"c{uuid.uuid4().hex[:16]}")


# What each user may publish: (user, topic, delivered). `{job}` is a fresh job id.
WRITES = [
    ("web-01", "opsbay/results/web-01/{job}", True),
    ("web-01", "opsbay/output/web-01/{job}", True),
    ("web-01", "opsbay/nodes/web-01/info", True),
    ("web-01", "opsbay/nodes/web-01/status", True),
    ("web-01", "opsbay/results/web-02/{job}", False),
    ("web-01", "opsbay/output/web-02/{job}", False),
    ("web-01", "opsbay/nodes/web-02/info", False),
    ("web-01", "opsbay/nodes/web-02/status", False),
    ("web-01", "opsbay/nodes/web-01/jobs", False),  # a node cannot dispatch, not even to itself
    ("web-01", "opsbay/submit", False),
    ("web-01", "opsbay/jobs/{job}", False),
    ("watcher", "opsbay/submit", False),
    ("watcher", "opsbay/nodes/web-01/jobs", False),
    ("watcher", "opsbay/rpc/request", False),
    ("watcher", "opsbay/nodes/web-01/status", False),
    # The node `pattern` lines would let a user pass for a node of its own name: denied.
    ("watcher", "opsbay/nodes/watcher/status", False),
    ("watcher", "opsbay/nodes/watcher/info", False),
    ("watcher", "opsbay/results/watcher/{job}", False),
    ("ci", "opsbay/nodes/ci/status", False),
    ("ci", "opsbay/results/ci/{job}", False),
    ("ci", "opsbay/submit", True),
    ("ci", "opsbay/rpc/request", True),
    ("ci", "opsbay/nodes/web-01/jobs", False),  # clients go through the coordinator
    ("ci", "opsbay/jobs/{job}", False),
    ("ci", "opsbay/results/web-01/{job}", False),
    ("ci", "opsbay/rpc/reply/{reply}", False),
    ("+", "opsbay/nodes/web-01/status", False),  # `pattern ... %u` with %u = "+"
    ("+", "opsbay/results/web-01/{job}", False),
    ("coordinator", "opsbay/nodes/web-02/jobs", True),
    ("coordinator", "opsbay/jobs/{job}", True),
]


@pytest.mark.parametrize(("user", "topic", "delivered"), WRITES)
def test_what_a_user_publishes_reaches_a_watcher_only_where_the_acl_allows(
    peers: Callable[[str], Peer], user: str, topic: str, delivered: bool
) -> None:
    topic = concrete(topic)
    watcher = peers("watcher")
    assert not watcher.subscribe("opsbay/#").is_failure
    probe = token()
    ack = peers(user).publish(topic, probe)
    # Published after that PUBACK, so it reaches the watcher after the probe (if the probe does).
    control = token()
    peers("probe").publish("opsbay/control", control)
    watcher.wait_for("opsbay/control", control)
    assert ((topic, probe) in watcher.received) is delivered, watcher.received
    if delivered:
        assert not ack.is_failure, ack
    else:  # MQTT 5 says so; MQTT 3.1.1 publishers get a plain PUBACK (acl.example, README)
        assert ack.value == NOT_AUTHORIZED, ack


# What each user receives through a subscription to `opsbay/#`: (user, topic, delivered).
READS = [
    ("web-01", "opsbay/nodes/web-01/jobs", True),
    ("web-01", "opsbay/nodes/web-02/jobs", False),
    ("web-01", "opsbay/nodes/web-02/info", False),
    ("web-01", "opsbay/results/web-02/{job}", False),
    ("web-01", "opsbay/submit", False),
    ("web-01", "opsbay/jobs/{job}", False),
    ("watcher", "opsbay/submit", True),
    ("watcher", "opsbay/nodes/web-01/jobs", True),
    ("watcher", "opsbay/rpc/request", True),
    ("ci", "opsbay/jobs/{job}", True),
    ("ci", "opsbay/rpc/reply/{reply}", True),
    ("ci", "opsbay/results/web-01/{job}", True),
    ("ci", "opsbay/nodes/web-01/jobs", True),  # documented: clients see every dispatch
    ("ci", "opsbay/submit", False),  # other clients' submissions
    ("ci", "opsbay/rpc/request", False),
]
# A topic each reader may read, for the control message that ends the wait.
READABLE = {
    "web-01": "opsbay/nodes/web-01/jobs",
    "watcher": "opsbay/control",
    "ci": "opsbay/jobs/{job}",
}


@pytest.mark.parametrize(("user", "topic", "delivered"), READS)
def test_a_wildcard_subscriber_receives_only_what_the_acl_lets_it_read(
    peers: Callable[[str], Peer], user: str, topic: str, delivered: bool
) -> None:
    topic = concrete(topic)
    reader = peers(user)
    # The subscription itself is granted: reads are checked message by message.
    assert not reader.subscribe("opsbay/#").is_failure
    coordinator = peers("probe")
    probe, control, control_topic = token(), token(), concrete(READABLE[user])
    assert not coordinator.publish(topic, probe).is_failure
    assert not coordinator.publish(control_topic, control).is_failure
    reader.wait_for(control_topic, control)
    assert ((topic, probe) in reader.received) is delivered, reader.received


# Logins the broker must refuse: (user, its password given all the real ones).
BAD_LOGINS: dict[str, tuple[str | None, Callable[[dict[str, str]], str | None]]] = {
    "anonymous": (None, lambda pw: None),
    "wrong-password": ("ci", lambda pw: "wrong"),
    "unknown-user": ("nobody", lambda pw: "x"),
    "another-users-password": ("web-02", lambda pw: pw["web-01"]),
}


@pytest.mark.parametrize("listener", ["plain", "tls"])
@pytest.mark.parametrize("case", BAD_LOGINS)
def test_the_broker_refuses_a_client_without_a_valid_login(
    secure: SecureBroker, listener: str, case: str
) -> None:
    user, password_of = BAD_LOGINS[case]
    password = password_of(secure.passwords)
    if listener == "plain":
        p = Peer(secure.plain_port_of(user or "ci"), user, password)
    else:
        p = Peer(secure.tls_port_of(user or "ci"), user, password, ca=secure.ca)
    try:
        assert p.connack is not None and p.connack.value == NOT_AUTHORIZED, p.connack
    finally:
        p.close()


@pytest.mark.parametrize("user", USERS)
def test_each_user_logs_in_with_its_own_password_over_tls(secure: SecureBroker, user: str) -> None:
    p = Peer(secure.tls_port_of(user), user, secure.passwords[user], ca=secure.ca)
    try:
        assert p.connack is not None and not p.connack.is_failure, p.connack
    finally:
        p.close()


# --- the real coordinator, worker and CLI over TLS, each with its own login ------------------


class Login(TypedDict):
    OPSBAY_BROKER: str
    OPSBAY_CA_FILE: str


def login(secure: SecureBroker, user: str, port: int | None = None) -> Login:
    return {"OPSBAY_BROKER": secure.url(user, port), "OPSBAY_CA_FILE": str(secure.ca)}


@pytest.fixture(scope="module")
def tls_bus(secure: SecureBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """Coordinator (user coordinator) and worker web-01 (user web-01) on the TLS listener."""
    bus = Bus(broker=secure.broker, tmp=tmp_path_factory.mktemp("tls-bus"), prefix=PREFIX)
    try:
        bus.coordinator(**login(secure, "coordinator"))
        bus.worker("web-01", **login(secure, "web-01"))
        yield bus
    finally:
        bus.stop()


def test_echo_hello_runs_over_tls_with_every_party_on_its_own_login(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    out = tls_bus.cli("submit", "-t", "web-01", "-c", "echo hello", "--wait", **login(secure, "ci"))
    assert (out.returncode, out.stdout) == (0, "hello\n"), out.stderr


def body_state(payload: bytes) -> str | None:
    body = json.loads(payload)
    return body.get("state") if isinstance(body, dict) else None


def test_a_workers_status_and_last_will_pass_the_acl_for_its_own_node(
    tls_bus: Bus, secure: SecureBroker, peers: Callable[[str], Peer]
) -> None:
    watcher = peers("watcher")
    assert not watcher.subscribe("opsbay/nodes/web-02/status").is_failure
    worker = tls_bus.worker("web-02", **login(secure, "web-02"))
    topic = "opsbay/nodes/web-02/status"
    wait_until(
        lambda: [p for t, p in watcher.received if t == topic and body_state(p) == "online"],
        WAIT_S,
        "web-02's retained online status",
    )
    worker.kill()  # no goodbye: only the broker's Last Will can say it is gone
    worker.wait(WAIT_S)
    wait_until(
        lambda: body_state(watcher.received[-1][1]) == "offline",
        WAIT_S,
        "web-02's Last Will (offline) after the worker was killed",
    )


def nodes_cli(tls_bus: Bus, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return tls_bus.cli("nodes", "--json", *args, timeout=WAIT_S + 20, **env)


def test_a_client_certificate_gets_the_cli_through_a_listener_that_requires_one(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    files = ("--ca-file", str(secure.ca), "--client-cert", str(secure.dir / "client.crt"))
    out = nodes_cli(
        tls_bus,
        *files,
        "--client-key",
        str(secure.dir / "client.key"),
        OPSBAY_BROKER=secure.url("ci", secure.mtls_port),
    )
    assert out.returncode == 0, out.stderr
    assert {n["node"]: n["state"] for n in json.loads(out.stdout)}.get("web-01") == "online"


def test_without_a_client_certificate_that_listener_refuses_the_cli_with_exit_69(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    log_from = secure.broker.log.stat().st_size
    out = nodes_cli(tls_bus, **login(secure, "ci", secure.mtls_port))
    assert out.returncode == 69, out.stderr
    # The broker, not the coordinator, is what failed, and the password is not shown.
    assert f"broker mqtts://ci@localhost:{secure.mtls_port}" in out.stderr, out.stderr
    with open(secure.broker.log, "rb") as f:
        f.seek(log_from)
        assert b"peer did not return a certificate" in f.read()


def test_the_cli_verifies_the_brokers_certificate(tls_bus: Bus, secure: SecureBroker) -> None:
    out = nodes_cli(tls_bus, OPSBAY_BROKER=secure.url("ci"))  # no CA file: the system's CAs
    assert out.returncode == 69, out.stderr
    assert "certificate verify failed" in out.stderr, out.stderr


def test_a_wrong_broker_password_makes_the_cli_exit_69(tls_bus: Bus, secure: SecureBroker) -> None:
    wrong = f"mqtts://ci:wrong-{secure.passwords['ci']}@localhost:{secure.client_port}"
    out = nodes_cli(tls_bus, OPSBAY_BROKER=wrong, OPSBAY_CA_FILE=str(secure.ca))
    assert out.returncode == 69, out.stderr
    assert "Not authorized" in out.stderr, out.stderr
    assert secure.passwords["ci"] not in out.stderr, "the CLI printed the broker password"


# --- a broker that says no is heard (issue 11, 5 and 6) ---------------------------------------


def test_a_login_that_may_not_submit_is_told_so_at_once_with_exit_77(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    out = tls_bus.cli("submit", "-t", "web-01", "-c", "true", "--wait", timeout=30,
                      **login(secure, "watcher"))  # fmt: skip
    assert out.returncode == 77, out.stderr
    assert "the broker refused to let login 'watcher' publish to opsbay/submit" in out.stderr
    assert "Not authorized" in out.stderr and "ACL" in out.stderr, out.stderr


def test_a_query_the_broker_refuses_is_not_blamed_on_the_coordinator(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    out = nodes_cli(tls_bus, **login(secure, "watcher"))
    assert out.returncode == 77, out.stderr
    assert "publish to opsbay/rpc/request" in out.stderr, out.stderr
    assert "coordinator" not in out.stderr, out.stderr


def test_a_schedule_change_the_broker_refuses_exits_77_and_is_not_said_to_be_pending(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    out = tls_bus.cli("schedule", "add", "nightly", "--cron", "@daily", "-t", "web-01",
                      "-c", "true", timeout=30, **login(secure, "watcher"))  # fmt: skip
    assert out.returncode == 77, out.stderr
    assert "refused to let login 'watcher' publish to opsbay/rpc/request" in out.stderr
    assert "may still be made" not in out.stderr, out.stderr


def test_a_worker_whose_login_is_not_its_node_name_stops_and_says_why(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    p = tls_bus.start("worker-mismatch", "worker", "--node", "web-01-new", "--state-dir",
                      str(tls_bus.tmp / "mismatch"), **login(secure, "web-02"))  # fmt: skip
    assert p.wait(30) == 78, tls_bus.log("worker-mismatch")
    said = tls_bus.log("worker-mismatch")
    assert "refused to let login 'web-02' publish to opsbay/nodes/web-01-new/" in said, said
    assert "the broker login (web-02) must be the node name (web-01-new)" in said, said


def test_a_worker_with_a_wrong_password_logs_what_to_fix_and_stops_on_sigterm(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    wrong = f"mqtts://web-02:not-{secure.passwords['web-02']}@localhost:{secure.tls_port}"
    p = tls_bus.start("worker-badpass", "worker", "--node", "web-02", "--state-dir",
                      str(tls_bus.tmp / "badpass"), OPSBAY_BROKER=wrong,
                      OPSBAY_CA_FILE=str(secure.ca))  # fmt: skip
    tls_bus.wait_log("worker-badpass", "trying again in 60 s")
    said = tls_bus.log("worker-badpass")
    assert "ERROR" in said and "check the user name and password in the broker URL" in said
    assert secure.passwords["web-02"] not in said, "the password was logged"
    p.send_signal(signal.SIGTERM)
    assert p.wait(5) == 0, tls_bus.log("worker-badpass")


# --- the certificate commands of mosquitto/README.md, run as written (issue 12, 2) ---------

TLS_BLOCK = "<!-- tests/test_e2e_broker_security.py runs this block"


def documented_pki(d: Path, name: str, ip: str) -> None:
    """Run mosquitto/README.md's CA and server certificate commands in `d`, with only its two
    variables (the broker's name and address) set."""
    text = (SHIPPED / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text[text.index(TLS_BLOCK) :], re.S)
    assert block, "no sh block after the marker in mosquitto/README.md"
    script = block[1]
    for var, value in (("name", name), ("ip", ip)):
        script, n = re.subn(rf"^{var}=\S*(.*)$", rf"{var}={value}\1", script, flags=re.M)
        assert n == 1, f"mosquitto/README.md: expected one line setting {var}"
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=d, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def openssl_verify(d: Path, *check: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.crt", "-purpose", "sslserver", *check, "server.crt"],
        cwd=d, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_the_documented_certificate_is_a_tls_server_certificate_for_its_san_only(
    tmp_path: Path,
) -> None:
    documented_pki(tmp_path, "broker.example", "192.0.2.10")  # the block exactly as printed
    for ok in (("-verify_hostname", "broker.example"), ("-verify_ip", "192.0.2.10")):
        assert openssl_verify(tmp_path, *ok).returncode == 0, ok
    wrong = openssl_verify(tmp_path, "-verify_hostname", "other.example")
    assert wrong.returncode != 0 and "hostname mismatch" in wrong.stdout + wrong.stderr, wrong
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0, "the CA key is readable by others"


@pytest.fixture
def documented_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """production.conf with the certificate the documented commands make for localhost."""
    documented_pki(tmp_path, "localhost", "127.0.0.1")
    with production_broker(tmp_path, ("ci", "coordinator")) as b:
        yield b


def test_a_client_reaches_a_broker_with_the_documented_certificate_by_the_name_in_its_san(
    documented_broker: SecureBroker,
) -> None:
    b = documented_broker
    p = Peer(b.client_port, "ci", b.passwords["ci"], ca=b.ca)  # to "localhost": the DNS SAN
    try:
        assert p.connack is not None and not p.connack.is_failure, p.connack
    finally:
        p.close()


def test_a_host_that_is_not_in_the_certificates_san_is_refused(
    documented_broker: SecureBroker,
) -> None:
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(documented_broker.ca))
    address = ("127.0.0.1", documented_broker.tls_port)
    with (
        socket.create_connection(address, timeout=WAIT_S) as s,
        pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"),
    ):
        context.wrap_socket(s, server_hostname="broker.example")
    with socket.create_connection(address, timeout=WAIT_S) as s:
        context.wrap_socket(s, server_hostname="127.0.0.1").close()  # the IP SAN


# --- message size: the protocol's 4 MiB, enforced by the broker (issue 12, 5) -----------------

MIB = 1024 * 1024


def publish_311(port: int, user: str, password: str, topic: str, payload: bytes) -> None:
    """Publish retained at QoS 1 under MQTT 3.1.1 and wait for the PUBACK, which Mosquitto sends
    once it has routed (or dropped) the message."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"opsbay-big-{uuid.uuid4().hex[:8]}",
                    protocol=MQTTProtocolVersion.MQTTv311)  # fmt: skip
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        info = c.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"no PUBACK for {len(payload)} bytes on {topic}"
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.mark.parametrize(
    ("size", "kept"), [(4 * MIB, True), (4 * MIB + 1, False), (5 * MIB, False)]
)
def test_a_node_cannot_store_a_message_over_4_mib_for_every_watcher(
    secure: SecureBroker, peers: Callable[[str], Peer], size: int, kept: bool
) -> None:
    topic = "opsbay/nodes/web-02/info"  # web-02's own info topic: the ACL lets it write there
    probe = token()
    payload = probe + b"x" * (size - len(probe))
    watcher = peers("watcher")
    assert not watcher.subscribe("opsbay/#").is_failure
    try:
        publish_311(secure.plain_port, "web-02", secure.passwords["web-02"], topic, payload)
        control = token()
        peers("probe").publish("opsbay/control", control)
        watcher.wait_for("opsbay/control", control)
        assert ((topic, payload) in watcher.received) is kept, len(watcher.received)
        # Nor is it retained for the next watcher: retained messages come right after the SUBACK.
        late = peers("watcher")
        assert not late.subscribe(topic).is_failure
        assert not late.subscribe("opsbay/control").is_failure
        control = token()
        peers("probe").publish("opsbay/control", control)
        late.wait_for("opsbay/control", control)
        assert ((topic, payload) in late.received) is kept, [len(p) for _, p in late.received]
    finally:  # clear the retained message for the tests after this one
        publish_311(secure.plain_port, "web-02", secure.passwords["web-02"], topic, b"")


# --- client ids bound to logins: no login takes over another's session (issue 12, 2) --------


def disconnects(bus: Bus, name: str) -> int:
    return bus.log(name).count("disconnected from")


@pytest.mark.parametrize(
    ("user", "client_id", "refused"),
    [
        # A node's login with the coordinator's or another node's client id: on the daemons'
        # listeners the client id is the username, so it gets only its own session.
        ("web-02", "opsbay-coordinator:opsbay", False),
        ("web-02", "opsbay-worker:opsbay:web-01", False),
        # ... or with the session ids themselves: they do not start with opsbay-.
        ("web-02", "coordinator", True),
        ("web-02", "web-01", True),
        # A client's login, on the clients' listener: never a daemon's session either.
        ("ci", "coordinator", True),
        ("ci", "web-01", True),
        ("ci", "opsbay-coordinator:opsbay", False),
    ],
)
def test_no_login_can_take_over_the_coordinators_or_a_nodes_session(
    tls_bus: Bus, secure: SecureBroker, user: str, client_id: str, refused: bool
) -> None:
    before = {name: disconnects(tls_bus, name) for name in ("coordinator", "worker-web-01")}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    c.username_pw_set(user, secure.passwords[user])
    c.tls_set(ca_certs=str(secure.ca))
    connack: list[ReasonCode] = []
    c.on_connect = lambda c, u, f, rc, p: connack.append(rc)
    c.connect("localhost", secure.tls_port_of(user))
    c.loop_start()
    try:
        wait_until(lambda: connack, WAIT_S, f"a CONNACK for {user} as {client_id}")
        assert connack[0].is_failure is refused, connack
        # Whatever it got, the coordinator and web-01 kept their sessions: a job goes through,
        # and neither was disconnected.
        out = tls_bus.cli("submit", "-t", "web-01", "-c", "echo still", "--wait",
                          **login(secure, "ci"))  # fmt: skip
        assert (out.returncode, out.stdout) == (0, "still\n"), out.stderr
        after = {name: disconnects(tls_bus, name) for name in before}
        assert after == before, tls_bus.log("coordinator")[-2000:]
    finally:
        c.disconnect()
        c.loop_stop()


def test_mosquitto_sub_watches_the_production_broker_as_the_readme_shows(
    tls_bus: Bus, secure: SecureBroker, tmp_path: Path
) -> None:
    """The README's watcher: mosquitto_sub's own options file, then a plain command."""
    config = tmp_path / "mosquitto_sub"
    config.write_text(
        f"-h localhost\n-p {secure.client_port}\n--cafile {secure.ca}\n"
        f"-u watcher\n-P {secure.passwords['watcher']}\n-I opsbay-watch-\n"
    )
    config.chmod(0o600)
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    sub = subprocess.Popen(
        ["mosquitto_sub", "-t", "opsbay/jobs/#", "-v", "-C", "1", "-W", "30"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(
            lambda: "opsbay-watch-" in secure.broker.log.read_text(errors="replace"),
            WAIT_S,
            "mosquitto_sub connected",
        )
        out = tls_bus.cli("submit", "-t", "web-01", "-c", "true", "--wait", **login(secure, "ci"))
        assert out.returncode == 0, out.stderr
        seen, err = sub.communicate(timeout=30)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.communicate()
    assert sub.returncode == 0 and seen.startswith("opsbay/jobs/"), (seen, err)


def test_two_agents_with_one_node_name_on_the_production_broker(
    tls_bus: Bus, secure: SecureBroker
) -> None:
    """There the client id is the login: the later agent stops and reports the conflict without
    taking the session from the agent that stays (no clean start: nothing queued is lost)."""
    first = tls_bus.start("worker-twin-1", "worker", "--node", "web-02", "--state-dir",
                          str(tls_bus.tmp / "twin1"), **login(secure, "web-02"))  # fmt: skip
    try:
        tls_bus.wait_log("worker-twin-1", "worker web-02: ready")
        second = tls_bus.start("worker-twin-2", "worker", "--node", "web-02", "--state-dir",
                               str(tls_bus.tmp / "twin2"), **login(secure, "web-02"))  # fmt: skip
        assert second.wait(30) == 78, tls_bus.log("worker-twin-2")
        out = tls_bus.cli("submit", "-t", "web-02", "-c", "echo still", "--wait",
                          **login(secure, "ci"))  # fmt: skip
        assert (out.returncode, out.stdout) == (0, "still\n"), out.stderr
        assert first.poll() is None
        nodes = {n["node"]: n for n in json.loads(nodes_cli(tls_bus, **login(secure, "ci")).stdout)}
        assert "was already running" in nodes["web-02"].get("conflict", ""), nodes["web-02"]
    finally:
        stop_process(first)
