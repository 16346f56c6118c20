"""The coordinator: validates and records every job, dispatches it, tracks it to a terminal state,
and answers queries. The only writer of job state."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opsbay_mqtt import states
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import (
    Dispatch,
    Execution,
    Job,
    JobEvent,
    Message,
    NodeInfo,
    NodeStatus,
    Query,
    Rejected,
    Reply,
    Result,
    Submit,
    decode,
    encode,
    peek_job_id,
)
from opsbay_mqtt.signing import Auth, Keyring, check_fresh, parse
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import REPLY_ID_RE, Topics
from opsbay_mqtt.transport import CONNECTED, Connection, Inbound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoordinatorConfig:
    topics: Topics
    keyring: Keyring
    allow_nodes: frozenset[str] | None = None
    window_s: int = 300
    lost_grace_s: int = 30
    keep_days: int = 30
    keep_jobs: int = 100_000
    max_open_per_node: int = 1000
    prune_every_s: float = 60.0
    tick_s: float = 0.25
    batch_max: int = 200


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    expiry_s: int | None = None


@dataclass
class Coordinator:
    cfg: CoordinatorConfig
    store: Store
    clock: Callable[[], float] = time.time
    outbox: list[Outgoing] = field(default_factory=list)
    next_prune: float = 0.0

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _send(self, topic: str, msg: Message, expiry_s: int | None = None) -> None:
        self.outbox.append(
            Outgoing(topic, encode(msg, self.cfg.keyring, int(self.clock())), False, expiry_s)
        )

    # -- one message, all or nothing
    def handle(self, msg: Inbound) -> None:
        """Handle one inbound message inside a savepoint: on any error nothing of it is kept."""
        if msg.topic == CONNECTED:
            return
        mark = len(self.outbox)
        try:
            with self.store.atomic():
                self._dispatch_by_topic(msg)
        except Exception:
            del self.outbox[mark:]
            log.exception("error handling a message on %s; nothing of it was kept", msg.topic)

    def _dispatch_by_topic(self, msg: Inbound) -> None:
        try:
            kind, fields = self.cfg.topics.parse(msg.topic)
        except Refused as e:
            log.warning("ignored a message on an unknown topic: %s", e)
            return
        if kind == "submit":
            self.on_submit(msg.payload)
        elif kind == "rpc_request":
            self.on_query(msg.payload)
        elif kind == "result":
            self.on_result(msg.payload, fields["node"], fields["job_id"])
        elif kind in ("node_info", "node_status"):
            self.on_node(msg.payload, fields["node"])

    def _fresh_once(self, auth: Auth) -> None:
        now = int(self.clock())
        check_fresh(auth, now, self.cfg.window_s)
        if not self.store.remember_nonce(auth.kid, auth.nonce, auth.ts):
            raise Refused("replay", "this message (key id and nonce) was already received")

    # -- submissions
    def on_submit(self, payload: bytes) -> None:
        try:
            sub, auth = decode(payload, self.cfg.keyring, expect=(Submit,))
            assert isinstance(sub, Submit)
            existing = self.store.get_job(sub.job_id)
            if existing is not None:
                self._resubmitted(sub, auth, existing)
                return
            self._fresh_once(auth)
        except Refused as e:
            self._reject(peek_job_id(payload), e)
            return
        now = self._now_ms()
        if self.cfg.allow_nodes is not None and sub.target not in self.cfg.allow_nodes:
            refusal = Refused("target_not_allowed", f"node {sub.target!r} may not be targeted here")
            self._store_rejected(sub, auth, now, refusal)
            return
        if self.store.open_count(sub.target) >= self.cfg.max_open_per_node:
            refusal = Refused(
                "queue_full",
                f"node {sub.target!r} already has {self.cfg.max_open_per_node} jobs pending or "
                "running; try again later",
            )
            self._store_rejected(sub, auth, now, refusal)
            return
        expired = now > sub.start_by_ms
        ex = Execution(
            node=sub.target,
            state="expired" if expired else "pending",
            dispatched_ms=None if expired else now,
            finished_ms=now if expired else None,
            reason="its start-by deadline had passed when it arrived" if expired else None,
        )
        job = Job(
            job_id=sub.job_id,
            state=states.job_state([ex.state]),
            target=sub.target,
            command=sub.command,
            timeout_s=sub.timeout_s,
            start_by_ms=sub.start_by_ms,
            submitted_ms=now,
            submitted_by=auth.kid,
            executions=[ex],
        )
        self.store.insert_job(job)
        log.info("job %s: accepted from %s for %s", job.job_id, auth.kid, sub.target)
        self._send(self.cfg.topics.job_events(job.job_id), JobEvent(job=job))
        if not expired:
            self._send_dispatch(job, sub.target)

    def _send_dispatch(self, job: Job, node: str) -> None:
        d = Dispatch(
            job_id=job.job_id,
            node=node,
            command=job.command,
            timeout_s=job.timeout_s,
            start_by_ms=job.start_by_ms,
        )
        expiry = max(1, (job.start_by_ms - self._now_ms()) // 1000 + 1)
        self._send(self.cfg.topics.node_jobs(node), d, expiry_s=expiry)

    def _resubmitted(self, sub: Submit, auth: Auth, job: Job) -> None:
        """A retried or redelivered submission: answer with the job as it stands."""
        same = (sub.target, sub.command, sub.timeout_s, auth.kid) == (
            job.target,
            job.command,
            job.timeout_s,
            job.submitted_by,
        )
        if not same:
            raise Refused("job_id_conflict", f"job {job.job_id} exists with different content")
        log.info("job %s: submitted again; answering with its current state", job.job_id)
        self._send(self.cfg.topics.job_events(job.job_id), JobEvent(job=job))

    def _store_rejected(self, sub: Submit, auth: Auth, now: int, e: Refused) -> None:
        job = Job(
            job_id=sub.job_id,
            state="rejected",
            target=sub.target,
            command=sub.command,
            timeout_s=sub.timeout_s,
            start_by_ms=sub.start_by_ms,
            submitted_ms=now,
            submitted_by=auth.kid,
            reason_code=e.code,
            reason=e.text,
        )
        self.store.insert_job(job)
        self._reject(sub.job_id, e)

    def _reject(self, job_id: str | None, e: Refused) -> None:
        log.warning("rejected a submission (job %s): %s", job_id or "?", e)
        msg = Rejected(job_id=job_id, code=e.code, reason=e.text[:1024])
        if job_id is not None:
            self._send(self.cfg.topics.job_events(job_id), msg)
        self._send(self.cfg.topics.rejected, msg)

    # -- results from workers
    def on_result(self, payload: bytes, topic_node: str, topic_job: str) -> None:
        try:
            res, _ = decode(payload, self.cfg.keyring, expect=(Result,))
            assert isinstance(res, Result)
            if (res.node, res.job_id) != (topic_node, topic_job):
                raise Refused("wrong_topic", "result names another node or job than its topic")
        except Refused as e:
            log.warning("refused a result on node %s job %s: %s", topic_node, topic_job, e)
            return
        now = self._now_ms()
        self.store.node_seen(res.node, now)
        job = self.store.get_job(res.job_id)
        ex = next((x for x in job.executions if x.node == res.node), None) if job else None
        if job is None or ex is None:
            log.warning("result for unknown execution %s on %s; ignored", res.job_id, res.node)
            return
        if not states.can_move(ex.state, res.state):
            log.info(
                "job %s on %s: %s after %s; ignored", res.job_id, res.node, res.state, ex.state
            )
            return
        fields: dict[str, Any] = {"state": res.state}
        if res.state == "running":
            fields["started_ms"] = res.started_ms
        else:
            fields.update(res.model_dump(exclude={"v", "type", "job_id", "node", "session"}))
            fields["started_ms"] = res.started_ms or ex.started_ms
        self._update(job, ex.model_copy(update=fields))

    def _update(self, job: Job, ex: Execution) -> None:
        self.store.upsert_execution(job.job_id, ex)
        execs = [ex if x.node == ex.node else x for x in job.executions]
        new_state = states.job_state(x.state for x in execs)
        if new_state != job.state:
            self.store.set_job_state(job.job_id, new_state)
        job = job.model_copy(update={"executions": execs, "state": new_state})
        log.info("job %s on %s: %s", job.job_id, ex.node, ex.state)
        self._send(self.cfg.topics.job_events(job.job_id), JobEvent(job=job))

    # -- node info and status (retained: no freshness check, ordered by session)
    def on_node(self, payload: bytes, topic_node: str) -> None:
        try:
            msg, _ = decode(payload, self.cfg.keyring, expect=(NodeInfo, NodeStatus))
            assert isinstance(msg, NodeInfo | NodeStatus)
            if msg.node != topic_node:
                raise Refused("wrong_topic", "node message names another node than its topic")
        except Refused as e:
            log.warning("refused a node message for %s: %s", topic_node, e)
            return
        if isinstance(msg, NodeStatus):
            self.store.node_seen(
                msg.node, msg.published_ms, state=msg.state, session=msg.session, seq=msg.seq
            )
        else:
            info = {"labels": msg.labels, "agent_version": msg.agent_version, "facts": msg.facts}
            self.store.node_seen(msg.node, msg.published_ms, info=info)

    # -- queries
    def on_query(self, payload: bytes) -> None:
        try:
            q, auth = decode(payload, self.cfg.keyring, expect=(Query,))
            assert isinstance(q, Query)
            self._fresh_once(auth)
        except Refused as e:
            log.warning("refused a query: %s", e)
            self._reply_refused(payload, e)
            return
        topic = self.cfg.topics.rpc_reply(q.reply_to)
        if q.query == "result":
            job = self.store.get_job(q.job_id) if q.job_id else None
            if job is None:
                error = f"no job {q.job_id!r}"
                reply = Reply(correlation=q.correlation, ok=False, code="not_found", error=error)
                self._send(topic, reply)
                return
            data: Any = job.model_dump(mode="json")
        elif q.query == "results":
            jobs = self.store.list_jobs(node=q.node, state=q.state, limit=q.limit)
            data = [j.model_dump(mode="json") for j in jobs]
        else:
            data = self.store.list_nodes()
        self._send(topic, Reply(correlation=q.correlation, ok=True, data=data))

    def _reply_refused(self, payload: bytes, e: Refused) -> None:
        try:
            obj = parse(payload)
        except Refused:
            return
        reply_to, corr = obj.get("reply_to"), obj.get("correlation")
        if isinstance(reply_to, str) and REPLY_ID_RE.fullmatch(reply_to) and isinstance(corr, str):
            reply = Reply(correlation=corr[:64], ok=False, code=e.code, error=e.text[:1024])
            self._send(self.cfg.topics.rpc_reply(reply_to), reply)

    # -- deadlines
    def tick(self) -> None:
        """Expire executions not started by their start-by deadline; mark `lost` those running
        past start + timeout + grace without a result."""
        now = self._now_ms()
        for job_id, timeout_s, start_by_ms, ex in self.store.open_executions():
            grace_ms = self.cfg.lost_grace_s * 1000
            # The worker decides first; the grace covers its clock and a late "running".
            if ex.state == "pending" and now > start_by_ms + grace_ms:
                reason = "not started by its start-by deadline (node offline?)"
                update = {"state": "expired", "finished_ms": now, "reason": reason}
            elif (
                ex.state == "running"
                and ex.started_ms is not None
                and now > ex.started_ms + timeout_s * 1000 + grace_ms
            ):
                reason = "no result from the node by start + timeout + grace"
                update = {"state": "lost", "finished_ms": now, "reason": reason}
            else:
                continue
            job = self.store.get_job(job_id)
            assert job is not None
            self._update(job, ex.model_copy(update=update))
        if self.clock() >= self.next_prune:
            self.next_prune = self.clock() + self.cfg.prune_every_s
            self.prune()

    def prune(self) -> None:
        """Bound the record: forget nonces older than the window, and finished jobs past the
        retention age or beyond the retention count."""
        self.store.forget_nonces_before(int(self.clock()) - self.cfg.window_s - 1)
        before_ms = self._now_ms() - self.cfg.keep_days * 86_400_000
        deleted = self.store.prune(before_ms=before_ms, keep=self.cfg.keep_jobs)
        if deleted:
            log.info("retention: deleted %d finished jobs", deleted)

    def redispatch_pending(self) -> None:
        """On start: dispatch again every execution still pending (a crash may have lost the
        first dispatch). Workers keep a ledger, so a duplicate never runs twice."""
        now = self._now_ms()
        for job_id, _, start_by_ms, ex in self.store.open_executions():
            if ex.state == "pending" and start_by_ms > now:
                job = self.store.get_job(job_id)
                assert job is not None
                self._send_dispatch(job, ex.node)


def serve(coord: Coordinator, conn: Connection, stop: threading.Event) -> None:
    """The coordinator's loop: take a batch, handle it, commit once, acknowledge, publish."""
    coord.redispatch_pending()
    next_tick = 0.0
    while not stop.is_set():
        batch: list[Inbound] = []
        try:
            batch.append(conn.inbox.get(timeout=coord.cfg.tick_s))
            while len(batch) < coord.cfg.batch_max:
                batch.append(conn.inbox.get_nowait())
        except queue.Empty:
            pass
        for msg in batch:
            coord.handle(msg)
        if time.monotonic() >= next_tick:
            next_tick = time.monotonic() + coord.cfg.tick_s
            mark = len(coord.outbox)
            try:
                with coord.store.atomic():
                    coord.tick()
            except Exception:
                del coord.outbox[mark:]
                log.exception("error in the deadline check")
        coord.store.commit()
        for msg in batch:
            conn.ack(msg)
        for out in coord.outbox:
            conn.publish(out.topic, out.payload, retain=out.retain, expiry_s=out.expiry_s)
        coord.outbox.clear()
