"""The coordinator: validates and records every job, fans it out to its nodes, dispatches it,
tracks every execution to a terminal state, and answers queries. The only writer of job state."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from opsbay_mqtt import authz, queries, rollout, signing, states
from opsbay_mqtt.errors import Refused, StoreUnavailable
from opsbay_mqtt.inbound import CONNECTED, Inbound
from opsbay_mqtt.policy import ClientPolicy
from opsbay_mqtt.protocol import (
    Cancel,
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
    ScheduleChange,
    Submit,
    Topic,
    decode,
    outcome_of,
    peek,
    replace,
    spec_of,
    wire,
)
from opsbay_mqtt.record import Brief, Contention, Record
from opsbay_mqtt.scheduler import Scheduler
from opsbay_mqtt.signing import Auth, Keyring, check_fresh
from opsbay_mqtt.topics import Topics

log = logging.getLogger(__name__)

MAX_EXPIRY_S = 2**31 - 1  # MQTT 5 message expiry is a 32-bit count of seconds
CONTENTION_TRIES = 5  # a message handled alone that still meets `Contention`: then give up


@dataclass(frozen=True)
class CoordinatorConfig:
    topics: Topics
    keyring: Keyring
    allow_nodes: frozenset[str] | None = None
    clients: Mapping[str, ClientPolicy] = field(default_factory=dict)
    # The labels each node may claim ([nodes.NAME] in the key file): with per-identity keys a
    # node's labels come from here, never from the node alone (see `granted_labels`).
    node_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    window_s: int = 300
    lost_grace_s: int = 30
    keep_days: int = 30
    keep_jobs: int = 100_000
    max_open_per_node: int = 1000
    prune_every_s: float = 60.0
    tick_s: float = 0.25
    batch_max: int = 200


# A change to an execution: the state it had (None: new), and the execution as it becomes.
Change = tuple[str | None, Execution]


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    retain: bool = False
    expiry_s: int | None = None
    dispatch_of: str | None = None  # a dispatch: its job id
    first: bool = False  # a dispatch's first release: never sent before (a cancel may take it back)


@dataclass
class Coordinator:
    cfg: CoordinatorConfig
    store: Record
    clock: Callable[[], float] = time.time
    outbox: list[Outgoing] = field(default_factory=list)
    next_prune: float = 0.0
    scheduler: Scheduler = field(init=False)

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _send(
        self,
        topic: str,
        msg: Message,
        *,
        kid: str | None,
        expiry_s: int | None = None,
        dispatch_of: str | None = None,
        first: bool = False,
    ) -> None:
        """Queue `msg` signed with `kid` (the reader's key), or unsigned when `kid` is None
        (a refusal for someone who proved no key we share)."""
        body = wire(msg)
        if kid is None:
            payload = signing.canonical(body)
        else:
            payload = signing.sign(body, self.cfg.keyring, int(self.clock()), kid=kid)
        self.outbox.append(Outgoing(topic, payload, False, expiry_s, dispatch_of, first))

    # -- one message, all or nothing
    def handle(self, msg: Inbound) -> None:
        """Handle one inbound message inside a savepoint: on any error nothing of it is kept."""
        if msg.topic == CONNECTED:
            # Reconnected: the broker may have lost what it held for us and for the nodes.
            self.redispatch_pending()
            return
        before = list(self.outbox)  # a cancel may take back what an earlier message queued
        try:
            with self.store.atomic():
                self._route(msg)
        except (Contention, StoreUnavailable):  # the batch as a whole: not this message's fault
            self.outbox = before
            raise
        except Exception:
            self.outbox = before
            log.exception("error handling a message on %s; nothing of it was kept", msg.topic)

    def _route(self, msg: Inbound) -> None:
        try:
            kind, fields = self.cfg.topics.parse(msg.topic)
        except Refused as e:
            log.warning("ignored a message on an unknown topic: %s", e)
            return
        where = (kind, fields)
        if kind == "submit":
            self.on_submit(msg.payload, where)
        elif kind == "rpc_request":
            self.on_query(msg.payload, where)
        elif kind == "result":
            self.on_result(msg.payload, where)
        elif kind in ("node_info", "node_status"):
            self.on_node(msg.payload, where)

    def _fresh_once(self, auth: Auth) -> None:
        check_fresh(auth, int(self.clock()), self.cfg.window_s)
        if not self.store.remember_nonce(auth.kid, auth.nonce, auth.ts):
            raise Refused("replay", "this message (key id and nonce) was already received")

    def _node_kid(self, node: str) -> str:
        # Which key the node last used matters only when it has keys of its own.
        keyring = self.cfg.keyring
        last = self.store.node_kid(node) if keyring.identities else None
        return authz.node_kid(keyring, node, last)

    # -- submissions and cancels (both arrive on <prefix>/submit)
    def on_submit(self, payload: bytes, topic: Topic) -> None:
        """A submission or a cancel: admitted (refused, and not stored, if not), authorized
        (refused and stored as `rejected` if not), then accepted."""
        auth: Auth | None = None
        sub: Submit | Cancel | None = None
        try:
            sub, auth = decode(payload, self.cfg.keyring, (Submit, Cancel), topic)
            client = authz.client_name(auth)
            if isinstance(sub, Cancel):
                with self._once(auth):
                    self.on_cancel(sub, client, auth)
                return
            existing = self.store.get_job(sub.job_id, executions=False)
            if existing is not None:
                self._resubmitted(sub, client, existing)
                return
            with self._once(auth):
                now, nodes, known = self._admit(sub)
        except Refused as e:  # not stored: the same job id may be submitted again
            if e.code == "replay" and sub is not None and self._answered(sub):
                return
            self._reject(payload, e, auth)
            return
        try:
            self._authorize(sub.command, client, nodes, known)
        except Refused as e:  # stored: the same submission would be refused again
            self._store_rejected(sub, client, auth, now, e)
            self._reject(payload, e, auth)
            return
        self._accept(sub, client, auth, now, nodes)

    def _answered(self, request: Submit | Cancel) -> bool:
        """A request seen before, about a job that exists: with several coordinators that each
        receive every request (a broker without shared subscriptions), another one took it
        the moment before. Not a refusal: answer with the job as it stands (as a retry gets),
        and send again what the other one may have committed and not sent (`_resend_owed`)."""
        job = self.store.get_job(request.job_id)
        if job is None:
            return False
        log.info("job %s: a request another coordinator took; answering with its state", job.job_id)
        self._send_event(job, job.executions)
        self._resend_owed(job, cancels=isinstance(request, Cancel))
        return True

    def _resend_owed(self, job: Job, cancels: bool = False) -> None:
        """Send again the messages a change of this job called for, in case the coordinator
        that committed the change died before it sent them (another coordinator, or this one
        before a restart): the dispatch of every execution released and not started, or, for a
        cancel, the cancel to every node the job was sent to and has not ended on. A worker's
        ledger makes every copy harmless."""
        if not job.executions:
            job = self.store.get_job(job.job_id) or job
        now = self._now_ms()
        for ex in job.executions:
            if ex.dispatched_ms is None or states.is_terminal(ex.state):
                continue
            if cancels:
                msg = Cancel(job_id=job.job_id, node=ex.node)
                self._send(self.cfg.topics.node_jobs(ex.node), msg, kid=self._node_kid(ex.node))
            elif ex.state == "pending" and (ex.start_by_ms or 0) > now:
                self._send_dispatch(job, ex)

    @contextmanager
    def _once(self, auth: Auth) -> Iterator[None]:
        """Act on this signed message once (its nonce remembered); if the block refuses it,
        forget the nonce: sent again, the same bytes must get the real reason again, not
        `replay` (nothing was done that a replay could repeat)."""
        self._fresh_once(auth)
        try:
            yield
        except Refused:
            self.store.forget_nonce(auth.kid, auth.nonce)
            raise

    def _admit(self, sub: Submit) -> tuple[int, list[str], Mapping[str, Mapping[str, str]]]:
        """Whether the submission can be taken at all: in time, with sane deadlines, for nodes
        with room. (now, its nodes, the nodes' labels when resolving needed them); `Refused`."""
        now = self._now_ms()
        if sub.accept_by_ms is not None and now > sub.accept_by_ms:
            raise Refused(
                "too_late",
                f"arrived {now - sub.accept_by_ms} ms after the submitter stopped waiting for "
                "an acknowledgement (accept_by_ms); not run",
            )
        if sub.start_by_ms > now + MAX_EXPIRY_S // 2 * 1000:
            raise Refused("invalid", "start_by_ms is too far ahead (milliseconds expected)")
        known = self.store.node_labels_all() if rollout.needs_known(sub.target, sub.where) else {}
        nodes = rollout.resolve(sub.target, sub.where, known)
        self._room(nodes)
        return now, nodes, known

    def _room(self, nodes: list[str]) -> None:
        """Refused if a node has its fill of open jobs already."""
        for node in nodes:
            if self.store.open_count(node) >= self.cfg.max_open_per_node:
                raise Refused(
                    "queue_full",
                    f"node {node!r} already has {self.cfg.max_open_per_node} jobs pending "
                    "or running; try again later",
                )

    def _accept(self, sub: Submit, client: str, auth: Auth, now: int, nodes: list[str]) -> None:
        """Record the job with an execution per node, and release what the rollout allows."""
        if now > sub.start_by_ms:  # already too late: never sent, never run late
            why = "its start-by deadline had passed when it arrived"
            execs = [Execution(node=n, state="expired", finished_ms=now, reason=why) for n in nodes]
        else:
            execs = [Execution(node=n, state="pending") for n in nodes]
        job = self._job(sub, client, auth, now, state=states.job_state(x.state for x in execs))
        self.start(job, execs)

    def start(self, job: Job, execs: list[Execution]) -> bool:
        """Record a new job with its executions, release what its rollout allows, announce
        it; False if another coordinator recorded it first."""
        if not self.store.insert_job(job):  # its executions are written once, by _update
            log.info("job %s: accepted by another coordinator first", job.job_id)
            return False
        log.info(
            "job %s: accepted from %s for %d node(s)", job.job_id, job.submitted_by, len(execs)
        )
        self._update(job, [(None, x) for x in execs], announce=True, new=True)
        return True

    def _authorize(
        self, command: str, client: str, nodes: list[str], known: Mapping[str, Mapping[str, str]]
    ) -> None:
        """`known`: the nodes' labels when resolving the target needed them all already."""
        policy = self.cfg.clients.get(client)
        for node in nodes:
            if self.cfg.allow_nodes is not None and node not in self.cfg.allow_nodes:
                raise Refused("target_not_allowed", f"node {node!r} may not be targeted here")
            if policy is not None:
                labels = known.get(node, {}) if known else self.store.node_labels(node)
                policy.check(client, node, labels, command)
            self._node_kid(node)

    @staticmethod
    def _job(sub: Submit, client: str, auth: Auth, now: int, **extra: Any) -> Job:
        recorded = {"submitted_ms": now, "submitted_by": client, "submitted_kid": auth.kid}
        return Job(**spec_of(sub), **{"state": "pending", **recorded, **extra})

    def _resubmitted(self, sub: Submit, client: str, job: Job) -> None:
        """A retried or redelivered submission: answer with the job as it stands."""
        # Not the start-by deadline: a retry from another process computes its own.
        mine, theirs = spec_of(sub), spec_of(job)
        del mine["start_by_ms"], theirs["start_by_ms"]
        if mine != theirs or client != job.submitted_by:
            raise Refused("job_id_conflict", f"job {job.job_id} exists with different content")
        log.info("job %s: submitted again; answering with its current state", job.job_id)
        job = self.store.get_job(job.job_id)  # type: ignore[assignment]
        self._send_event(job, job.executions)
        self._resend_owed(job)

    def _store_rejected(self, sub: Submit, client: str, auth: Auth, now: int, e: Refused) -> None:
        job = self._job(sub, client, auth, now, state="rejected", reason_code=e.code, reason=e.text)
        self.store.insert_job(job)

    def _reject(self, payload: bytes, e: Refused, auth: Auth | None) -> None:
        """Tell the submitter why. Signed with its key when it proved one; otherwise unsigned,
        and never on the topic of a job that exists (it would mislead that job's waiter)."""
        job_id, nonce = peek(payload)
        log.warning("refused a request (job %s): %s", job_id or "?", e)
        msg = Rejected(job_id=job_id, nonce=nonce, code=e.code, reason=e.text[:1024])
        kid = auth.kid if auth is not None else e.kid
        exists = job_id is not None and self.store.get_job(job_id, executions=False) is not None
        authenticated = kid is not None and e.code not in ("job_id_conflict", "not_yours")
        if job_id is not None and (not exists or authenticated):
            self._send(self.cfg.topics.job_events(job_id), msg, kid=kid)
        self._send(self.cfg.topics.rejected, msg, kid=kid)

    def on_cancel(self, cancel: Cancel, client: str, auth: Auth) -> None:
        self.store.lock_job(cancel.job_id)  # read and changed by one coordinator at a time
        job = self.store.get_job(cancel.job_id)
        if job is None:
            raise Refused("not_found", f"no job {cancel.job_id!r}")
        if client not in (job.submitted_by, "shared"):
            raise Refused("not_yours", f"job {job.job_id} was submitted by {job.submitted_by!r}")
        now = self._now_ms()
        reason = f"cancelled by {client}"
        changed = []
        for ex in job.executions:
            unsent = ex.dispatched_ms is None or (
                ex.state == "pending" and self._take_back_dispatch(job.job_id, ex.node)
            )
            if ex.state == "pending" and unsent:
                changed.append(
                    (ex.state, replace(ex, state="cancelled", finished_ms=now, reason=reason))
                )
            elif not states.is_terminal(ex.state):  # the node decides: it may be running already
                msg = Cancel(job_id=job.job_id, node=ex.node)
                self._send(self.cfg.topics.node_jobs(ex.node), msg, kid=self._node_kid(ex.node))
        log.info("job %s: cancel requested by %s", job.job_id, client)
        self._update(job, changed, announce=True)

    # -- results from workers
    def on_result(self, payload: bytes, topic: Topic) -> None:
        try:
            res, auth = decode(payload, self.cfg.keyring, Result, topic)
            authz.require_node(auth, res.node)
        except Refused as e:
            log.warning("refused a result on %s: %s", topic[1], e)
            return
        self.store.node_seen(res.node, self._now_ms(), kid=auth.kid)
        self.store.lock_job(res.job_id)  # read and changed by one coordinator at a time
        job = self.store.get_job(res.job_id, executions=False)
        ex = self.store.execution(res.job_id, res.node) if job else None
        if job is None or ex is None:
            log.warning("result for unknown execution %s on %s; ignored", res.job_id, res.node)
            return
        if job.batch is not None and (ex.state == res.state or states.is_terminal(ex.state)):
            # Seen before, here or by another coordinator, which may have died before sending
            # the rollout's next batch that this result released.
            self._resend_owed(job)
        if res.state == "running":
            fields: dict[str, Any] = {"state": res.state, "started_ms": res.started_ms}
        else:
            fields = outcome_of(res)
            fields["started_ms"] = res.started_ms or ex.started_ms
        self._update(job, [(ex.state, replace(ex, **fields))])

    @staticmethod
    def _allowed(job_id: str, changes: Iterable[Change]) -> Iterator[Change]:
        """The one transition guard: every change to an execution passes here (results,
        cancels, deadlines, the rollout's releases and cancels), as (state before, execution
        after). A change the states do not allow (a result after a terminal state, `running`
        after `succeeded`) is dropped and logged; terminal states never change, not even to
        themselves. `None` before: a new execution."""
        for before, x in changes:
            if (
                before is None
                or (before == x.state and not states.is_terminal(before))
                or states.can_move(before, x.state)
            ):
                yield before, x
            else:
                log.info("job %s on %s: %s after %s; not changed", job_id, x.node, x.state, before)

    def _update(
        self, job: Job, changed: Iterable[Change], announce: bool = False, new: bool = False
    ) -> None:
        """Record changed executions (each with the state it had), take the rollout's next
        step, and tell the submitter. `new`: the job was just accepted and `changed` holds all
        its executions. Every change passes the transition guard (`_allowed`)."""
        touched = {x.node: (before, x) for before, x in self._allowed(job.job_id, changed)}
        step = self._rollout_step(job, touched, new)
        job, counts, written = self._persist(job, touched)
        for node in step.dispatch:
            if node in written:
                self._send_dispatch(job, written[node], first=True)
        if announce:
            written = {**{x.node: x for x in job.executions}, **written}
        if written:
            self._send_event(job, written.values(), counts)

    def _rollout_step(self, job: Job, touched: dict[str, Change], new: bool) -> rollout.Step:
        """The executions the rollout releases now and those it cancels (too many failed),
        applied to `touched`.

        Only the changed executions are read and written in full. The others are read as briefs
        (node, state, dispatch time) only while the rollout holds some back, and otherwise only
        counted per state in SQL, so a result for a job on many nodes stays cheap."""
        # Without a batch size, every execution is released when the job is accepted: only
        # a rollout in batches holds some back afterwards.
        if not any(rollout.is_held(x) for _, x in touched.values()) and not (
            job.batch is not None and self.store.has_held(job.job_id)
        ):
            return rollout.Step([], [])
        briefs = {} if new else {b.node: b for b in self.store.briefs(job.job_id)}
        briefs.update(
            {x.node: Brief(x.node, x.state, x.dispatched_ms) for _, x in touched.values()}
        )
        step = rollout.next_step(briefs.values(), job.batch, job.max_failures)
        now = self._now_ms()
        start_by_after = max(0, job.start_by_ms - job.submitted_ms)
        released = {"dispatched_ms": now, "start_by_ms": now + start_by_after}
        stopped = {
            "state": "cancelled",
            "finished_ms": now,
            "reason": f"not started: more than {job.max_failures} executions failed",
        }
        for nodes, update in ((step.dispatch, released), (step.cancel, stopped)):
            for node in nodes:
                if node in touched:
                    was, base = touched[node]
                else:
                    found = self.store.execution(job.job_id, node)
                    assert found is not None
                    was, base = found.state, found
                for _, x in self._allowed(job.job_id, [(base.state, replace(base, **update))]):
                    touched[node] = (was, x)
        return step

    def _persist(
        self, job: Job, touched: dict[str, Change]
    ) -> tuple[Job, dict[str, int], dict[str, Execution]]:
        """Write each changed execution, guarded (only from the state it was read in), and the
        job's state that follows; (the job in that state, the count of its executions in each
        state, the executions written). A change whose guard fails (another coordinator
        changed the execution first) is dropped with its consequences."""
        took = self.store.write_executions(job.job_id, list(touched.values()))
        written = {}
        for node, (_, ex) in touched.items():
            if node not in took:
                log.info("job %s on %s: changed by another coordinator first", job.job_id, node)
                continue
            written[node] = ex
            level = logging.INFO if states.is_terminal(ex.state) else logging.DEBUG
            log.log(level, "job %s on %s: %s", job.job_id, ex.node, ex.state)
        counts = self.store.state_counts(job.job_id)
        new_state = states.job_state(counts)
        if new_state != job.state:
            self.store.set_job_state(job.job_id, new_state)
        return replace(job, state=new_state), counts, written

    def _send_dispatch(self, job: Job, ex: Execution, first: bool = False) -> None:
        """`first`: released now, never sent before (a copy sent again is not)."""
        assert ex.start_by_ms is not None
        d = Dispatch(
            job_id=job.job_id,
            node=ex.node,
            command=job.command,
            timeout_s=job.timeout_s,
            start_by_ms=ex.start_by_ms,
        )
        expiry = min(MAX_EXPIRY_S, max(1, (ex.start_by_ms - self._now_ms()) // 1000 + 1))
        topic, kid = self.cfg.topics.node_jobs(ex.node), self._node_kid(ex.node)
        self._send(topic, d, kid=kid, expiry_s=expiry, dispatch_of=job.job_id, first=first)

    def _take_back_dispatch(self, job_id: str, node: str) -> bool:
        """Drop the dispatch of `job_id` to `node` if its *first* release is still in the outbox
        (the submission and its cancel came in one batch, as after a coordinator restart): then
        it was never sent, so the node cannot start what was cancelled before it saw it. A copy
        sent again (on start, on reconnection, when the node comes online) is no proof: the
        node may hold the first one; then the node must get the cancel."""
        topic = self.cfg.topics.node_jobs(node)
        mine = [o for o in self.outbox if o.dispatch_of == job_id and o.topic == topic]
        if not any(o.first for o in mine):
            return False
        self.outbox = [o for o in self.outbox if not (o.dispatch_of == job_id and o.topic == topic)]
        return True

    def _send_event(
        self, job: Job, changed: Iterable[Execution], counts: dict[str, int] | None = None
    ) -> None:
        """The job's state, the executions that changed, and the count in each state: to its
        submitter (signed with the submitter's key) and to watchers."""
        if counts is None:
            counts = dict(Counter(x.state for x in job.executions))
        shown = queries.fit(replace(job, executions=list(changed)))
        event = JobEvent(job=shown, counts=dict(counts), total=sum(counts.values()))
        kid = job.submitted_kid if job.submitted_kid in self.cfg.keyring.keys else None
        self._send(self.cfg.topics.job_events(job.job_id), event, kid=kid)

    # -- node info and status (retained: no freshness check, ordered by session)
    def on_node(self, payload: bytes, topic: Topic) -> None:
        try:
            msg, auth = decode(payload, self.cfg.keyring, (NodeInfo, NodeStatus), topic)
            authz.require_node(auth, msg.node)
        except Refused as e:
            log.warning("refused a node message for %s: %s", topic[1]["node"], e)
            return
        seen, kid = msg.published_ms, auth.kid
        if isinstance(msg, NodeStatus) and msg.state == "conflict":
            self.store.node_seen(msg.node, seen, kid=kid)
            text = msg.reason or "two agents use this node name"
            self.store.node_conflict(msg.node, self._now_ms(), text, msg.session)
            log.error("node %s: %s", msg.node, text)
        elif isinstance(msg, NodeStatus):
            recorded = self.store.node_seen(
                msg.node, seen, kid=kid, state=msg.state, session=msg.session, seq=msg.seq
            )
            if recorded and msg.state == "online":
                # The node (re)connected: what the broker did not keep for it (a node never
                # seen before, a broker restarted without its data) must reach it now.
                self.redispatch_pending(msg.node)
        else:
            labels, refused = granted_labels(auth, msg.labels, self.cfg.node_labels.get(msg.node))
            if refused:
                log.warning(
                    "node %s claims label(s) its key file entry does not grant; ignored: %s",
                    msg.node,
                    ", ".join(f"{k}={v}" for k, v in sorted(refused.items())),
                )
            info: dict[str, Any] = {
                "labels": labels,
                "agent_version": msg.agent_version,
                "facts": msg.facts,
            }
            if refused:
                info["refused_labels"] = refused
            self.store.node_seen(msg.node, seen, kid=kid, info=info)

    # -- queries
    def on_query(self, payload: bytes, topic: Topic) -> None:
        """A query, or a schedule change (both are answered with a Reply)."""
        auth: Auth | None = None
        try:
            q, auth = decode(payload, self.cfg.keyring, (Query, ScheduleChange), topic)
            client = authz.client_name(auth)
            self._fresh_once(auth)
            if isinstance(q, ScheduleChange):
                reply = self.scheduler.change(q, client, auth)
            elif q.query in ("schedules", "schedule"):
                reply = self.scheduler.answer(q)
            else:
                reply = queries.answer(q, self.store)
        except Refused as e:
            if e.code == "replay":
                # Seen before: answered already, by this coordinator or another one that got
                # it too (a broker without shared subscriptions). A second, refusing answer
                # could reach the client first; a replay by anyone else needs none.
                log.info("a query already answered; not answered again")
                return
            log.warning("refused a query: %s", e)
            reply_to, correlation = queries.peek_reply(payload)
            if reply_to is not None:
                refused = Reply(correlation=correlation, ok=False, code=e.code, error=e.text[:1024])
                kid = auth.kid if auth is not None else e.kid
                self._send(self.cfg.topics.rpc_reply(reply_to), refused, kid=kid)
            return
        self._send(self.cfg.topics.rpc_reply(q.reply_to), reply, kid=auth.kid)

    # -- deadlines
    def tick(self) -> None:
        """Expire executions not started by start-by + grace; mark `lost` those running past
        start + timeout + grace without a result; now and then, prune the record."""
        now = self._now_ms()
        grace_ms = self.cfg.lost_grace_s * 1000
        for job_id, node in self.store.overdue(now, grace_ms):
            self.store.lock_job(job_id)  # another coordinator may be at the same deadline
            job = self.store.get_job(job_id, executions=False)
            ex = self.store.execution(job_id, node)
            if job is None or ex is None or states.is_terminal(ex.state):
                continue  # pruned, or ended, since the list was read
            if ex.state == "pending":  # the worker decides first; the grace covers its clock
                reason = "not started by its start-by deadline (node offline?)"
                update = {"state": "expired", "finished_ms": now, "reason": reason}
            else:
                reason = "no result from the node by start + timeout + grace"
                update = {"state": "lost", "finished_ms": now, "reason": reason}
            self._update(job, [(ex.state, replace(ex, **update))])
        self.scheduler.fire_due()  # after the deadlines: a run that just ended is not running
        if self.clock() >= self.next_prune:
            self.next_prune = self.clock() + self.cfg.prune_every_s
            self.prune()

    def prune(self) -> None:
        """Bound the record: forget nonces older than the window, and finished jobs past the
        retention age or beyond the retention count."""
        self.store.forget_nonces_before(int(self.clock()) - self.cfg.window_s - 1)
        before_ms = self._now_ms() - self.cfg.keep_days * 86_400_000
        deleted = self.store.prune(before_ms=before_ms, keep=self.cfg.keep_jobs)
        self.scheduler.prune(before_ms)
        if deleted:
            log.info("retention: deleted %d finished jobs", deleted)

    def redispatch_pending(self, node: str | None = None) -> None:
        """Dispatch again what was sent to `node` (default: every node) and has not started:
        on start (a crash may have lost the first dispatch), when the coordinator reconnects,
        and when a node comes online (the broker keeps nothing for a node it never saw, nor
        after losing its data). Workers keep a ledger, so a duplicate never runs twice; for a
        job that ran, the node sends its stored result again. A running execution is never
        sent again: a node that lost its ledger would run it a second time."""
        now = self._now_ms()
        again = self.store.redispatchable(now, node)
        if again:
            log.info("sending %d unfinished dispatch(es) again to %s", len(again), node or "nodes")
        for job_id, to in again:
            job = self.store.get_job(job_id, executions=False)
            ex = self.store.execution(job_id, to)
            assert job is not None and ex is not None
            try:
                self._send_dispatch(job, ex)
            except Refused as e:  # e.g. the node's key was removed since
                log.warning("job %s: cannot dispatch to %s again: %s", job_id, to, e)


def granted_labels(
    auth: Auth, claimed: Mapping[str, str], granted: Mapping[str, str] | None
) -> tuple[dict[str, str], dict[str, str]]:
    """(the labels a node gets, the ones it claimed and does not get). A node that signs with
    its own key gets only what it claims *and* the coordinator's key file grants it (a stolen
    node key must not attract jobs meant for other roles). The shared secret can do anything
    anyway: what it claims stands."""
    if auth.identity is None or auth.identity.kind != "node":
        return dict(claimed), {}
    allowed = granted or {}
    kept = {k: v for k, v in claimed.items() if allowed.get(k) == v}
    return kept, {k: v for k, v in claimed.items() if k not in kept}


def step(coord: Coordinator, batch: list[Inbound], tick_due: bool) -> list[Outgoing]:
    """One turn of the coordinator's loop, without I/O: handle a batch, run the deadline check
    when it is due, commit once; what to publish. The caller acknowledges the batch (after this
    commit) and publishes (`daemons.serve_coordinator`).

    When another coordinator on the same record waits on this batch while holding what it
    needs (`Contention`), the batch is rolled back and handled again one message, one commit,
    at a time: no message is dropped, and no change is made twice."""
    try:
        return _turn(coord, batch, tick_due)
    except Contention:
        coord.store.rollback()
        coord.outbox = []
        log.info("another coordinator holds what this batch needs; one message at a time")
    out: list[Outgoing] = []
    for msg in batch:
        for attempt in range(1, CONTENTION_TRIES + 1):
            try:
                out += _turn(coord, [msg], tick_due=False)
                break
            except Contention:
                coord.store.rollback()
                coord.outbox = []
                if attempt == CONTENTION_TRIES:
                    raise
    return out


def _turn(coord: Coordinator, batch: list[Inbound], tick_due: bool) -> list[Outgoing]:
    for msg in batch:
        coord.handle(msg)
    if tick_due:
        mark = len(coord.outbox)
        try:
            with coord.store.atomic():
                coord.tick()
        except Contention:  # another coordinator is at the same deadlines: the next tick
            del coord.outbox[mark:]
            log.info("deadline check: another coordinator holds those jobs; next time")
        except Exception:
            del coord.outbox[mark:]
            log.exception("error in the deadline check")
    coord.store.commit()
    out, coord.outbox = coord.outbox, []
    return out
