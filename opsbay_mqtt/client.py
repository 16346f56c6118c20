"""The submitting side: submit a job, wait for it, query the coordinator. Used by the CLI."""

from __future__ import annotations

import logging
import queue
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from opsbay_mqtt import signing, states
from opsbay_mqtt.errors import BrokerError, OpsbayError, Refused
from opsbay_mqtt.protocol import (
    Cancel,
    Execution,
    Job,
    JobEvent,
    Output,
    Query,
    Rejected,
    Reply,
    Submit,
    decode,
    decode_unverified,
    describe_validation,
    encode,
)
from opsbay_mqtt.settings import Settings
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics, new_job_id, validate_job_id, validate_node
from opsbay_mqtt.transport import CONNECTED, BrokerURL, Connection, Inbound, TlsFiles

log = logging.getLogger(__name__)

POLL_EVERY_S = 5.0  # when no event arrives for this long, ask the coordinator directly


class WaitTimeout(OpsbayError):
    """The caller's wait ran out; the job goes on."""


class QueryFailed(OpsbayError):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


@dataclass(frozen=True)
class ClientConfig:
    url: BrokerURL
    topics: Topics
    keyring: Keyring
    tls: TlsFiles = field(default_factory=TlsFiles)
    connect_timeout_s: float = 10.0

    @classmethod
    def of(cls, s: Settings) -> ClientConfig:
        return cls(url=s.url, topics=s.topics, keyring=s.keyring, tls=s.tls)


class Client:
    """One short-lived connection for a CLI call. Use as a context manager."""

    def __init__(self, cfg: ClientConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.reply_id = "c" + secrets.token_hex(8)
        self.conn = Connection(url=cfg.url, client_id=f"opsbay-cli-{self.reply_id}", tls=cfg.tls)
        self._reply_subscribed = False
        self._unacknowledged: dict[str, Submit] = {}
        self._submitted: dict[str, Submit] = {}
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
        try:
            return self.conn.inbox.get(timeout=min(left, POLL_EVERY_S))
        except queue.Empty:
            return None

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
        start_by_ms = int(self.clock() * 1000) + start_by_s * 1000
        try:
            msg = Submit(
                job_id=job_id,
                target=target,
                where=where or {},
                command=command,
                timeout_s=timeout_s,
                start_by_ms=start_by_ms,
                batch=batch,
                max_failures=max_failures,
            )
        except ValidationError as e:
            raise Refused("invalid", describe_validation(e)) from e
        topics = [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        if follow:
            topics.append((self.cfg.topics.job_output(job_id), 0))
        self.conn.subscribe(topics, wait=False)
        self._unacknowledged[job_id] = msg
        self._submitted[job_id] = msg
        self._publish_submit(msg)
        return job_id

    def _publish_submit(self, msg: Submit) -> None:
        # Signed afresh each time (new nonce); the coordinator knows the job id, so a retry
        # never makes a second job.
        nonce = secrets.token_hex(16)
        self._nonces.setdefault(msg.job_id, set()).add(nonce)
        payload = signing.sign(
            msg.model_dump(mode="json"), self.cfg.keyring, int(self.clock()), nonce
        )
        self.conn.publish_wait(self.cfg.topics.submit, payload)

    def _job_message(self, msg: Inbound, job_id: str) -> Job | Rejected | None:
        if msg.topic not in (self.cfg.topics.job_events(job_id), self.cfg.topics.rejected):
            return None
        try:
            decoded, _ = decode(msg.payload, self.cfg.keyring, expect=(JobEvent, Rejected))
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
        if isinstance(decoded, Rejected):
            # Ours only if it names one of our submissions (another party may share our key).
            mine = decoded.nonce is None or decoded.nonce in self._nonces.get(job_id, ())
            return decoded if decoded.job_id == job_id and mine else None
        assert isinstance(decoded, JobEvent)
        if decoded.job.job_id != job_id:
            return None
        return self._check_mine(self._merge(decoded))

    def _merge(self, event: JobEvent) -> Job:
        """Events carry only the executions that changed: keep the whole picture."""
        known = self._views.setdefault(event.job.job_id, {})
        for ex in event.job.executions:
            known[ex.node] = ex
        self._totals[event.job.job_id] = event.total
        return event.job.model_copy(update={"executions": sorted(known.values(), key=_by_node)})

    def _complete(self, job: Job) -> Job:
        """The job with every execution: asks the coordinator when events were missed."""
        if len(job.executions) >= self._totals.get(job.job_id, 0):
            return job
        return self.result(job.job_id)

    def cancel(self, job_id: str, timeout_s: float = 10.0) -> Job | Rejected:
        """Ask the coordinator to cancel a job; return the job as it stands once it answers."""
        validate_job_id(job_id)
        self.conn.subscribe(
            [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        )
        nonce = secrets.token_hex(16)
        self._nonces.setdefault(job_id, set()).add(nonce)
        body = Cancel(job_id=job_id).model_dump(mode="json")
        payload = signing.sign(body, self.cfg.keyring, int(self.clock()), nonce)
        self.conn.publish_wait(self.cfg.topics.submit, payload)
        return self.wait(job_id, timeout_s, until=lambda j: True)

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
                if isinstance(got, Rejected):
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
                if isinstance(checked, Rejected) or until(checked):
                    return checked

    def _output(self, msg: Inbound, job_id: str) -> Output | None:
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
        correlation = secrets.token_hex(8)
        q = Query(query=query, reply_to=self.reply_id, correlation=correlation, **params)  # type: ignore[arg-type]
        self.conn.publish_wait(
            self.cfg.topics.rpc_request, encode(q, self.cfg.keyring, int(self.clock()))
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
                if reply is None or reply.correlation != correlation:
                    continue
                if not reply.ok:
                    raise QueryFailed(reply.code or "error", reply.error or "refused")
                return reply.data
        finally:
            for m in stash:
                self.conn.inbox.put(m)

    def _reply(self, payload: bytes) -> Reply | None:
        try:
            decoded, _ = decode(payload, self.cfg.keyring, expect=(Reply,))
        except Refused:
            # As with rejections: an error reply to a badly signed query is taken unverified.
            try:
                reply = decode_unverified(payload, (Reply,))
            except Refused:
                return None
            assert isinstance(reply, Reply)
            return None if reply.ok else reply
        assert isinstance(decoded, Reply)
        return decoded

    def result(self, job_id: str, timeout_s: float = 10.0) -> Job:
        return Job.model_validate(self.query("result", timeout_s, job_id=job_id))

    def results(self, timeout_s: float = 10.0, **filters: Any) -> list[Job]:
        data = self.query("results", timeout_s, **filters)
        return [Job.model_validate(j) for j in data]

    def nodes(self, timeout_s: float = 10.0, **filters: Any) -> list[dict[str, Any]]:
        return list(self.query("nodes", timeout_s, **filters))


def _by_node(ex: Execution) -> str:
    return ex.node


def _unverified_rejection(payload: bytes) -> Rejected | None:
    try:
        rejected = decode_unverified(payload, (Rejected,))
    except Refused:
        return None
    assert isinstance(rejected, Rejected)
    return rejected
