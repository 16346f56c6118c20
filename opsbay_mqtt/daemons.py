"""Build and run the long-lived processes (coordinator, worker) from validated settings."""

from __future__ import annotations

import logging
import os
import pwd
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from opsbay_mqtt.errors import BrokerError, BrokerRefused, ConfigError, Refused
from opsbay_mqtt.topics import Topics, validate_node
from opsbay_mqtt.transport import Connection

if TYPE_CHECKING:
    from opsbay_mqtt.coordinator import Coordinator
    from opsbay_mqtt.policy import WorkerPolicy
    from opsbay_mqtt.settings import Settings

log = logging.getLogger(__name__)


def default_node_name(node: str | None) -> str:
    name = node or socket.gethostname().split(".")[0]
    try:
        return validate_node(name)
    except Refused as e:
        raise ConfigError(f"--node / OPSBAY_NODE: {e.text}") from e


def check_run_as(user: str | None) -> None:
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--run-as: no such user {user!r}") from None
    if os.geteuid() != 0:
        raise ConfigError("--run-as needs the worker to run as root")


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received signal %d; stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def client_id(role: str, topics: Topics, name: str = "") -> str:
    # ':' appears in neither prefixes nor node names, so two buses never share an id.
    return f"opsbay-{role}:{topics.prefix}" + (f":{name}" if name else "")


def coordinator_subscriptions(topics: Topics, share: str = "") -> list[tuple[str, int]]:
    """What a coordinator subscribes to. With `share` (MQTT 5), requests (submissions, cancels,
    queries) come through the shared subscription `$share/SHARE/...`: the broker gives each to
    one of the coordinators of the group. Without it every coordinator gets every message, and the
    record's guarded changes make each effect happen once. Node info and status are retained,
    which a shared subscription never delivers: every coordinator reads them."""
    # Results are not shared: a result queued for a member that died would wait for it while
    # the others' deadlines called its job lost; every member reads every result instead (the
    # record's guarded changes make each count once).
    split = [topics.submit, topics.rpc_request]
    if share:
        split = [f"$share/{share}/{t}" for t in split]
    every = [topics.all_results, topics.all_node_info, topics.all_node_status]
    return [(t, 1) for t in [*split, *every]]


