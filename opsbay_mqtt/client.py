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
from opsbay_mqtt.protocol import Job, JobEvent, Query, Rejected, Reply, Submit, decode, encode
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
    ) -> str:
        """Publish a submission (after subscribing to its events); return the job id."""
        job_id = validate_job_id(job_id) if job_id else new_job_id()
        validate_node(target)
        start_by_ms = int(self.clock() * 1000) + start_by_s * 1000
        try:
            msg = Submit(
                job_id=job_id,
                target=target,
                command=command,
                timeout_s=timeout_s,
                start_by_ms=start_by_ms,
            )
        except ValidationError as e:
            from opsbay_mqtt.protocol import describe_validation

            raise Refused("invalid", describe_validation(e)) from e
        self.conn.subscribe(
            [(self.cfg.topics.job_events(job_id), 1), (self.cfg.topics.rejected, 1)]
        )
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
            return decoded if decoded.job_id == job_id else None
        assert isinstance(decoded, JobEvent)
        job = decoded.job
        if job.job_id != job_id:
            return None
        return self._check_mine(job)

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
    ) -> Job | Rejected:
        """Wait until the job satisfies `until` (default: terminal) or is rejected."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        last_heard = time.monotonic()
        while True:
            msg = self._next(deadline)
            if msg is not None and msg.topic == CONNECTED and job_id in self._unacknowledged:
                # The connection dropped before the coordinator acknowledged: submit again.
                log.info("job %s: reconnected before an acknowledgement; submitting again", job_id)
                self._publish_submit(self._unacknowledged[job_id])
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
                        return got
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

    # -- queries
    def query(self, query: str, timeout_s: float = 10.0, **params: Any) -> Any:
        if not self._reply_subscribed:
            self.conn.subscribe([(self.cfg.topics.rpc_reply(self.reply_id), 1)])
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
                reply = Reply.model_validate(_body(signing.parse(payload)))
            except (Refused, ValidationError):
                return None
            return None if reply.ok else reply
        assert isinstance(decoded, Reply)
        return decoded

    def result(self, job_id: str, timeout_s: float = 10.0) -> Job:
        return Job.model_validate(self.query("result", timeout_s, job_id=job_id))

    def results(self, timeout_s: float = 10.0, **filters: Any) -> list[Job]:
        data = self.query("results", timeout_s, **filters)
        return [Job.model_validate(j) for j in data]

    def nodes(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        return list(self.query("nodes", timeout_s))


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("auth", "sig")}


def _unverified_rejection(payload: bytes) -> Rejected | None:
    try:
        return Rejected.model_validate(_body(signing.parse(payload)))
    except (Refused, ValidationError):
        return None
