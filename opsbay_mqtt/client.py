"""The submitting side: submit a job, wait for it, query the coordinator. Used by the CLI.

Requests are built and answers decoded with `protocol` (its plain checks: a CLI call that
imported pydantic would take twice as long to start)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

from opsbay_mqtt import signing, states
from opsbay_mqtt.errors import (
    BrokerError,
    BrokerRefused,
    NotAcknowledged,
    QueryFailed,
    Refused,
    WaitTimeout,
)
from opsbay_mqtt.protocol import (
    Cancel,
    Execution,
    Job,
    JobEvent,
    Output,
    Query,
    QueryKind,
    Rejected,
    Reply,
    ScheduleChange,
    ScheduleOp,
    Submit,
    Topic,
    decode,
    decode_unverified,
    record,
    replace,
    wire,
)
from opsbay_mqtt.settings import Settings
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics, new_job_id, validate_job_id, validate_node
from opsbay_mqtt.transport import CONNECTED, Brokers, BrokerURL, Connection, Inbound, TlsFiles

log = logging.getLogger(__name__)

POLL_EVERY_S = 5.0  # when no event arrives for this long, ask the coordinator directly
ACK_TIMEOUT_S = 60.0  # default: how long a submission is sent again until a coordinator takes it
ACK_WARN_S = 10.0  # then say on stderr that nobody has answered yet, and what to check
RESEND_FIRST_S, RESEND_MAX_S = 1.0, 8.0  # re-publish an unacknowledged request: 1, 2, 4, 8, 8 s
CONFIRM_S = 5.0  # after giving up, ask the coordinator once whether it has the job after all


CHECK_COORDINATOR = "Is `opsbay coordinator` running, with the same --broker and --prefix?"


class _Resends:
    """When to send a request nobody has answered again: at `next_at`, then `gap` later, the
    gap doubling up to 8 s."""

    def __init__(self, next_at: float, gap: float = RESEND_FIRST_S) -> None:
        self.next_at, self._delay = next_at, gap

    def due(self, now: float) -> bool:
        """Whether it is time to send again; if so, the next time is set."""
        if now < self.next_at:
            return False
        self.next_at, self._delay = now + self._delay, min(self._delay * 2, RESEND_MAX_S)
        return True


class _Asking:
    """A submission or cancel not yet acknowledged: when to send it again, when to say so,
    when to give up."""

    def __init__(self, msg: Submit | Cancel, now: float, give_up_s: float) -> None:
        self.msg = msg
        self.started = now
        self.resends = _Resends(now + RESEND_FIRST_S, gap=2 * RESEND_FIRST_S)
        self.warn_at = now + ACK_WARN_S if give_up_s > ACK_WARN_S else float("inf")
        self.give_up_at = now + give_up_s

    def due(self) -> float:
        return min(self.resends.next_at, self.warn_at, self.give_up_at)


class SubmitArgs(NamedTuple):
    """What someone asks to run, before a job id and an absolute deadline are chosen (the
    arguments of Client.submit, from the command line or a Cronicle job)."""

    target: str
    where: dict[str, str]
    command: str
    timeout_s: int
    start_by_s: int
    batch: str | None
    max_failures: str | None


class ClientConfig(NamedTuple):
    url: BrokerURL | Brokers  # one broker, or the list to try in turn
    topics: Topics
    keyring: Keyring
    tls: TlsFiles = TlsFiles()
    connect_timeout_s: float = 10.0

    @classmethod
    def of(cls, s: Settings) -> ClientConfig:
        return cls(url=s.brokers, topics=s.topics, keyring=s.keyring, tls=s.tls)


class Client:
    """One short-lived connection for a CLI call. Use as a context manager."""

    def __init__(
        self,
        cfg: ClientConfig,
        clock: Callable[[], float] = time.time,
        notice: Callable[[str], None] = log.warning,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.notice = notice  # what the caller should hear while it waits (the CLI: stderr)
        self.reply_id = "c" + signing.random_hex(8)
        self.conn = Connection(
            url=cfg.url, client_id=f"opsbay-cli-{self.reply_id}", tls=cfg.tls, log_refusals=False
        )
        self._reply_subscribed = False
        self._unacknowledged: dict[str, _Asking] = {}
        self._submitted: dict[str, Submit] = {}
        self._nonces: dict[str, set[str]] = {}
        self._views: dict[str, dict[str, Execution]] = {}
        self._totals: dict[str, int] = {}
        self._unverifiable_output = False  # said once: live output we cannot verify
        self._silent_since = 0.0  # when the coordinator stopped answering our queries

    def __enter__(self) -> Client:
        self.conn.connect(self.cfg.connect_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def _next(self, deadline: float) -> Inbound | None:
        self.conn.check_refused()  # a subscription the broker refused: say so now
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        got = self.conn.receive(min(left, POLL_EVERY_S), 1)
        return got[0] if got else None

    def _qos(self) -> int:
        """The QoS of this client's subscriptions: 1, or 0 on an MQTT 3.1.1 broker. There, a
        failed subscription has one code for every cause; NATS's MQTT gateway fails QoS 1
        subscriptions (each a JetStream consumer) for a while after one of its servers dies,
        which would read as the ACL refusing us. QoS 0 needs nothing of the sort, and loses
        nothing this client relies on: it asks again (queries, unacknowledged requests) and asks
        the coordinator when events stop or the connection comes back."""
        return 1 if self.conn.url.mqtt5 else 0

    def _where(self) -> str:
        where = f"broker {self.conn.url}, prefix {self.cfg.topics.prefix!r}"
        if not self.conn.url.mqtt5:  # MQTT 3.1.1 has no answer for a refused publish
            where += "; with MQTT 3.1.1 a broker whose ACL refuses this login drops it silently"
        return where

    # -- submit and wait
    def submit(
        self,
        *,
        target: str,
        command: str,
        timeout_s: int,
        start_by_s: int,
        job_id: str | None = None,
        where: dict[str, str] | None = None,
        batch: str | None = None,
        max_failures: str | None = None,
        follow: bool = False,
        accept_s: float = ACK_TIMEOUT_S,
    ) -> str:
        """Publish a submission (after subscribing to its events, and with `follow` to its
        live output); return the job id. `wait` publishes it again until a coordinator
        acknowledges it, for up to `accept_s`; a coordinator refuses it (`too_late`) after that,
        so a submission given up on never runs."""
        job_id = validate_job_id(job_id) if job_id else new_job_id()
        if not target and not where:
            raise Refused("bad_target", "give a target (--target), labels (--where), or both")
        for item in target.split(",") if target else []:
            if "*" not in item and "?" not in item:
                validate_node(item)
        msg = Submit(
            job_id=job_id,
            target=target,
            where=where or {},
            command=command,
            timeout_s=timeout_s,
            start_by_ms=int(self.clock() * 1000) + start_by_s * 1000,
            batch=batch,
            max_failures=max_failures,
            accept_by_ms=int(self.clock() * 1000 + accept_s * 1000),
        )
        qos = self._qos()
        topics = [(self.cfg.topics.job_events(job_id), qos), (self.cfg.topics.rejected, qos)]
        if follow:
            topics.append((self.cfg.topics.job_output(job_id), 0))
        self.conn.subscribe(topics, wait=False)
        self._unacknowledged[job_id] = _Asking(msg, time.monotonic(), accept_s)
        self._submitted[job_id] = msg
        self._publish_submit(msg)
        return job_id

    def expect_job(self, job_id: str) -> None:
        """Subscribe to the events of a job about to be made by someone else's request (a
        schedule run with an id chosen here), so that `wait` hears it from the start."""
        self.conn.subscribe([(self.cfg.topics.job_events(job_id), self._qos())], wait=False)

    def acknowledged(self, job_id: str) -> bool:
        """Whether a coordinator has acknowledged our submission (or cancel) of `job_id`."""
        return job_id not in self._unacknowledged

    def _keep_asking(self, job_id: str) -> Job | None:
        """While a submission or cancel is unacknowledged: send it again (1, 2, 4, 8 s apart:
        a broker drops what arrives before the coordinator subscribes), say after 10 s that
        nobody answers, and at its deadline give up, unless the coordinator, asked directly,
        has the job after all (then that job is returned)."""
        asking = self._unacknowledged.get(job_id)
        now = time.monotonic()
        if asking is None or now < asking.due():
            return None
        kind = "cancel" if isinstance(asking.msg, Cancel) else "submission"
        if now >= asking.give_up_at:
            job = None
            if kind == "submission":  # a late cancel is harmless: no need to ask
                try:
                    job = self.result(job_id, timeout_s=CONFIRM_S)
                except (QueryFailed, BrokerError):
                    job = None
            if job is not None:
                self._unacknowledged.pop(job_id, None)
                return job
            waited = now - asking.started
            if kind == "cancel":
                raise NotAcknowledged(
                    f"job {job_id}: no coordinator acknowledged the cancel within {waited:.0f} s "
                    f"({self._where()}); a coordinator that reads it later still applies it. "
                    f"{CHECK_COORDINATOR}"
                )
            raise NotAcknowledged(
                f"job {job_id}: no coordinator acknowledged the submission within {waited:.0f} s "
                f"({self._where()}); it will never run: a coordinator that reads it later "
                f"refuses it (too_late). {CHECK_COORDINATOR}"
            )
        if now >= asking.warn_at:
            asking.warn_at = float("inf")
            self.notice(
                f"job {job_id}: no coordinator has acknowledged the {kind} after "
                f"{now - asking.started:.0f} s ({self._where()}); still trying for "
                f"{asking.give_up_at - now:.0f} s. {CHECK_COORDINATOR}"
            )
        if asking.resends.due(now):
            log.info("job %s: not acknowledged yet; sending the %s again", job_id, kind)
            self._publish_submit(asking.msg)
        return None

    def _publish_submit(self, msg: Submit | Cancel) -> None:
        """A submission or cancel on `<prefix>/submit`, its nonce remembered (a refusal names
        it). Signed afresh each time: the coordinator knows the job id, so a retry never makes
        a second job."""
        nonce = signing.random_hex(16)
        self._nonces.setdefault(msg.job_id, set()).add(nonce)
        payload = signing.sign(wire(msg), self.cfg.keyring, int(self.clock()), nonce)
        self.conn.publish_wait(self.cfg.topics.submit, payload)

    def _job_message(self, msg: Inbound, job_id: str) -> Job | Rejected | None:
        if msg.topic not in (self.cfg.topics.job_events(job_id), self.cfg.topics.rejected):
            return None
        topic = self.cfg.topics.parse(msg.topic)
        try:
            decoded, _ = decode(msg.payload, self.cfg.keyring, (JobEvent, Rejected), topic)
        except Refused as e:
            # A refusal of a badly signed submission cannot be signed with a key we share. It is
            # taken unverified only when it names one of our own submissions (by its nonce); it
            # can only make us report failure, never success.
            rejected = _unverified(msg.payload, Rejected, topic)
            if (
                rejected is not None
                and rejected.job_id == job_id
                and rejected.nonce in self._nonces.get(job_id, ())
            ):
                return rejected
            if msg.topic != self.cfg.topics.rejected:  # that one carries everyone's refusals
                log.warning("ignored an unverifiable message about job %s: %s", job_id, e)
            return None
        if isinstance(decoded, Rejected):
            # Ours only if it names one of our submissions (another party may share our key).
            mine = decoded.nonce is None or decoded.nonce in self._nonces.get(job_id, ())
            return decoded if decoded.job_id == job_id and mine else None
        if decoded.job_id != job_id:
            return None
        return self._check_mine(self._merge(decoded.job, decoded.total))

    def _merge(self, job: Job, total: int) -> Job:
        """Events carry only the executions that changed: keep the whole picture."""
        known = self._views.setdefault(job.job_id, {})
        for ex in job.executions:
            known[ex.node] = ex
        self._totals[job.job_id] = total
        return replace(job, executions=sorted(known.values(), key=_by_node))

    def _complete(self, job: Job) -> Job:
        """The job with every execution: asks the coordinator when events were missed."""
        if len(job.executions) >= self._totals.get(job.job_id, 0):
            return job
        return self.result(job.job_id)

    def cancel(self, job_id: str, timeout_s: float = 10.0) -> Job | Rejected:
        """Ask the coordinator to cancel a job; return the job as it stands once it answers
        (the cancel is sent again until it does, for up to `timeout_s`)."""
        validate_job_id(job_id)
        qos = self._qos()
        self.conn.subscribe(
            [(self.cfg.topics.job_events(job_id), qos), (self.cfg.topics.rejected, qos)]
        )
        msg = Cancel(job_id=job_id)
        self._unacknowledged[job_id] = _Asking(msg, time.monotonic(), timeout_s)
        self._publish_submit(msg)
        return self.wait(job_id, None, until=lambda j: True)

    def _check_mine(self, job: Job) -> Job | Rejected:
        """A job we submitted must be what we submitted (not another under the same id)."""
        mine = self._submitted.get(job.job_id)
        if mine is not None and (mine.target, mine.command) != (job.target, job.command):
            return Rejected(
                job_id=job.job_id,
                code="job_id_conflict",
                reason=f"job {job.job_id} exists with different content",
            )
        return job

    def wait(
        self,
        job_id: str,
        timeout_s: float | None,
        until: Callable[[Job], bool] = lambda j: states.is_terminal(j.state),
        on_update: Callable[[Job], None] | None = None,
        on_output: Callable[[Output], None] | None = None,
    ) -> Job | Rejected:
        """Wait until the job satisfies `until` (default: terminal) or is rejected. With
        `on_output`, live output chunks (submit with follow=True) are passed on as they come.

        Each turn: keep asking while unacknowledged, take the next message, classify it once
        (`_classify`), act on it; when nothing comes for a while, ask the coordinator."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        last_heard = time.monotonic()
        self._silent_since = 0.0
        while True:
            confirmed = self._keep_asking(job_id)
            if confirmed is not None:  # not acknowledged, but the coordinator has it
                checked = self._check_mine(confirmed)
                if isinstance(checked, Rejected) or until(checked):
                    return checked
            asking = self._unacknowledged.get(job_id)
            msg = self._next(min(deadline, asking.due()) if asking else deadline)
            got = self._classify(msg, job_id, following=on_output is not None)
            if isinstance(got, Rejected):
                return got
            if isinstance(got, Job):
                last_heard = time.monotonic()
                if on_update is not None:
                    on_update(got)
                if until(got):
                    return self._complete(got) if states.is_terminal(got.state) else got
                continue
            if isinstance(got, Output):
                assert on_output is not None
                on_output(got)
                continue
            if got == "reconnected" and asking is not None:
                # The connection dropped before the coordinator acknowledged: send it again.
                log.info("job %s: reconnected before an acknowledgement; sending again", job_id)
                self._publish_submit(asking.msg)
            if got == "other":
                continue
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id}: gave up waiting after {timeout_s:g} s")
            if job_id in self._unacknowledged:
                continue  # not taken yet: sending it again is how we ask
            if got == "reconnected" or time.monotonic() - last_heard >= POLL_EVERY_S:
                # Reconnected, or quiet for a while: events may have been missed; ask.
                last_heard = time.monotonic()
                job = self._ask(job_id, deadline, timeout_s)
                answer = self._check_mine(job) if job is not None else None
                if answer is not None and (isinstance(answer, Rejected) or until(answer)):
                    return answer

    def _classify(
        self, msg: Inbound | None, job_id: str, following: bool
    ) -> Job | Rejected | Output | Literal["nothing", "reconnected", "other"]:
        """What the next message means for a wait on `job_id`, decided once: the job as it now
        stands, its rejection, a chunk of its live output; or nothing arrived, the connection
        came back, or a message that is not about this job (or could not be read)."""
        if msg is None:
            return "nothing"
        if msg.topic == CONNECTED:
            return "reconnected"
        if following and "/output/" in msg.topic:
            return self._output(msg, job_id) or "other"
        got = self._job_message(msg, job_id)
        if got is None:
            return "other"
        self._unacknowledged.pop(job_id, None)  # an answer about the job: acknowledged
        return got

    def _ask(self, job_id: str, deadline: float, timeout_s: float | None) -> Job | None:
        """The job as the coordinator has it; None when it does not know it yet, or does not
        answer (said once per outage, and when it answers again)."""
        try:
            job = self.result(job_id, timeout_s=min(10.0, deadline - time.monotonic()))
        except QueryFailed as e:
            if e.code != "not_found":
                raise
            return None
        except BrokerRefused:
            raise
        except BrokerError as e:
            if not self._silent_since:  # once per outage: why nothing is happening
                self._silent_since = time.monotonic()
                bound = "" if timeout_s is None else f" (for up to {timeout_s:g} s)"
                self.notice(
                    f"job {job_id}: the coordinator is not answering ({e}); still "
                    f"waiting for the job's outcome{bound}"
                )
            return None
        if self._silent_since:
            self.notice(f"job {job_id}: the coordinator answers again")
            self._silent_since = 0.0
        return job

    def _output(self, msg: Inbound, job_id: str) -> Output | None:
        try:
            chunk, _ = decode(
                msg.payload, self.cfg.keyring, Output, self.cfg.topics.parse(msg.topic)
            )
        except Refused as e:
            log.debug("ignored an output chunk on %s: %s", msg.topic, e)
            if e.code == "unknown_key" and not self._unverifiable_output:
                self._unverifiable_output = True
                self.notice(
                    f"job {job_id}: live output is signed with a node's own key, which this "
                    "client does not hold (per-identity keys): each node's output is shown "
                    "when it finishes, from its stored result"
                )
            return None
        return chunk if chunk.job_id == job_id else None

    # -- queries
    def query(self, query: QueryKind, timeout_s: float = 10.0, **params: Any) -> Any:
        """Ask the coordinator; its answer's data."""
        q = Query(query=query, reply_to=self.reply_id, correlation=signing.random_hex(8), **params)
        return self._request(q, timeout_s)

    def change_schedule(
        self, op: ScheduleOp, name: str, timeout_s: float = 10.0, **params: Any
    ) -> Any:
        """Ask the coordinator to change a schedule (add with `spec`, pause, resume, remove,
        run with `job_id`); its answer's data (the schedule as it now stands). Its change id
        stays the same when it is sent again, so a change made once is not made twice."""
        ch = ScheduleChange(
            op=op,
            name=name,
            change_id=signing.random_hex(16),
            reply_to=self.reply_id,
            correlation=signing.random_hex(8),
            **params,
        )
        return self._request(ch, timeout_s)

    def _request(self, request: Query | ScheduleChange, timeout_s: float) -> Any:
        """Send a request answered by a Reply; the reply's data. Sent again (1, 2, 4 s apart)
        until answered or `timeout_s` runs out: a request the broker dropped (no coordinator
        subscribed at that moment) is asked again; each copy is signed afresh, and only one
        answer is read."""
        if not self._reply_subscribed:
            replies = self.cfg.topics.rpc_reply(self.reply_id)
            self.conn.subscribe([(replies, self._qos())], wait=False)
            self._reply_subscribed = True
        correlation = request.correlation
        q = wire(request)
        deadline = time.monotonic() + timeout_s
        resends = _Resends(next_at=0.0)  # at once, then again while unanswered
        reply_topic = self.cfg.topics.rpc_reply(self.reply_id)
        stash: list[Inbound] = []
        try:
            while True:
                if resends.due(time.monotonic()):
                    self.conn.publish_wait(
                        self.cfg.topics.rpc_request,
                        signing.sign(q, self.cfg.keyring, int(self.clock())),
                        timeout_s=max(1.0, deadline - time.monotonic()),
                    )
                msg = self._next(min(deadline, resends.next_at))
                if msg is None:
                    if time.monotonic() >= deadline:
                        raise BrokerError(
                            f"no answer from the coordinator within {timeout_s:g} s "
                            f"({self._where()}). {CHECK_COORDINATOR}"
                        )
                    continue
                if msg.topic != reply_topic:
                    stash.append(msg)  # not ours to handle here; put back for wait()
                    continue
                reply = self._reply(msg.payload, self.cfg.topics.parse(msg.topic))
                if reply is None or reply.correlation != correlation:
                    continue
                if not reply.ok:
                    raise QueryFailed(reply.code or "error", reply.error or "refused")
                return reply.data
        finally:
            for m in stash:
                self.conn.inbox.put(m)

    def _reply(self, payload: bytes, topic: Topic) -> Reply | None:
        try:
            return decode(payload, self.cfg.keyring, Reply, topic)[0]
        except Refused:
            # As with rejections: an error reply to a badly signed query is taken unverified.
            reply = _unverified(payload, Reply, topic)
            return None if reply is None or reply.ok else reply

    def result(self, job_id: str, timeout_s: float = 10.0) -> Job:
        return _job(self.query("result", timeout_s, job_id=job_id))

    def results(self, timeout_s: float = 10.0, **filters: Any) -> list[Job]:
        data = self.query("results", timeout_s, **filters)
        if not isinstance(data, list):
            raise QueryFailed("invalid", "the coordinator's answer is not a list of jobs")
        return [_job(j) for j in data]

    def nodes(self, timeout_s: float = 10.0, **filters: Any) -> list[dict[str, Any]]:
        return list(self.query("nodes", timeout_s, **filters))


def _by_node(ex: Execution) -> str:
    return ex.node


_U = TypeVar("_U", Rejected, Reply)


def _unverified(payload: bytes, expect: type[_U], topic: Topic) -> _U | None:
    try:
        return decode_unverified(payload, expect, topic)
    except Refused:
        return None


def _job(data: Any) -> Job:
    try:
        return record(Job, data)
    except ValueError as e:
        raise QueryFailed("invalid", f"the coordinator's answer: {e}") from e
