"""Build and run the long-lived processes (coordinator, worker) from validated settings."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig, serve
from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.ledger import Ledger
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import Topics, validate_node
from opsbay_mqtt.transport import BrokerURL, Connection
from opsbay_mqtt.worker import Worker, WorkerConfig

log = logging.getLogger(__name__)


def default_node_name(node: str | None) -> str:
    name = node or socket.gethostname().split(".")[0]
    try:
        return validate_node(name)
    except Refused as e:
        raise ConfigError(f"--node / OPSBAY_NODE: {e.text}") from e


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--label: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _client_id(role: str, topics: Topics, name: str = "") -> str:
    prefix = topics.prefix.replace("/", "_")
    return f"opsbay-{role}-{prefix}" + (f"-{name}" if name else "")


def _make_dir(path: Path, setting: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot create {path}: {e}") from e


def run_coordinator(
    url: BrokerURL,
    keyring: Keyring,
    topics: Topics,
    ca_file: str | None,
    *,
    data_dir: Path,
    allow_nodes: frozenset[str] | None,
    limits: dict[str, int],
) -> None:
    _make_dir(data_dir, "--data-dir / OPSBAY_DATA_DIR")
    for n in allow_nodes or ():
        try:
            validate_node(n)
        except Refused as e:
            raise ConfigError(f"--allow-node / OPSBAY_ALLOW_NODES: {e.text}") from e
    stop = _stop_on_signals()
    store = Store(data_dir / "opsbay.db")
    cfg = CoordinatorConfig(topics=topics, keyring=keyring, allow_nodes=allow_nodes, **limits)
    conn = Connection(
        url=url,
        client_id=_client_id("coordinator", topics),
        persistent=True,
        manual_ack=True,
        ca_file=ca_file,
    )
    log.info("coordinator: connecting to %s (prefix %s, data %s)", url, topics.prefix, data_dir)
    conn.connect(retry=True)
    conn.subscribe(
        [
            (topics.submit, 1),
            (topics.rpc_request, 1),
            (topics.all_results, 1),
            (topics.all_node_info, 1),
            (topics.all_node_status, 1),
        ]
    )
    log.info("coordinator: ready")
    try:
        serve(Coordinator(cfg, store), conn, stop)
    finally:
        conn.close()
        store.close()
        log.info("coordinator: stopped")


def run_worker(
    url: BrokerURL,
    keyring: Keyring,
    topics: Topics,
    ca_file: str | None,
    *,
    node: str,
    labels: dict[str, str],
    state_dir: Path,
    max_parallel: int,
) -> None:
    _make_dir(state_dir, "--state-dir / OPSBAY_STATE_DIR")
    stop = _stop_on_signals()
    ledger = Ledger(state_dir / "ledger.db")
    cfg = WorkerConfig(
        node=node, topics=topics, keyring=keyring, labels=labels, max_parallel=max_parallel
    )
    w = Worker(cfg, ledger)
    conn = Connection(
        url=url,
        client_id=_client_id("worker", topics, node),
        persistent=True,
        manual_ack=True,
        will=w.will,
        ca_file=ca_file,
    )
    log.info("worker %s: connecting to %s (prefix %s)", node, url, topics.prefix)
    conn.connect(retry=True)
    conn.subscribe([(topics.node_jobs(node), 1)])
    log.info("worker %s: ready", node)
    try:
        w.serve(conn, stop)
    finally:
        log.info("worker %s: stopping; waiting for running jobs", node)
        w.shutdown()
        try:
            w.publish_offline()
        except Exception:
            log.warning("worker %s: could not publish offline status", node)
        conn.close()
        ledger.close()
        log.info("worker %s: stopped", node)