def _make_dir(path: Path, setting: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot create {path}: {e}") from e


# On MQTT 3.1.1 a failed subscription has one code for every cause: the ACL's refusal, or a
# broker that cannot make it now (NATS's gateway under load, or with a server of its cluster
# down, times out creating the JetStream consumer a QoS 1 subscription needs). A daemon tries
# again this many times, 2 s apart, before it takes the failure as a refusal.
SUBSCRIBE_TRIES_311 = 15


def _subscribe(conn: Connection, topics: list[tuple[str, int]], stop: threading.Event) -> bool:
    """Subscribe, and again while the broker drops the connection meanwhile (a daemon waits for
    its broker as long as it takes, saying so); False if asked to stop first. A refusal (the
    broker's ACL) is not retried on MQTT 5: it raises BrokerRefused; on MQTT 3.1.1, only after
    SUBSCRIBE_TRIES_311 tries."""
    tries = 0
    while not stop.is_set():
        try:
            conn.subscribe(topics)
            return True
        except BrokerRefused as e:
            tries += 1
            if conn.url.mqtt5 or tries >= SUBSCRIBE_TRIES_311:
                raise
            log.warning(
                "%s: %s; on MQTT 3.1.1 that may be the broker not ready: trying again (%d of %d)",
                conn.client_id, e, tries, SUBSCRIBE_TRIES_311,
            )  # fmt: skip
            stop.wait(2.0)
        except BrokerError as e:
            log.warning("%s: %s; subscribing again", conn.client_id, e)
            stop.wait(1.0)
    return False


def run_coordinator(
    settings: Settings,
    *,
    data_dir: Path,
    allow_nodes: frozenset[str] | None,
    limits: dict[str, int],
    name: str = "",
    store_url: str = "",
    share: str = "",
) -> None:
    """Run a coordinator until SIGTERM. `name`: its own, when several share one record; its
    broker client id (and so its persistent session) is `opsbay-coordinator:PREFIX:NAME`.
    `store_url`: its record (`record.open_record`: PostgreSQL, or SQLite under `data_dir`).
    `share`: split the work with the others through MQTT 5 shared subscriptions of that group
    (`coordinator_subscriptions`)."""
    # Imported here: a worker process (every node) never loads the coordinator's modules.
    from opsbay_mqtt import models
    from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig
    from opsbay_mqtt.record import open_record

    models.install()  # validate what arrives with pydantic (`protocol` says why both)
    if (name or share) and not store_url:
        raise ConfigError(
            "--name and --share are for several coordinators on one PostgreSQL record: give "
            "--store postgresql://... too (a SQLite record serves one coordinator, which needs "
            "neither)"
        )
    if share and not settings.url.mqtt5:
        raise ConfigError(
            "--share / OPSBAY_COORDINATOR_SHARE needs MQTT 5 (shared subscriptions); with an "
            "MQTT 3.1.1 broker leave it out: every coordinator then handles every message"
        )
    _make_dir(data_dir, "--data-dir / OPSBAY_DATA_DIR")
    for n in allow_nodes or ():
        try:
            validate_node(n)
        except Refused as e:
            raise ConfigError(f"--allow-node / OPSBAY_ALLOW_NODES: {e.text}") from e
    stop = _stop_on_signals()
    unbounded = sorted(
        {who.name for who in settings.keyring.identities.values() if who.kind == "client"}
        - set(settings.clients)
    )
    if unbounded:  # the default is open: say so where the operator looks
        log.warning(
            "coordinator: client(s) %s have no [clients.NAME] section in the key file: they may "
            "target every node and run any command (see docs/security.md)",
            ", ".join(unbounded),
        )
    store = open_record(store_url, data_dir)
    try:
        # Two coordinators with one name would take the broker session from each other for ever.
        store.claim(client_id("coordinator", settings.topics, name))
    except ConfigError:
        store.close()
        raise
    cfg = CoordinatorConfig(
        topics=settings.topics,
        keyring=settings.keyring,
        allow_nodes=allow_nodes,
        clients=settings.clients,
        node_labels=settings.node_labels,
        window_s=limits["window_s"],
        lost_grace_s=limits["lost_grace_s"],
        keep_days=limits["keep_days"],
        keep_jobs=limits["keep_jobs"],
        max_open_per_node=limits["max_open_per_node"],
    )
    topics = settings.topics
    conn = Connection(
        url=settings.brokers,
        client_id=client_id("coordinator", topics, name),
        persistent=True,
        manual_ack=True,
        receive_max=1000,
        tls=settings.tls,
    )
    log.info(
        "coordinator: connecting to %s (prefix %s, data %s)",
        settings.brokers,
        topics.prefix,
        data_dir,
    )
    if not conn.connect(retry=True, stop=stop):
        store.close()
        log.info("coordinator: stopped before the broker accepted the connection")
        return
    if not _subscribe(conn, coordinator_subscriptions(topics, share), stop):
        store.close()
        return
    log.info("coordinator: ready")
    try:
        serve_coordinator(Coordinator(cfg, store), conn, stop)
    finally:
        conn.close()
        store.close()
        log.info("coordinator: stopped")


def serve_coordinator(coord: Coordinator, conn: Connection, stop: threading.Event) -> None:
    """The coordinator's loop: a batch in, `coordinator.step` (which commits), publish, then
    acknowledge. A coordinator that dies before the acknowledgements gets the batch again
    from the broker; handled again, its changes are found made, and what they called for is
    sent again (`Coordinator._resend_owed`): nothing committed goes unsent."""
    from opsbay_mqtt.coordinator import step

    coord.redispatch_pending()
    next_tick = 0.0
    while not stop.is_set():
        # A schedule's run due before the next regular tick wakes the loop at its time.
        wake = coord.scheduler.wake_in_s()
        wait = coord.cfg.tick_s if wake is None else min(coord.cfg.tick_s, wake)
        batch = conn.receive(wait, coord.cfg.batch_max)
        tick_due = time.monotonic() >= next_tick or coord.scheduler.due_now()
        if tick_due:
            next_tick = time.monotonic() + coord.cfg.tick_s
        outgoing = step(coord, batch, tick_due)
        for out in outgoing:
            conn.publish(out.topic, out.payload, retain=out.retain, expiry_s=out.expiry_s)
        for msg in batch:  # only now: what they changed is committed, and its messages out
            conn.ack(msg)


def run_worker(
    settings: Settings,
    *,
    node: str,
    labels: dict[str, str],
    state_dir: Path,
    max_parallel: int,
    policy: WorkerPolicy,
    run_as: str | None,
    clean_env: bool,
) -> None:
    from opsbay_mqtt import models, statedir
    from opsbay_mqtt.ledger import Ledger
    from opsbay_mqtt.worker import Worker, WorkerConfig

    models.install()  # validate what arrives with pydantic (`protocol` says why both)

    state_lock = statedir.lock(state_dir, node=node)  # one worker per folder
    log.info("worker %s: state folder %s", node, state_dir)
    check_run_as(run_as)
    stop = _stop_on_signals()
    ledger = Ledger(state_dir / "ledger.db", node=node)
    cfg = WorkerConfig(
        node=node,
        topics=settings.topics,
        keyring=settings.keyring,
        labels=labels,
        max_parallel=max_parallel,
        policy=policy,
        run_as=run_as,
        clean_env=clean_env,
    )
    w = Worker(cfg, ledger)
    conn = Connection(
        url=settings.brokers,
        client_id=client_id("worker", settings.topics, node),
        persistent=True,
        manual_ack=True,
        receive_max=1000,
        will=w.will,
        tls=settings.tls,
        on_refused=w.on_refused,
    )
    log.info(
        "worker %s: connecting to %s (prefix %s)", node, settings.brokers, settings.topics.prefix
    )
    if not conn.connect(retry=True, stop=stop):
        log.info("worker %s: stopped before the broker accepted the connection", node)
        ledger.close()
        state_lock.close()
        return
    # Its own status topic too: to see that the broker lets it read and write there, and to
    # find another agent using the same node name.
    topics = settings.topics
    if not _subscribe(conn, [(topics.node_jobs(node), 1), (topics.node_status(node), 1)], stop):
        ledger.close()
        state_lock.close()
        return
    log.info("worker %s: ready", node)
    try:
        w.serve(conn, stop)
    finally:
        log.info("worker %s: stopping; waiting for running jobs", node)
        w.shutdown()
        if w.fatal is None:  # stepping down, the other agent's status must stay
            try:
                w.publish_offline()
            except Exception:
                log.warning("worker %s: could not publish offline status", node)
        w.report_conflict()
        conn.close()
        ledger.close()
        state_lock.close()
        log.info("worker %s: stopped", node)
    if w.fatal is not None:
        raise ConfigError(f"worker {node}: {w.fatal}")
