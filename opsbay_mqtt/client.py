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
from opsbay_mqtt.errors import BrokerError, OpsbayError, Refused
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


class WaitTimeout(OpsbayError):
    """The caller's wait ran out; the job goes on."""


class QueryFailed(OpsbayError):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


class ClientConfig(NamedTuple):  # not a dataclass: cheaper to define on every CLI call
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

    def __init__(self, cfg: ClientConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.reply_id = "c" + signing.random_hex(8)
        self.conn = Connection(url=cfg.url, client_id=f"opsbay-cli-{self.reply_id}", tls=cfg.tls)
        self._reply_subscribed = False
        self._unacknowledged: dict[str, dict[str, Any]] = {}
        self._submitted: dict[str, dict[str, Any]] = {}
        self._nonces: dict[str, set[str]] = {}
        self._views: dict[str, dict[str, Execution]] = {}
        self._totals: dict[str, int] = {}

    def __enter__(self) -> Client:
        self.conn.connect(self.cfg.connect_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()

    def _next(self, deadline: float) -> Inbound | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        got = self.conn.receive(min(left, POLL_EVERY_S), 1)
        return got[0] if got else None

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
    ) -> str:
        """Publish a submission (after subscribing to its events, and with `follow` to its
        live output); return the job id."""
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
        }
        topics = [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        if follow:
            topics.append((self.cfg.topics.job_output(job_id), 0))
        self.conn.subscribe(topics, wait=False)
        self._unacknowledged[job_id] = msg
        self._submitted[job_id] = msg
        self._publish_submit(msg)
        return job_id

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
        """Ask the coordinator to cancel a job; return the job as it stands once it answers."""
        validate_job_id(job_id)
        self.conn.subscribe(
            [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        )
        self._publish_submit({"v": PROTOCOL_VERSION, "type": "cancel", "job_id": job_id})
        return self.wait(job_id, timeout_s, until=lambda j: True)

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
        while True:
            msg = self._next(deadline)
            if msg is not None and msg.topic == CONNECTED and job_id in self._unacknowledged:
                # The connection dropped before the coordinator acknowledged: submit again.
                log.info("job %s: reconnected before an acknowledgement; submitting again", job_id)
                self._publish_submit(self._unacknowledged[job_id])
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
            if msg is not None or time.monotonic() - last_heard >= POLL_EVERY_S:
                # Reconnected, or quiet for a while: events may have been missed; ask.
                last_heard = time.monotonic()
                try:
                    job = self.result(job_id, timeout_s=min(10.0, deadline - time.monotonic()))
                except QueryFailed as e:
                    if e.code != "not_found":
                        raise
                    continue
                except BrokerError:
                    continue
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
            return None
        assert isinstance(chunk, Output)
        if kind != "output" or (chunk.job_id, chunk.node) != (job_id, fields["node"]):
            return None
        return chunk

    # -- queries
    def query(self, query: str, timeout_s: float = 10.0, **params: Any) -> Any:
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
        self.conn.publish_wait(
            self.cfg.topics.rpc_request, signing.sign(q, self.cfg.keyring, int(self.clock()))
        )
        deadline = time.monotonic() + timeout_s
        reply_topic = self.cfg.topics.rpc_reply(self.reply_id)
        stash: list[Inbound] = []
        try:
            while True:
                msg = self._next(deadline)
                if msg is None:
                    if time.monotonic() >= deadline:
                        raise BrokerError(
                            f"no answer from the coordinator within {timeout_s:g} s "
                            "(is it running, on the same broker and prefix?)"
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
