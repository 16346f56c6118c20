"""The worker agent: one per node. Receives dispatches for its node, runs them, reports back."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil

from opsbay_mqtt import __version__, authz, runner, sysinfo
from opsbay_mqtt.errors import BrokerRefused, Refused
from opsbay_mqtt.ledger import Ledger
from opsbay_mqtt.livelog import FLUSH_EVERY_S, LiveOutput
from opsbay_mqtt.policy import WorkerPolicy
from opsbay_mqtt.protocol import (
    Cancel,
    Dispatch,
    NodeInfo,
    NodeStatus,
    Output,
    Result,
    decode,
    encode,
    outcome_of,
)
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import CONNECTED, Connection, Inbound, Will

log = logging.getLogger(__name__)

WILL_DELAY_S = 3
ECHO_WITHIN_S = 10.0  # our own online status must come back from the broker by then
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


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
    policy: WorkerPolicy = field(default_factory=WorkerPolicy)
    run_as: str | None = None
    clean_env: bool = False


def job_env(job_id: str, node: str, *, clean: bool, run_as: str | None) -> dict[str, str]:
    """The environment a job runs with: the worker's own minus every OPSBAY_* setting (secrets,
    broker credentials), or with `clean` only a minimal one; plus the job's id and node."""
    return {**_base_env(clean, run_as), "OPSBAY_JOB_ID": job_id, "OPSBAY_NODE": node}


@functools.lru_cache(maxsize=4)
def _base_env(clean: bool, run_as: str | None) -> dict[str, str]:
    """What `job_env` adds a job's id and node to: computed once per worker, not per job."""
    if clean:
        env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "SHELL": "/bin/sh"}
        user = pwd.getpwuid(os.geteuid())
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSBAY_")}
    if run_as is not None:
        user = pwd.getpwnam(run_as)
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return env


# -- the worker's decisions: pure, from what a message says, what this process and its ledger
# know, and the clock (tests/test_worker.py goes through each); `Worker` carries them out.
Seen = tuple[str, bytes | None]  # a job in the ledger: its state, and its result once it ended


def on_dispatch(queued: bool, seen: Seen | None) -> Literal["ignore", "resend", "queue"]:
    """A dispatch: a job queued or running here is left alone; one in the ledger gets its stored
    result sent again (never run twice); anything else waits for a free slot."""
    if queued:
        return "ignore"
    return "resend" if seen is not None else "queue"


def on_cancel(queued: bool, seen: Seen | None) -> Literal["stop", "resend", "claim"]:
    """A cancel: a job queued or running here is stopped; one in the ledger gets its result sent
    again; one not here yet is claimed in the ledger as cancelled, so that it never starts."""
    if queued:
        return "stop"
    return "resend" if seen is not None else "claim"


