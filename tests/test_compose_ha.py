"""docker-compose.ha.yml and nats/cluster.conf, held to what the tests run: no Docker engine
runs here, so the HA stack's file is checked against the suite's own NATS cluster settings and
against `opsbay` itself (every command line in it is one opsbay accepts)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from opsbay_mqtt.transport import BrokerURL
from tests.nats import CLUSTER_NAME, NatsServer, server_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.ha.yml").read_text())
CONF = (ROOT / "nats" / "cluster.conf").read_text()


def settings(conf: str) -> dict[str, str]:
    """`key: value` lines of a NATS config, by their block: {"jetstream.store_dir": ...}."""
    out, block = {}, ""
    for raw in conf.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.endswith("{"):
            block = line[:-1].strip() + "."
        elif line == "}":
            block = ""
        elif ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            out[block + key] = value
    return out


def test_the_nats_servers_are_configured_as_the_tests_cluster_is(tmp_path: Path) -> None:
    servers = [
        NatsServer(f"n{i}", 4222 + i, 6222 + i, 1883 + i, 8222 + i, tmp_path) for i in range(3)
    ]
    tested, shipped = settings(server_config(servers[0], servers)), settings(CONF)
    # What differs on purpose: addresses (loopback ports there, container ports here), names,
    # the store's path.
    for key in (
        "max_payload", "jetstream.max_memory_store", "jetstream.max_file_store",
        "mqtt.stream_replicas",
    ):  # fmt: skip
        assert shipped[key] == tested[key], key
    assert shipped["mqtt.stream_replicas"] == "3"
    assert tested["cluster.name"] == CLUSTER_NAME and shipped["cluster.name"] == "opsbay"
    assert set(shipped) == set(tested), set(shipped) ^ set(tested)
    routes = re.findall(r"nats-route://([a-z0-9-]+):6222", shipped["cluster.routes"])
    nats = sorted(name for name in COMPOSE["services"] if name.startswith("nats-"))
    assert sorted(routes) == nats == ["nats-1", "nats-2", "nats-3"]


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items()}


def opsbay_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in COMPOSE["services"].items() if s.get("build") == "."}


def test_every_opsbay_process_gets_the_whole_cluster_as_its_broker_list() -> None:
    nats = sorted(name for name in COMPOSE["services"] if name.startswith("nats-"))
    for name, service in opsbay_services().items():
        brokers = BrokerURL.parse_list(service_env(service)["OPSBAY_BROKER"])
        assert sorted(b.host for b in brokers) == nats, name
        assert all(b.port == 1883 and not b.mqtt5 for b in brokers), name  # NATS: MQTT 3.1.1


def test_coordinators_have_names_of_their_own_and_share_one_record() -> None:
    coordinators = {
        name: s["command"]
        for name, s in opsbay_services().items()
        if s["command"][0] == "coordinator"
    }
    assert len(coordinators) >= 2
    names = [cmd[cmd.index("--name") + 1] for cmd in coordinators.values()]
    stores = {cmd[cmd.index("--store") + 1] for cmd in coordinators.values()}
    assert len(set(names)) == len(names)
    assert len(stores) == 1 and next(iter(stores)).startswith("postgresql://")
    assert (
        "@" in next(iter(stores)) and ":" not in next(iter(stores)).split("@")[0][13:]
    )  # no password


def test_every_opsbay_command_line_is_one_opsbay_accepts() -> None:
    for name, service in opsbay_services().items():
        argv = [str(a) for a in service["command"]]
        out = subprocess.run(
            [sys.executable, "-m", "opsbay_mqtt", *argv, "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, (name, shlex.join(argv), out.stderr)
        for option in (a for a in argv if a.startswith("--")):
            assert option in out.stdout, (name, option)
