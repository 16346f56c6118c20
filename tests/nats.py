"""A NATS cluster for the tests: three `nats-server`s on free loopback ports, with JetStream and
the MQTT gateway on each (MQTT streams replicated three times), one generated config per server.

    cluster = start_nats_cluster(tmp_path / "nats")
    cluster.urls            # "mqtt://127.0.0.1:P1?version=3.1.1,mqtt://...": for OPSBAY_BROKER
    cluster.kill(server)    # SIGKILL one server; cluster.start(server) brings it back
    cluster.stop()          # every server: SIGTERM, then SIGKILL

NATS's MQTT gateway speaks MQTT 3.1.1 only, hence `?version=3.1.1` in every URL."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.harness import HOST, free_port, stop_process, wait_until

INSTALL_HINT = "sudo apt-get install -y nats-server"
CLUSTER_NAME = "opsbay-test"
START_S = 60.0  # JetStream elects its meta leader and the MQTT streams get three replicas


def find_nats_server() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if Path(p).is_file()),
        None,
    )
    if found is None:
        raise RuntimeError(f"nats-server is not installed; install it with: {INSTALL_HINT}")
    return found


@dataclass
class NatsServer:
    """One server of the cluster: its ports, config, store and log; `process` while it runs."""

    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its MQTT gateway, as a broker URL."""
        return f"mqtt://{HOST}:{self.mqtt_port}?version=3.1.1"

    @property
    def conf(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log(self) -> Path:
        return self.directory / "nats.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON (`routez`, `jsz`, `connz?mqtt_client=...`), or {}."""
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.http_port}/{endpoint}", timeout=2
            ) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return {}
        return body if isinstance(body, dict) else {}

    def mqtt_clients(self) -> set[str]:
        """The client ids of the MQTT connections this server holds now."""
        conns = self.monitor("connz?limit=10000").get("connections") or []
        return {c["mqtt_client"] for c in conns if c.get("mqtt_client")}


def server_config(me: NatsServer, peers: list[NatsServer]) -> str:
    """One server's config; a cluster of one has no `cluster` block and one replica."""
    routes = ", ".join(f"nats-route://{HOST}:{p.cluster_port}" for p in peers if p is not me)
    store = json.dumps(str((me.directory / "jetstream").resolve()))
    cluster = f"""\
cluster {{
  name: {CLUSTER_NAME}
  listen: {HOST}:{me.cluster_port}
  routes: [{routes}]
}}
"""
    return f"""\
server_name: {me.name}
listen: {HOST}:{me.client_port}
http: {HOST}:{me.http_port}
max_payload: 4MB
jetstream {{
  store_dir: {store}
  max_memory_store: 64MB
  max_file_store: 1GB
}}
{cluster if len(peers) > 1 else ""}mqtt {{
  listen: {HOST}:{me.mqtt_port}
  stream_replicas: {min(3, len(peers))}
}}
"""


@dataclass
class NatsCluster:
    servers: list[NatsServer]
    binary: str

    @property
    def urls(self) -> str:
        """Every server's MQTT URL, comma-separated: a value for --broker / OPSBAY_BROKER."""
        return ",".join(s.url for s in self.servers)

    def start(self, server: NatsServer, timeout: float = START_S) -> None:
        """Start (or start again) one server, and wait until it has rejoined and answers MQTT."""
        with open(server.log, "ab") as out:
            server.process = subprocess.Popen(
                [self.binary, "-c", str(server.conf)],
                stdout=out,
                stderr=out,
                preexec_fn=_more_files,
            )
        self.wait_ready([server], timeout)

    def wait_ready(self, servers: list[NatsServer], timeout: float = START_S) -> None:
        """Wait until each of `servers` routes to every other running server, sees a JetStream
        meta leader, and accepts an MQTT connection."""
        running = [s for s in self.servers if s.running]
        for s in servers:

            def formed(s: NatsServer = s) -> bool:
                if not s.running:
                    raise AssertionError(f"nats-server {s.name} exited; see {s.log}")
                routes = s.monitor("routez").get("num_routes", 0)
                if len(self.servers) == 1:
                    return True
                leader = (s.monitor("jsz").get("meta_cluster") or {}).get("leader")
                return routes >= len(running) - 1 and bool(leader)

            wait_until(formed, timeout, f"nats-server {s.name} to join the cluster", every=0.1)
            wait_until(lambda s=s: mqtt_answers(s.mqtt_port), timeout, f"MQTT on {s.name}", 0.2)

    def wait_answering(self, timeout: float = START_S) -> None:
        """Wait until every running server accepts a new MQTT session (after a server is lost,
        JetStream elects new leaders for the MQTT streams first: seconds)."""
        for s in self.servers:
            if s.running:
                wait_until(lambda s=s: mqtt_answers(s.mqtt_port), timeout, f"MQTT on {s.name}", 0.2)

    def kill(self, server: NatsServer) -> None:
        """Kill one server at once (SIGKILL: no goodbye to its clients or its peers)."""
        if server.process is not None:
            stop_process(server.process, sig=signal.SIGKILL)

    def server_of(self, client_id: str) -> NatsServer | None:
        """The running server that holds the MQTT connection of `client_id`, if any."""
        return next((s for s in self.servers if s.running and client_id in s.mqtt_clients()), None)

    def stop(self) -> None:
        for s in self.servers:
            if s.process is not None:
                stop_process(s.process)


def _more_files() -> None:
    """In the server's process, before it starts: every MQTT session with a QoS 1 subscription
    is a replicated JetStream consumer, with files of its own; 10,000 of them (the fleet
    figure) pass the usual 20,000 open files per process. Root may raise it; others get what
    their hard limit allows."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (262_144, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
            return
        except (ValueError, OSError):
            continue


def mqtt_answers(port: int) -> bool:
    """Whether an MQTT 3.1.1 CONNECT on `port` gets an accepting CONNACK (NATS answers only
    once its MQTT streams exist, which needs the cluster's JetStream)."""
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    accepted: list[bool] = []
    c.on_connect = lambda c, u, f, rc, p: accepted.append(not rc.is_failure)
    try:
        c.connect(HOST, port, keepalive=10)
        for _ in range(50):  # at most 5 s for the CONNACK
            if accepted or c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        return bool(accepted and accepted[0])
    except OSError:
        return False
    finally:
        with contextlib.suppress(Exception):
            c.disconnect()
            c.loop(0.1)
        for name in ("_sockpairR", "_sockpairW"):  # see tests.helpers.Watcher.close
            pair_end = getattr(c, name, None)
            if pair_end is not None:
                pair_end.close()


def start_nats_cluster(directory: Path, size: int = 3, timeout: float = START_S) -> NatsCluster:
    """`size` servers on free loopback ports, their configs, stores and logs under `directory`,
    returned once the cluster has formed and every MQTT port answers; stopped on failure."""
    binary = find_nats_server()
    servers = []
    for i in range(1, size + 1):
        d = directory / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        servers.append(
            NatsServer(
                name=f"n{i}",
                client_port=free_port(),
                cluster_port=free_port(),
                mqtt_port=free_port(),
                http_port=free_port(),
                directory=d,
            )
        )
    for s in servers:
        s.conf.write_text(server_config(s, servers))
    cluster = NatsCluster(servers=servers, binary=binary)
    try:
        for s in servers:
            with open(s.log, "ab") as out:
                s.process = subprocess.Popen([binary, "-c", str(s.conf)], stdout=out, stderr=out)
        cluster.wait_ready(servers, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
