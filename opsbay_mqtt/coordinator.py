"""The coordinator: validates and records every job, dispatches it, tracks it to a terminal state,
and answers queries. The only writer of job state."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opsbay_mqtt import queries, states
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.policy import ClientPolicy
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
    encode_unsigned,
    peek,
)
from opsbay_mqtt.signing import Auth, Identity, Keyring, check_fresh
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import CONNECTED, Connection, Inbound

log = logging.getLogger(__name__)

MAX_EXPIRY_S = 2**31 - 1  # MQTT 5 message expiry is a 32-bit count of seconds


@dataclass(frozen=True)
class CoordinatorConfig:
    topics: Topics
    keyring: Keyring
    allow_nodes: frozenset[str] | None = None
    clients: Mapping[str, ClientPolicy] = field(default_factory=dict)
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

    def _send(
        self, topic: str, msg: Message, *, kid: str | None, expiry_s: int | None = None
    ) -> None:
        """Queue `msg` signed with `kid` (the reader's key), or unsigned when `kid` is None
        (a refusal for someone who proved no key we share)."""
        if kid is None:
            payload = encode_unsigned(msg)
        else:
            payload = encode(msg, self.cfg.keyring, int(self.clock()), kid=kid)
        self.outbox.append(Outgoing(topic, payload, False, expiry_s))

    # -- one message, all or nothing
    def handle(self, msg: Inbound) -> None:
        """Handle one inbound message inside a savepoint: on any error nothing of it is kept."""
        if msg.topic == CONNECTED:
            return
        mark = len(self.outbox)
        try:
            with self.store.atomic():
                self._route(msg)
        except Exception:
            del self.outbox[mark:]
            log.exception("error handling a message on %s; nothing of it was kept", msg.topic)

    def _route(self, msg: Inbound) -> None:
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

    # -- who may say what
    def _fresh_once(self, auth: Auth) -> None:
        check_fresh(auth, int(self.clock()), self.cfg.window_s)
        if not self.store.remember_nonce(auth.kid, auth.nonce, auth.ts):
            raise Refused("replay", "this message (key id and nonce) was already received")

    @staticmethod
    def _client(auth: Auth) -> str:
        """The requesting identity's name ("shared" for the shared key); node keys are refused."""
        if auth.identity is None:
            return "shared"
        if auth.identity.kind != "client":
            raise Refused(
                "wrong_identity",
                f"key {auth.kid!r} belongs to node {auth.identity.name!r}; "
                "a node key cannot submit or query",
            )
        return auth.identity.name

    @staticmethod
    def _require_node(auth: Auth, node: str) -> None:
        who = auth.identity
        if who is not None and (who.kind, who.name) != ("node", node):
            raise Refused(
                "wrong_identity",
                f"key {auth.kid!r} of {who.kind} {who.name!r} cannot speak for node {node!r}",
            )

    def _node_kid(self, node: str) -> str:
        """The key to sign a dispatch for `node` with: the one it last used, else its newest,
        else the shared key."""
        kids = self.cfg.keyring.kids_of(Identity("node", node))
        if kids:
            last_used = self.store.node_kid(node)
            return last_used if last_used in kids else kids[-1]
        shared = self.cfg.keyring.shared_kid
        if shared is None:
            raise Refused("unknown_node", f"there is no key for node {node!r}")
        return shared

    def _authorize(self, sub: Submit, client: str) -> None:
        if self.cfg.allow_nodes is not None and sub.target not in self.cfg.allow_nodes:
            raise Refused("target_not_allowed", f"node {sub.target!r} may not be targeted here")
        client_policy = self.cfg.clients.get(client)
        if client_policy is not None:
            labels = self.store.node_labels(sub.target)
            client_policy.check(client, sub.target, labels, sub.command)
        self._node_kid(sub.target)

    # -- submissions
    def on_submit(self, payload: bytes) -> None:
        auth: Auth | None = None
        try:
            sub, auth = decode(payload, self.cfg.keyring, expect=(Submit,))
            assert isinstance(sub, Submit)
            client = self._client(auth)
            existing = self.store.get_job(sub.job_id)
            if existing is not None:
                self._resubmitted(sub, client, auth, existing)
                return
            self._fresh_once(auth)
            now = self._now_ms()
            self._check_deadline(sub, now)
            if self.store.open_count(sub.target) >= self.cfg.max_open_per_node:
                raise Refused(
                    "queue_full",
                    f"node {sub.target!r} already has {self.cfg.max_open_per_node} jobs pending "
                    "or running; try again later",
                )
        except Refused as e:  # not stored: the same job id may be submitted again
            self._reject(payload, e, auth)
            return
        try:
            self._authorize(sub, client)
        except Refused as e:  # stored: the same submission would be refused again
            self._store_rejected(sub, client, auth, now, e)
            self._reject(payload, e, auth)
            return
        expired = now > sub.start_by_ms
        ex = Execution(
            node=sub.target,
            state="expired" if expired else "pending",
            dispatched_ms=None if expired else now,
            finished_ms=now if expired else None,
            reason="its start-by deadline had passed when it arrived" if expired else None,
        )
        job = self._job(sub, client, auth, now, executions=[ex])
        self.store.insert_job(job)
        log.info("job %s: accepted from %s for %s", job.job_id, client, sub.target)
        self._send_event(job)
        if not expired:
            self._send_dispatch(job, sub.target)

    def _check_deadline(self, sub: Submit, now_ms: int) -> None:
        if sub.start_by_ms > now_ms + MAX_EXPIRY_S // 2 * 1000:
            raise Refused("invalid", "start_by_ms is too far ahead (milliseconds expected)")

    @staticmethod
    def _job(sub: Submit, client: str, auth: Auth, now: int, **extra: Any) -> Job:
        return Job(
            job_id=sub.job_id,
            target=sub.target,
            command=sub.command,
            timeout_s=sub.timeout_s,
            start_by_ms=sub.start_by_ms,
            submitted_ms=now,
            submitted_by=client,
            submitted_kid=auth.kid,
            **{"state": states.job_state(x.state for x in extra.get("executions", [])), **extra},
        )

    def _send_dispatch(self, job: Job, node: str) -> None:
        d = Dispatch(
            job_id=job.job_id,
            node=node,
            command=job.command,
            timeout_s=job.timeout_s,
            start_by_ms=job.start_by_ms,
        )
        expiry = min(MAX_EXPIRY_S, max(1, (job.start_by_ms - self._now_ms()) // 1000 + 1))
        self._send(self.cfg.topics.node_jobs(node), d, kid=self._node_kid(node), expiry_s=expiry)

    def _send_event(self, job: Job) -> None:
        """The job as it stands, to its submitter (signed with the submitter's key) and watchers."""
        kid = job.submitted_kid if job.submitted_kid in self.cfg.keyring.keys else None
        self._send(self.cfg.topics.job_events(job.job_id), JobEvent(job=job), kid=kid)

    def _resubmitted(self, sub: Submit, client: str, auth: Auth, job: Job) -> None:
        """A retried or redelivered submission: answer with the job as it stands."""
        # Not the start-by deadline: a retry from another process computes its own.
        mine = (sub.target, sub.command, sub.timeout_s, client)
        theirs = (job.target, job.command, job.timeout_s, job.submitted_by)
        if mine != theirs:
            raise Refused("job_id_conflict", f"job {job.job_id} exists with different content")
        log.info("job %s: submitted again; answering with its current state", job.job_id)
        self._send_event(job)

    def _store_rejected(self, sub: Submit, client: str, auth: Auth, now: int, e: Refused) -> None:
        job = self._job(sub, client, auth, now, state="rejected", reason_code=e.code, reason=e.text)
        self.store.insert_job(job)

    def _reject(self, payload: bytes, e: Refused, auth: Auth | None) -> None:
        """Tell the submitter why. Signed with its key when it proved one; otherwise unsigned,
        and never on the topic of a job that exists (it would mislead that job's waiter)."""
        job_id, nonce = peek(payload)
        log.warning("rejected a submission (job %s): %s", job_id or "?", e)
        msg = Rejected(job_id=job_id, nonce=nonce, code=e.code, reason=e.text[:1024])
        kid = auth.kid if auth is not None else None
        exists = job_id is not None and self.store.get_job(job_id) is not None
        if job_id is not None and (not exists or (kid is not None and e.code != "job_id_conflict")):
            self._send(self.cfg.topics.job_events(job_id), msg, kid=kid)
        self._send(self.cfg.topics.rejected, msg, kid=kid)

    # -- results from workers
    def on_result(self, payload: bytes, topic_node: str, topic_job: str) -> None:
        try:
            res, auth = decode(payload, self.cfg.keyring, expect=(Result,))
            assert isinstance(res, Result)
            self._require_node(auth, topic_node)
            if (res.node, res.job_id) != (topic_node, topic_job):
                raise Refused("wrong_topic", "result names another node or job than its topic")
        except Refused as e:
            log.warning("refused a result on node %s job %s: %s", topic_node, topic_job, e)
            return
        self.store.node_seen(res.node, self._now_ms(), kid=auth.kid)
        job = self.store.get_job(res.job_id)
        ex = next((x for x in job.executions if x.node == res.node), None) if job else None
        if job is None or ex is None:
            log.warning("result for unknown execution %s on %s; ignored", res.job_id, res.node)
            return
        if not states.can_move(ex.state, res.state):
            log.info("job %s on %s: %s after %s; ignored", job.job_id, ex.node, res.state, ex.state)
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
        log.info("job %s on %s: %s", job.job_id, ex.node, ex.state)
        self._send_event(job.model_copy(update={"executions": execs, "state": new_state}))

    # -- node info and status (retained: no freshness check, ordered by session)
    def on_node(self, payload: bytes, topic_node: str) -> None:
        try:
            msg, auth = decode(payload, self.cfg.keyring, expect=(NodeInfo, NodeStatus))
            assert isinstance(msg, NodeInfo | NodeStatus)
            self._require_node(auth, topic_node)
            if msg.node != topic_node:
                raise Refused("wrong_topic", "node message names another node than its topic")
        except Refused as e:
            log.warning("refused a node message for %s: %s", topic_node, e)
            return
        seen, kid = msg.published_ms, auth.kid
        if isinstance(msg, NodeStatus):
            self.store.node_seen(
                msg.node, seen, kid=kid, state=msg.state, session=msg.session, seq=msg.seq
            )
        else:
            info = {"labels": msg.labels, "agent_version": msg.agent_version, "facts": msg.facts}
            self.store.node_seen(msg.node, seen, kid=kid, info=info)

    # -- queries
    def on_query(self, payload: bytes) -> None:
        auth: Auth | None = None
        try:
            q, auth = decode(payload, self.cfg.keyring, expect=(Query,))
            assert isinstance(q, Query)
            self._client(auth)
            self._fresh_once(auth)
        except Refused as e:
            log.warning("refused a query: %s", e)
            reply_to, correlation = queries.peek_reply(payload)
            if reply_to is not None:
                refused = Reply(correlation=correlation, ok=False, code=e.code, error=e.text[:1024])
                kid = auth.kid if auth is not None else None
                self._send(self.cfg.topics.rpc_reply(reply_to), refused, kid=kid)
            return
        reply = queries.answer(q, self.store)
        self._send(self.cfg.topics.rpc_reply(q.reply_to), reply, kid=auth.kid)

    # -- deadlines
    def tick(self) -> None:
        """Expire executions not started by start-by + grace; mark `lost` those running past
        start + timeout + grace without a result; now and then, prune the record."""
        now = self._now_ms()
        grace_ms = self.cfg.lost_grace_s * 1000
        for job_id, timeout_s, start_by_ms, ex in self.store.open_executions():
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
                try:
                    self._send_dispatch(job, ex.node)
                except Refused as e:  # e.g. the node's key was removed since
                    log.warning("job %s: cannot dispatch to %s again: %s", job_id, ex.node, e)


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
