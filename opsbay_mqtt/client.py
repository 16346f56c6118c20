"""The submitting side: submit a job, wait for it, query the coordinator. Used by the CLI.

It builds its requests and reads the coordinator's answers as plain data (`records`), checked
after their signature, without pydantic: the coordinator validates every request it gets, and a
CLI call that imported pydantic would take twice as long to start. Only live output (`--follow`)
is read through the `protocol` models."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from opsbay_mqtt import signing, states
from opsbay_mqtt.errors import (
    BrokerError,
    BrokerRefused,
    NotAcknowledged,
    QueryFailed,
    Refused,
    WaitTimeout,
)
from opsbay_mqtt.records import (
    PROTOCOL_VERSION,
    Execution,
    Job,
    Rejection,
    job_from_wire,
    message_body,
    rejection_from_wire,
    replace,
)
from opsbay_mqtt.settings import Settings
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics, new_job_id, validate_job_id, validate_node
from opsbay_mqtt.transport import CONNECTED, BrokerURL, Connection, Inbound, TlsFiles

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import Output

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

    def __init__(self, msg: dict[str, Any], now: float, give_up_s: float) -> None:
        self.msg = msg
        self.started = now
        self.resends = _Resends(now + RESEND_FIRST_S, gap=2 * RESEND_FIRST_S)
        self.warn_at = now + ACK_WARN_S if give_up_s > ACK_WARN_S else float("inf")
        self.give_up_at = now + give_up_s

    def due(self) -> float:
        return min(self.resends.next_at, self.warn_at, self.give_up_at)


class ClientConfig(NamedTuple):
    url: BrokerURL
    topics: Topics
    keyring: Keyring
    tls: TlsFiles = TlsFiles()
    connect_timeout_s: float = 10.0

    @classmethod
    def of(cls, s: Settings) -> ClientConfig:
        return cls(url=s.url, topics=s.topics, keyring=s.keyring, tls=s.tls)


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
        self._submitted: dict[str, dict[str, Any]] = {}
        self._nonces: dict[str, set[str]] = {}
        self._views: dict[str, dict[str, Execution]] = {}
        self._totals: dict[str, int] = {}
        self._unverifiable_output = False  # said once: live output we cannot verify

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

    def _where(self) -> str:
        where = f"broker {self.cfg.url}, prefix {self.cfg.topics.prefix!r}"
        if not self.cfg.url.mqtt5:  # MQTT 3.1.1 has no answer for a refused publish
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
        msg = {
            "v": PROTOCOL_VERSION,
            "type": "submit",
            "job_id": job_id,
            "target": target,
            "where": where or {},
            "command": command,
            "timeout_s": timeout_s,
            "start_by_ms": int(self.clock() * 1000) + start_by_s * 1000,
            "batch": batch,
            "max_failures": max_failures,
            "accept_by_ms": int(self.clock() * 1000 + accept_s * 1000),
        }
        topics = [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        if follow:
            topics.append((self.cfg.topics.job_output(job_id), 0))
        self.conn.subscribe(topics, wait=False)
        self._unacknowledged[job_id] = _Asking(msg, time.monotonic(), accept_s)
        self._submitted[job_id] = msg
        self._publish_submit(msg)
        return job_id

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
        kind = "cancel" if asking.msg["type"] == "cancel" else "submission"
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

    def _publish_submit(self, msg: dict[str, Any]) -> None:
        """A submission or cancel on `<prefix>/submit`, its nonce remembered (a refusal names
        it). Signed afresh each time: the coordinator knows the job id, so a retry never makes
        a second job."""
        nonce = signing.random_hex(16)
        self._nonces.setdefault(msg["job_id"], set()).add(nonce)
        payload = signing.sign(msg, self.cfg.keyring, int(self.clock()), nonce)
        self.conn.publish_wait(self.cfg.topics.submit, payload)

    def _read(self, payload: bytes, *kinds: str) -> dict[str, Any]:
        """Parse and verify a message of one of `kinds`; its body. Every failure is `Refused`."""
        obj = signing.parse(payload)
        auth = signing.verify(obj, self.cfg.keyring)
        return _body(obj, kinds, auth.kid)

    def _job_message(self, msg: Inbound, job_id: str) -> Job | Rejection | None:
        if msg.topic not in (self.cfg.topics.job_events(job_id), self.cfg.topics.rejected):
            return None
        try:
            body = self._read(msg.payload, "job", "rejected")
            decoded = _rejection(body) if body["type"] == "rejected" else _job_event(body)
        except Refused as e:
            # A refusal of a badly signed submission cannot be signed with a key we share. It is
            # taken unverified only when it names one of our own submissions (by its nonce); it
            # can only make us report failure, never success.
            rejected = _unverified_rejection(msg.payload)
            if (
                rejected is not None
                and rejected.job_id == job_id
                and rejected.nonce in self._nonces.get(job_id, ())
            ):
                return rejected
            if msg.topic != self.cfg.topics.rejected:  # that one carries everyone's refusals
                log.warning("ignored an unverifiable message about job %s: %s", job_id, e)
            return None
        if isinstance(decoded, Rejection):
            # Ours only if it names one of our submissions (another party may share our key).
            mine = decoded.nonce is None or decoded.nonce in self._nonces.get(job_id, ())
            return decoded if decoded.job_id == job_id and mine else None
        job, total = decoded
        if job.job_id != job_id:
            return None
        return self._check_mine(self._merge(job, total))

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

    def cancel(self, job_id: str, timeout_s: float = 10.0) -> Job | Rejection:
        """Ask the coordinator to cancel a job; return the job as it stands once it answers
        (the cancel is sent again until it does, for up to `timeout_s`)."""
        validate_job_id(job_id)
        self.conn.subscribe(
            [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        )
        msg = {"v": PROTOCOL_VERSION, "type": "cancel", "job_id": job_id}
        self._unacknowledged[job_id] = _Asking(msg, time.monotonic(), timeout_s)
        self._publish_submit(msg)
        return self.wait(job_id, None, until=lambda j: True)

    def _check_mine(self, job: Job) -> Job | Rejection:
        """A job we submitted must be what we submitted (not another under the same id)."""
        mine = self._submitted.get(job.job_id)
        if mine is not None and (mine["target"], mine["command"]) != (job.target, job.command):
            return Rejection(
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
    ) -> Job | Rejection:
        """Wait until the job satisfies `until` (default: terminal) or is rejected. With
        `on_output`, live output chunks (submit with follow=True) are passed on as they come."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        last_heard = time.monotonic()
        silent_since = 0.0  # when the coordinator stopped answering our queries
        while True:
            confirmed = self._keep_asking(job_id)
            if confirmed is not None:  # not acknowledged, but the coordinator has it
                checked = self._check_mine(confirmed)
                if isinstance(checked, Rejection) or until(checked):
                    return checked
            asking = self._unacknowledged.get(job_id)
            msg = self._next(min(deadline, asking.due()) if asking else deadline)
            if msg is not None and msg.topic == CONNECTED and asking is not None:
                # The connection dropped before the coordinator acknowledged: send it again.
                log.info("job %s: reconnected before an acknowledgement; sending again", job_id)
                self._publish_submit(asking.msg)
            if msg is not None and on_output is not None and "/output/" in msg.topic:
                chunk = self._output(msg, job_id)
                if chunk is not None:
                    on_output(chunk)
                continue
            if msg is not None and msg.topic != CONNECTED:
                got = self._job_message(msg, job_id)
                if got is not None:
                    self._unacknowledged.pop(job_id, None)
                if isinstance(got, Rejection):
                    return got
                if got is not None:
                    last_heard = time.monotonic()
                    if on_update is not None:
                        on_update(got)
                    if until(got):
                        return self._complete(got) if states.is_terminal(got.state) else got
                continue
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id}: gave up waiting after {timeout_s:g} s")
            if job_id in self._unacknowledged:
                continue  # not taken yet: sending it again is how we ask
            if msg is not None or time.monotonic() - last_heard >= POLL_EVERY_S:
                # Reconnected, or quiet for a while: events may have been missed; ask.
                last_heard = time.monotonic()
                try:
                    job = self.result(job_id, timeout_s=min(10.0, deadline - time.monotonic()))
                except QueryFailed as e:
                    if e.code != "not_found":
                        raise
                    continue
                except BrokerRefused:
                    raise
                except BrokerError as e:
                    if not silent_since:  # once per outage: why nothing is happening
                        silent_since = time.monotonic()
                        bound = "" if timeout_s is None else f" (for up to {timeout_s:g} s)"
                        self.notice(
                            f"job {job_id}: the coordinator is not answering ({e}); still "
                            f"waiting for the job's outcome{bound}"
                        )
                    continue
                if silent_since:
                    self.notice(f"job {job_id}: the coordinator answers again")
                    silent_since = 0.0
                checked = self._check_mine(job)
                if isinstance(checked, Rejection) or until(checked):
                    return checked

    def _output(self, msg: Inbound, job_id: str) -> Output | None:
        from opsbay_mqtt.protocol import Output, decode  # only with --follow

        try:
            kind, fields = self.cfg.topics.parse(msg.topic)
            chunk, _ = decode(msg.payload, self.cfg.keyring, expect=(Output,))
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
        assert isinstance(chunk, Output)
        if kind != "output" or (chunk.job_id, chunk.node) != (job_id, fields["node"]):
            return None
        return chunk

    # -- queries
    def query(self, query: str, timeout_s: float = 10.0, **params: Any) -> Any:
        """Ask the coordinator; its answer's data. Sent again (1, 2, 4 s apart) until answered
        or `timeout_s` runs out: a query the broker dropped (no coordinator subscribed at that
        moment) is asked again; each copy is signed afresh, and only one answer is read."""
        if not self._reply_subscribed:
            self.conn.subscribe([(self.cfg.topics.rpc_reply(self.reply_id), 1)], wait=False)
            self._reply_subscribed = True
        correlation = signing.random_hex(8)
        q = {
            "v": PROTOCOL_VERSION,
            "type": "query",
            "query": query,
            "reply_to": self.reply_id,
            "correlation": correlation,
            **params,
        }
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
                reply = self._reply(msg.payload)
                if reply is None or reply.get("correlation") != correlation:
                    continue
                if reply.get("ok") is not True:
                    code, error = reply.get("code"), reply.get("error")
                    raise QueryFailed(
                        code if isinstance(code, str) else "error",
                        error if isinstance(error, str) else "refused",
                    )
                return reply.get("data")
        finally:
            for m in stash:
                self.conn.inbox.put(m)

    def _reply(self, payload: bytes) -> dict[str, Any] | None:
        try:
            return self._read(payload, "reply")
        except Refused:
            # As with rejections: an error reply to a badly signed query is taken unverified.
            try:
                reply = _body(signing.parse(payload), ("reply",), None)
            except Refused:
                return None
            return None if reply.get("ok") is True else reply

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


def _unverified_rejection(payload: bytes) -> Rejection | None:
    try:
        return _rejection(_body(signing.parse(payload), ("rejected",), None))
    except Refused:
        return None


def _body(obj: dict[str, Any], kinds: tuple[str, ...], kid: str | None) -> dict[str, Any]:
    """The message without its signature, if it is of this protocol version and of `kinds`."""
    body = message_body(obj, kid)
    if body.get("type") not in kinds:
        raise Refused("bad_type", f"message type {body.get('type')!r} not expected here", kid)
    return body


def _job_event(body: dict[str, Any]) -> tuple[Job, int]:
    total = body.get("total", 0)
    if type(total) is not int or total < 0:
        raise Refused("invalid", "total: not a count")
    try:
        return job_from_wire(body.get("job")), total
    except ValueError as e:
        raise Refused("invalid", str(e)) from e


def _rejection(body: dict[str, Any]) -> Rejection:
    try:
        return rejection_from_wire({k: v for k, v in body.items() if k not in ("v", "type")})
    except ValueError as e:
        raise Refused("invalid", str(e)) from e


def _job(data: Any) -> Job:
    try:
        return job_from_wire(data)
    except ValueError as e:
        raise QueryFailed("invalid", f"the coordinator's answer: {e}") from e
