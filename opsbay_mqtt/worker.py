"""The worker agent: one per node. Receives dispatches for its node, runs them, reports back."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from opsbay_mqtt import __version__, runner, sysinfo
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.ledger import Ledger
from opsbay_mqtt.protocol import Dispatch, NodeInfo, NodeStatus, Result, decode, encode
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import CONNECTED, Connection, Inbound, Will

log = logging.getLogger(__name__)

WILL_DELAY_S = 3


@dataclass(frozen=True)
class WorkerConfig:
    node: str
    topics: Topics
    keyring: Keyring
    labels: dict[str, str] = field(default_factory=dict)
    max_parallel: int = 8
    output_cap: int = runner.DEFAULT_OUTPUT_CAP
    kill_grace_s: float = runner.DEFAULT_KILL_GRACE_S
    info_interval_s: float = 60.0


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        ledger: Ledger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = config
        self.ledger = ledger
        self.clock = clock
        self.session = int(clock() * 1000)
        self.seq = 0  # connections made in this session
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.max_parallel, thread_name_prefix="job")
        self.conn: Connection | None = None

    # -- messages about this node
    def _now_s(self) -> int:
        return int(self.clock())

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _status(self, state: str) -> bytes:
        msg = NodeStatus(
            node=self.cfg.node,
            state=state,  # type: ignore[arg-type]
            session=self.session,
            seq=self.seq,
            published_ms=self._now_ms(),
        )
        return encode(msg, self.cfg.keyring, self._now_s())

    def will(self) -> Will:
        """Called before every connection attempt: the offline status of that connection."""
        self.seq += 1
        return Will(
            self.cfg.topics.node_status(self.cfg.node), self._status("offline"), WILL_DELAY_S
        )

    def info_payload(self) -> bytes:
        msg = NodeInfo(
            node=self.cfg.node,
            session=self.session,
            published_ms=self._now_ms(),
            agent_version=__version__,
            labels=self.cfg.labels,
            facts=sysinfo.facts(),
        )
        return encode(msg, self.cfg.keyring, self._now_s())

    def publish_birth(self) -> None:
        assert self.conn is not None
        t = self.cfg.topics
        self.conn.publish(t.node_info(self.cfg.node), self.info_payload(), retain=True)
        self.conn.publish(t.node_status(self.cfg.node), self._status("online"), retain=True)

    def publish_offline(self) -> None:
        assert self.conn is not None
        topic = self.cfg.topics.node_status(self.cfg.node)
        self.conn.publish_wait(topic, self._status("offline"), retain=True, timeout_s=5)

    # -- results
    def _send_result(self, result: Result) -> bytes:
        assert self.conn is not None
        payload = encode(result, self.cfg.keyring, self._now_s())
        self.conn.publish(self.cfg.topics.result(result.node, result.job_id), payload)
        return payload

    def _finish(self, result: Result, msg: Inbound | None) -> None:
        payload = encode(result, self.cfg.keyring, self._now_s())
        self.ledger.finish(result.job_id, result.state, payload, self._now_ms())
        assert self.conn is not None
        self.conn.publish(self.cfg.topics.result(result.node, result.job_id), payload)
        if msg is not None:
            self.conn.ack(msg)

    def report_interrupted(self) -> None:
        """Jobs that were running when a previous worker process died are `lost`, never re-run."""
        for job_id, pid, started_at in self.ledger.interrupted():
            log.warning("job %s was running when the worker stopped; reporting it lost", job_id)
            reason = "the worker stopped while the job was running; it was not re-run"
            if pid is not None and started_at and runner.kill_leftover_group(pid, started_at):
                reason += "; what was left of it was killed"
            self._finish(
                Result(
                    job_id=job_id,
                    node=self.cfg.node,
                    state="lost",
                    session=self.session,
                    finished_ms=self._now_ms(),
                    reason=reason,
                ),
                None,
            )

    # -- dispatches
    def handle(self, msg: Inbound) -> None:
        assert self.conn is not None
        if msg.topic == CONNECTED:
            self.publish_birth()
            return
        try:
            dispatch, _ = decode(msg.payload, self.cfg.keyring, expect=(Dispatch,))
            assert isinstance(dispatch, Dispatch)
            kind, fields = self.cfg.topics.parse(msg.topic)
            if kind != "node_jobs" or fields["node"] != self.cfg.node:
                raise Refused("wrong_topic", f"message on {msg.topic!r} is not for this node")
            if dispatch.node != self.cfg.node:
                raise Refused(
                    "wrong_node", f"dispatch for node {dispatch.node!r} reached {self.cfg.node!r}"
                )
        except Refused as e:
            log.warning("refused a message on %s: %s", msg.topic, e)
            self.conn.ack(msg)
            return
        self.accept(dispatch, msg)

    def accept(self, d: Dispatch, msg: Inbound) -> None:
        with self._lock:
            if d.job_id in self._active:
                log.info("job %s: duplicate dispatch while running; ignored", d.job_id)
                self.conn.ack(msg)  # type: ignore[union-attr]
                return
            seen = self.ledger.get(d.job_id)
            if seen is not None:
                state, stored = seen
                log.info("job %s: already %s here; re-sending its result", d.job_id, state)
                if stored is not None:
                    self.conn.publish(self.cfg.topics.result(d.node, d.job_id), stored)  # type: ignore[union-attr]
                self.conn.ack(msg)  # type: ignore[union-attr]
                return
            if self._now_ms() > d.start_by_ms:
                log.warning("job %s: arrived after its start-by deadline; not run", d.job_id)
                self.ledger.start(d.job_id, self._now_ms())
                self._finish(
                    Result(
                        job_id=d.job_id,
                        node=d.node,
                        state="expired",
                        session=self.session,
                        finished_ms=self._now_ms(),
                        reason="not started by its start-by deadline",
                    ),
                    msg,
                )
                return
            self.ledger.start(d.job_id, self._now_ms())
            self._active.add(d.job_id)
        self._send_result(
            Result(
                job_id=d.job_id,
                node=d.node,
                state="running",
                session=self.session,
                started_ms=self._now_ms(),
            )
        )
        self._pool.submit(self._run, d, msg)

    def _run(self, d: Dispatch, msg: Inbound) -> None:
        log.info("job %s: running (timeout %d s)", d.job_id, d.timeout_s)
        try:
            r = runner.run(
                d.command,
                timeout_s=d.timeout_s,
                output_cap=self.cfg.output_cap,
                kill_grace_s=self.cfg.kill_grace_s,
                clock=self.clock,
                on_start=lambda pid: self._started(d.job_id, pid),
            )
            result = Result(
                job_id=d.job_id,
                node=d.node,
                state=r.state,  # type: ignore[arg-type]
                session=self.session,
                exit_code=r.exit_code,
                stdout=r.stdout,
                stderr=r.stderr,
                stdout_bytes=r.stdout_bytes,
                stderr_bytes=r.stderr_bytes,
                truncated=r.truncated,
                started_ms=r.started_ms,
                finished_ms=r.finished_ms,
                duration_ms=r.duration_ms,
                reason=r.reason,
                host=self._host_facts(),
            )
        except Exception as e:  # the command could not even be started: report, never die
            log.exception("job %s: could not run", d.job_id)
            result = Result(
                job_id=d.job_id,
                node=d.node,
                state="failed",
                session=self.session,
                finished_ms=self._now_ms(),
                reason=f"could not run the command: {e}"[:1000],
            )
        log.info("job %s: %s (exit %s)", d.job_id, result.state, result.exit_code)
        try:
            self._finish(result, msg)
        finally:
            with self._lock:
                self._active.discard(d.job_id)

    def _started(self, job_id: str, pid: int) -> None:
        try:
            started_at = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing would be left to clean up
        self.ledger.set_pid(job_id, pid, started_at)

    def _host_facts(self) -> dict[str, object]:
        f = sysinfo.facts()
        keep = ("hostname", "uptime_s", "load_x100", "memory_available", "disk_free")
        return {k: f[k] for k in keep}

    # -- main loop
    def serve(self, conn: Connection, stop: threading.Event) -> None:
        """Run until `stop` is set. `conn` must be connected and subscribed to this node's jobs."""
        self.conn = conn
        self.publish_birth()
        self.report_interrupted()
        next_info = time.monotonic() + self.cfg.info_interval_s
        while not stop.is_set():
            try:
                msg = conn.inbox.get(timeout=0.5)
            except queue.Empty:
                msg = None
            if msg is not None:
                try:
                    self.handle(msg)
                except Exception:
                    log.exception(
                        "worker %s: error handling a message on %s", self.cfg.node, msg.topic
                    )
            if time.monotonic() >= next_info:
                next_info = time.monotonic() + self.cfg.info_interval_s
                conn.publish(
                    self.cfg.topics.node_info(self.cfg.node), self.info_payload(), retain=True
                )

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