def before_start(
    *, cancelled: str | None, now_ms: int, start_by_ms: int, refusal: Refused | None
) -> tuple[str, str] | None:
    """Why a queued job ends without running, as (state, reason), or None: run it now."""
    if cancelled is not None:
        return "cancelled", "cancelled before it started"
    if now_ms > start_by_ms:
        return "expired", "not started by its start-by deadline"
    if refusal is not None:
        return "rejected", f"{refusal.code}: {refusal.text}"
    return None


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
        self._active: dict[str, runner.RunControl] = {}  # queued or running, by job id
        self._live: dict[str, LiveOutput] = {}
        self._facts: dict[str, object] = {}
        self._facts_at = float("-inf")
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(config.max_parallel, thread_name_prefix="job")
        self.conn: Connection | None = None
        # Why this worker cannot go on (another agent uses the node's name, the broker refuses
        # its messages): set, the loop ends and the process exits non-zero with it.
        self.fatal: str | None = None
        self._echo_due = float("inf")  # when our own status should have come back by
        self._found: dict[int, int] = {}  # session -> seq of other agents' retained statuses
        self._newer_seen: set[int] = set()
        self._reconnected = False  # after our first connection: retained statuses are news
        self._conflict: tuple[str, Any] | None = None  # stepping down: our `conflict` status

    def _now_s(self) -> int:
        return int(self.clock())

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.conn is not None
        self.conn.publish(topic, payload, retain=retain)

    def _ack(self, msg: Inbound | None) -> None:
        if msg is not None and self.conn is not None:
            self.conn.ack(msg)

    # -- messages about this node
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
        topic = self.cfg.topics.node_status(self.cfg.node)
        return Will(topic, self._status("offline"), WILL_DELAY_S)

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
        t = self.cfg.topics
        self._publish(t.node_info(self.cfg.node), self.info_payload(), retain=True)
        self._publish(t.node_status(self.cfg.node), self._status("online"), retain=True)
        self._echo_due = min(self._echo_due, time.monotonic() + ECHO_WITHIN_S)

    # -- the node's own status: is another agent using this node's name?
    def on_own_status(self, msg: Inbound) -> None:
        """Every agent reads its node's status topic. Our own status coming back shows that the
        broker lets us write and read there. Two agents with one node name share a client id:
        the broker lets one hold the session at a time, and both would reconnect and take it
        from each other for ever. The agent that was there first keeps the name; the one that
        started later stops (`step_down`) once it has proof the other is alive: a status of
        the older session with a connection attempt (`seq`) newer than the one it found when it
        started, that is, the older agent connected again after we came online. (A status the
        broker had retained from before we started proves nothing: its agent may have died.)"""
        try:
            topic = self.cfg.topics.parse(msg.topic)
            status, auth = decode(msg.payload, self.cfg.keyring, NodeStatus, topic)
            authz.require_node(auth, self.cfg.node)
        except Refused as e:
            log.warning("ignored a message on this node's status topic: %s", e)
            return
        if status.session == self.session:
            if status.state == "online":
                self._echo_due = float("inf")
            return
        if status.state == "conflict":
            return
        if status.session > self.session:  # a newer agent: it stops by the rule above
            if status.session not in self._newer_seen and status.state == "online":
                self._newer_seen.add(status.session)
                log.error(
                    "another agent with the node name %r (session %d) connected; it should stop "
                    "by itself and leave the name to this one",
                    self.cfg.node,
                    status.session,
                )
            return
        if msg.retain and not self._reconnected:  # found when we started: the baseline
            self._found.setdefault(status.session, status.seq)
            return
        found = self._found.get(status.session)
        again = status.seq > found if found is not None else status.state == "online"
        if again:
            self.step_down(
                f"another agent with the node name {self.cfg.node!r} was already running and "
                f"is still connecting (its session {status.session}, ours {self.session}): a "
                "cloned machine, or an old agent left running? This agent, started later, "
                "stops; stop the other one or give every machine its own --node name"
            )

    def check_echo(self) -> None:
        if time.monotonic() < self._echo_due:
            return
        self._echo_due = float("inf")
        login = self.conn.url.username if self.conn is not None else None
        log.error(
            "this node's own status did not come back from the broker within %g s: the broker "
            "does not let login %r read (or write) %s. The shipped ACL needs the login to be "
            "the node name and `pattern readwrite <prefix>/nodes/%%u/status`. Until then, a "
            "second agent with this node name cannot be detected",
            ECHO_WITHIN_S,
            login,
            self.cfg.topics.node_status(self.cfg.node),
        )

    def step_down(self, why: str) -> None:
        """Stop for good: tell the coordinator (not retained: the other agent's status stays),
        start nothing more, stop the jobs that run, and never reconnect, so the other agent
        keeps the session; jobs queued and not started are left unacknowledged, so that the
        broker delivers them to the agent that stays."""
        if self.fatal is not None:
            return
        self.fatal = why
        log.error("worker %s: %s", self.cfg.node, why)
        conflict = NodeStatus(
            node=self.cfg.node,
            state="conflict",
            session=self.session,
            seq=self.seq,
            published_ms=self._now_ms(),
            reason=f"{why} (host {socket.gethostname()}, pid {os.getpid()})"[:1024],
        )
        payload = encode(conflict, self.cfg.keyring, self._now_s())
        if self.conn is not None:
            # On the connection that just brought the other agent's status: it is most likely
            # still up (a side connection would, on the production broker, take its session).
            topic = self.cfg.topics.node_status(self.cfg.node)
            self._conflict = topic, self.conn.publish(topic, payload)
            self.conn.reconnect = False  # while its jobs end: the other agent holds the session
        with self._lock:
            for control in self._active.values():
                control.cancel("the agent stopped: another agent uses this node name")

    def report_conflict(self) -> None:
        """Last thing before stepping down: make sure the `conflict` status reached the broker.
        If the other agent took the connection before it went out, reconnect once for it (the
        persistent session, resumed, not wiped: the other agent takes it back with everything
        queued in it), for a few seconds at most."""
        if self._conflict is None or self.conn is None:
            return
        topic, sent = self._conflict
        self.conn.reconnect = True
        try:
            self.conn.wait_published(sent, topic, 5.0)
        except Exception as e:
            log.warning("worker %s: could not report the conflict: %s", self.cfg.node, e)
        finally:
            self.conn.reconnect = False

    def on_refused(self, refused: BrokerRefused) -> None:
        """The broker refused one of our messages: this agent cannot work (its status, results
        or output would never arrive)."""
        if self.fatal is None:
            login = self.conn.url.username if self.conn is not None else None
            self.fatal = (
                f"{refused}. The shipped ACL lets a login write only under "
                f"{self.cfg.topics.prefix}/nodes/<login>/ and .../results/<login>/, so the "
                f"broker login ({login or 'none'}) must be the node name ({self.cfg.node})"
            )

    def publish_offline(self) -> None:
        assert self.conn is not None
        topic = self.cfg.topics.node_status(self.cfg.node)
        self.conn.publish_wait(topic, self._status("offline"), retain=True, timeout_s=5)

    # -- results
    def _result(self, d_job: str, state: str, **fields: Any) -> Result:
        if fields.get("reason"):  # text for a person: no NUL (a record may refuse one)
            fields["reason"] = fields["reason"][:1024].replace("\x00", "\ufffd")
        return Result(job_id=d_job, node=self.cfg.node, state=state, session=self.session, **fields)  # type: ignore[arg-type]

    def _finish(self, result: Result, msg: Inbound | None) -> None:
        """Record the outcome in the ledger, publish it, then acknowledge the dispatch."""
        payload = encode(result, self.cfg.keyring, self._now_s())
        self.ledger.finish(result.job_id, result.state, payload, self._now_ms())
        self._publish(self.cfg.topics.result(result.node, result.job_id), payload)
        self._ack(msg)

    def report_interrupted(self) -> None:
        """Jobs that were running when a previous worker process died are `lost`, never re-run."""
        for job_id, pid, started_at in self.ledger.interrupted():
            log.warning("job %s was running when the worker stopped; reporting it lost", job_id)
            reason = "the worker stopped while the job was running; it was not re-run"
            if pid is not None and started_at and runner.kill_leftover_group(pid, started_at):
                reason += "; what was left of it was killed"
            self._finish(
                self._result(job_id, "lost", finished_ms=self._now_ms(), reason=reason), None
            )

    # -- dispatches
    def handle(self, msg: Inbound) -> None:
        self.handle_batch([msg])

    def handle_batch(self, msgs: list[Inbound]) -> None:
        """Handle messages received together, cancels first: a node back from offline gets its
        queued dispatches and their cancels in one burst, and a cancelled job must not start."""
        checked = []
        for m in msgs:
            with self._logged(m):
                checked.append((m, self._check(m)))
        for m, got in checked:
            if isinstance(got, Cancel):
                with self._logged(m):
                    self.cancel(got.job_id)
                    self._ack(m)
        for m, got in checked:
            if isinstance(got, Dispatch) and self.fatal is None:  # stepped down: not ours now
                with self._logged(m):
                    self.accept(got, m)

    @contextlib.contextmanager
    def _logged(self, msg: Inbound) -> Iterator[None]:
        """One message's failure is logged and never stops the others."""
        try:
            yield
        except Exception:
            log.exception("error handling a message on %s", msg.topic)

    def _check(self, msg: Inbound) -> Dispatch | Cancel | None:
        """Decode and verify one message for this node; None (acknowledged) if refused."""
        if msg.topic == CONNECTED:
            self._reconnected = True
            self.publish_birth()
            return None
        node = self.cfg.node
        if msg.topic == self.cfg.topics.node_status(node):
            self.on_own_status(msg)
            self._ack(msg)
            return None
        try:
            topic = self.cfg.topics.parse(msg.topic)
            if topic != ("node_jobs", {"node": node}):
                raise Refused("wrong_topic", f"message on {msg.topic!r} is not for this node")
            dispatch, auth = decode(msg.payload, self.cfg.keyring, (Dispatch, Cancel), topic)
            authz.require_node(auth, node)
        except Refused as e:
            log.warning("refused a message on %s: %s", msg.topic, e)
            self._ack(msg)
            return None
        return dispatch

    def cancel(self, job_id: str) -> None:
        """Stop a job: before it starts, it never will; while it runs, its group is killed."""
        with self._lock:
            control = self._active.get(job_id)
            seen = self.ledger.get(job_id)
            action = on_cancel(control is not None, seen)
            if action == "stop":
                assert control is not None
                log.info("job %s: cancelled", job_id)
                control.cancel("cancelled on request")
                return
            if action == "claim":  # not here yet: it must never run when it comes
                reason = "cancelled before it arrived"
                result = self._result(
                    job_id, "cancelled", finished_ms=self._now_ms(), reason=reason
                )
                payload = encode(result, self.cfg.keyring, self._now_s())
                if self.ledger.claim(job_id, "cancelled", payload, self._now_ms()):
                    self._publish(self.cfg.topics.result(self.cfg.node, job_id), payload)
                    return
                seen = self.ledger.get(job_id)  # it came meanwhile
        if seen is not None:
            self._resend(job_id, seen)

    def _resend(self, job_id: str, seen: tuple[str, bytes | None]) -> None:
        """A job this node has seen before: its stored result goes out again, nothing runs."""
        state, stored = seen
        log.info("job %s: already %s here; re-sending its result", job_id, state)
        if stored is not None:
            self._publish(self.cfg.topics.result(self.cfg.node, job_id), stored)

    def accept(self, d: Dispatch, msg: Inbound | None) -> None:
        """Queue a dispatch to run, unless this node has seen its job id before."""
        with self._lock:
            seen = self.ledger.get(d.job_id)
            action = on_dispatch(d.job_id in self._active, seen)
            if action == "ignore":
                log.info("job %s: duplicate dispatch while queued or running; ignored", d.job_id)
            elif action == "resend":
                assert seen is not None
                self._resend(d.job_id, seen)
            else:
                self._active[d.job_id] = runner.RunControl()
        if action == "queue":
            self._pool.submit(self._run, d, msg)
        else:
            self._ack(msg)

    def _run(self, d: Dispatch, msg: Inbound | None) -> None:
        """Run one job once a slot is free: the start-by deadline and policy are checked now."""
        try:
            self._run_once(d, msg)
        except Exception:
            log.exception("job %s: could not be handled", d.job_id)
        finally:
            with self._lock:
                self._active.pop(d.job_id, None)
                self._live.pop(d.job_id, None)

    def _run_once(self, d: Dispatch, msg: Inbound | None) -> None:
        """One dispatched job, run at most once: checked before it starts, claimed in the
        ledger, reported running, checked once more, run, and its result reported."""
        if self.fatal is not None:  # stepped down before it started: left for the other agent
            return
        control = self._active[d.job_id]
        command, refusal = self._resolve(d.command)
        if self._ended_before_start(d, control, refusal, msg):
            return
        if not self.ledger.start(d.job_id, self._now_ms()):
            self._ack(msg)
            return  # another dispatch of it got here first
        started = self._report_running(d)
        live = self._live_output(d)
        # A cancel that came while it was being recorded: decided once more before it spawns.
        if self._ended_before_start(d, control, None, msg):
            return
        result = self._execute(d, command, control, live, started)
        log.info("job %s: %s (exit %s)", d.job_id, result.state, result.exit_code)
        self._finish(result, msg)

    def _resolve(self, command: str) -> tuple[str, Refused | None]:
        """The command to run as the policy resolves the one dispatched; or that one, and why
        the policy refuses it."""
        try:
            return self.cfg.policy.resolve(command), None
        except Refused as e:
            return command, e

    def _ended_before_start(
        self, d: Dispatch, control: runner.RunControl, refusal: Refused | None, msg: Inbound | None
    ) -> bool:
        """Whether the job ends without running (cancelled, too late, refused): then its result
        is reported."""
        ended = before_start(
            cancelled=control.cancelled,
            now_ms=self._now_ms(),
            start_by_ms=d.start_by_ms,
            refusal=refusal,
        )
        if ended is not None:
            self._not_run(d.job_id, ended, msg)
        return ended is not None

    def _report_running(self, d: Dispatch) -> int:
        """Publish that the job runs; when it started (ms)."""
        started = self._now_ms()
        running = self._result(d.job_id, "running", started_ms=started)
        self._publish(
            self.cfg.topics.result(d.node, d.job_id),
            encode(running, self.cfg.keyring, self._now_s()),
        )
        log.info("job %s: running (timeout %d s)", d.job_id, d.timeout_s)
        return started

    def _live_output(self, d: Dispatch) -> LiveOutput:
        """The job's live output, published as it is written; the main loop flushes it too."""
        live = LiveOutput(d.job_id, d.node, self._send_output)
        with self._lock:
            self._live[d.job_id] = live
        return live

    def _execute(
        self,
        d: Dispatch,
        command: str,
        control: runner.RunControl,
        live: LiveOutput,
        started_ms: int,
    ) -> Result:
        """Run the command to its end and make its result: `failed` if it could not be run."""
        try:
            r = runner.run(
                command,
                timeout_s=d.timeout_s,
                output_cap=self.cfg.output_cap,
                kill_grace_s=self.cfg.kill_grace_s,
                clock=self.clock,
                env=job_env(d.job_id, d.node, clean=self.cfg.clean_env, run_as=self.cfg.run_as),
                user=self.cfg.run_as,
                on_start=lambda pid: self._started(d.job_id, pid),
                control=control,
                on_output=live.write,
            )
            live.flush(final=True)
            return self._result(d.job_id, **{**outcome_of(r), "host": self._host_facts()})
        except Exception as e:  # the command could not even be started: report, never die
            log.exception("job %s: could not run", d.job_id)
            reason = f"could not run the command: {e}"[:1000]
            return self._result(
                d.job_id, "failed", started_ms=started_ms, finished_ms=self._now_ms(), reason=reason
            )

    def _not_run(self, job_id: str, ended: tuple[str, str], msg: Inbound | None) -> None:
        state, reason = ended
        log.warning("job %s: not run: %s", job_id, reason)
        self._finish(self._result(job_id, state, finished_ms=self._now_ms(), reason=reason), msg)

    def _send_output(self, chunk: Output) -> None:
        payload = encode(chunk, self.cfg.keyring, self._now_s())
        assert self.conn is not None
        self.conn.publish(self.cfg.topics.output(chunk.node, chunk.job_id), payload, qos=0)

    def flush_live_output(self) -> None:
        with self._lock:
            live = list(self._live.values())
        for out in live:
            out.flush()

    def _started(self, job_id: str, pid: int) -> None:
        try:
            started_at = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing would be left to clean up
        self.ledger.set_pid(job_id, pid, started_at)

    def _host_facts(self) -> dict[str, object]:
        """The node's state when a job ended; read at most once a second (psutil is not free)."""
        now = time.monotonic()
        if now - self._facts_at > 1.0:
            f = sysinfo.facts()
            keep = ("hostname", "uptime_s", "load_x100", "memory_available", "disk_free")
            self._facts, self._facts_at = {k: f[k] for k in keep}, now
        return self._facts

    # -- main loop
    def serve(self, conn: Connection, stop: threading.Event) -> None:
        """Run until `stop` is set. `conn` must be connected and subscribed to this node's jobs."""
        self.conn = conn
        self.publish_birth()
        self.report_interrupted()
        next_info = time.monotonic() + self.cfg.info_interval_s
        while not stop.is_set() and self.fatal is None:
            batch = conn.receive(FLUSH_EVERY_S, 1000)
            if batch:
                self.handle_batch(batch)
            self.flush_live_output()
            self.check_echo()
            if time.monotonic() >= next_info:
                next_info = time.monotonic() + self.cfg.info_interval_s
                topic = self.cfg.topics.node_info(self.cfg.node)
                self._publish(topic, self.info_payload(), retain=True)

    def busy(self) -> bool:
        """Whether a job is queued or running (a test steps the worker until it is not)."""
        with self._lock:
            return bool(self._active)

    def shutdown(self) -> None:
        """Wait for the jobs queued and running to end. Their results go out as they end; the
        connection is kept alive (and read) meanwhile."""
        self._pool.shutdown(wait=False, cancel_futures=False)
        while self.conn is not None:
            with self._lock:
                if not self._active:
                    break
            self.conn.pump(FLUSH_EVERY_S)
            self.flush_live_output()
        self._pool.shutdown(wait=True)
