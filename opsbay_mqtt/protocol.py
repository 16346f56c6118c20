"""Wire messages (protocol version 1): pydantic models, encode and decode.

Every message is a signed JSON object (see `signing`) with `v` and `type`. Decoding wraps
every failure as one `Refused` with a reason code; nothing else escapes.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.records import (
    LIMIT_PATTERN,
    PROTOCOL_VERSION,
    Job,
    as_dict,
    job_from_wire,
    message_body,
)
from opsbay_mqtt.signing import Auth, Keyring
from opsbay_mqtt.states import ExecState, JobState
from opsbay_mqtt.topics import JOB_ID_RE, NODE_NAME_RE, REPLY_ID_RE

MAX_COMMAND_BYTES = 64 * 1024
MAX_TIMEOUT_S = 7 * 24 * 3600

JobId = Annotated[str, Field(pattern=JOB_ID_RE.pattern)]
NodeName = Annotated[str, Field(pattern=NODE_NAME_RE.pattern)]
Millis = Annotated[int, Field(ge=0, lt=2**53)]
Text = Annotated[str, Field(max_length=1024)]


def _command_bytes(command: str) -> str:
    size = len(command.encode("utf-8", errors="surrogatepass"))
    if size > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {size} bytes; at most {MAX_COMMAND_BYTES} are allowed")
    return command


Command = Annotated[str, Field(min_length=1), AfterValidator(_command_bytes)]
# A target: node names and globs (`*`, `?`), comma-separated; never `/`, `+` or `#`.
TARGET_ITEM_RE = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,62}")  # a node name, or a glob
MAX_TARGET_ITEMS = 1000


def _target(value: str) -> str:
    # Checked item by item: one regex with a bounded repeat of 1000 costs pydantic-core ~30 MB
    # and ~40 ms to compile, in every process that imports this module.
    items = value.split(",")
    if len(items) > MAX_TARGET_ITEMS:
        raise ValueError(f"at most {MAX_TARGET_ITEMS} comma-separated names or globs")
    for item in items:
        if not TARGET_ITEM_RE.fullmatch(item):
            raise ValueError(f"{item!r} is not a node name or a glob (A-Z a-z 0-9 . _ - * ?)")
    return value


Target = Annotated[
    str, Field(min_length=1, max_length=64 * MAX_TARGET_ITEMS), AfterValidator(_target)
]
LabelKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]{1,64}$")]
LabelValue = Annotated[str, Field(max_length=256)]
Limit = Annotated[str, Field(pattern=rf"^{LIMIT_PATTERN}$")]
MAX_EXECUTIONS = 10_000


# defer_build: a model's validator is built when it is first used, so a process builds only the
# models it handles (a CLI call two or three, a worker six of the thirteen).
class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)
    v: Literal[1] = 1


class Submit(Message):
    """client -> coordinator on `<prefix>/submit`."""

    type: Literal["submit"] = "submit"
    job_id: JobId
    target: Target | Literal[""] = ""
    where: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    command: Command
    timeout_s: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_S)]
    start_by_ms: Millis
    batch: Limit | None = None
    max_failures: Limit | None = None
    # When the submitter stops waiting for the acknowledgement: arriving later, it is refused
    # (`too_late`) and never stored, so a submission its sender gave up on never runs.
    accept_by_ms: Millis | None = None

    @model_validator(mode="after")
    def _some_target(self) -> Submit:
        if not self.target and not self.where:
            raise ValueError("give a target, labels (where), or both")
        if self.batch in ("0", "0%"):
            raise ValueError("batch must be at least 1")
        return self


class Cancel(Message):
    """client -> coordinator on `<prefix>/submit` (no `node`), and coordinator -> worker on
    `<prefix>/nodes/<node>/jobs` (with `node`): stop a job."""

    type: Literal["cancel"] = "cancel"
    job_id: JobId
    node: NodeName | None = None


class Output(Message):
    """worker -> watchers on `<prefix>/output/<node>/<job>` (QoS 0): live output, in order
    of `seq`; `dropped` bytes were left out before this chunk (rate limit). Never relied on:
    the final result holds the output."""

    type: Literal["output"] = "output"
    job_id: JobId
    node: NodeName
    seq: Annotated[int, Field(ge=0, lt=2**31)]
    stream: Literal["stdout", "stderr"]
    data: Annotated[str, Field(max_length=65536)]
    dropped: Annotated[int, Field(ge=0)] = 0


class Dispatch(Message):
    """coordinator -> worker on `<prefix>/nodes/<node>/jobs`."""

    type: Literal["dispatch"] = "dispatch"
    job_id: JobId
    node: NodeName
    command: Command
    timeout_s: Annotated[int, Field(ge=1, le=MAX_TIMEOUT_S)]
    start_by_ms: Millis


class Result(Message):
    """worker -> coordinator and watchers on `<prefix>/results/<node>/<job>`."""

    type: Literal["result"] = "result"
    job_id: JobId
    node: NodeName
    state: ExecState
    session: Millis = 0
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: Annotated[int, Field(ge=0)] = 0
    stderr_bytes: Annotated[int, Field(ge=0)] = 0
    truncated: bool = False
    started_ms: Millis | None = None
    finished_ms: Millis | None = None
    duration_ms: Millis | None = None
    reason: Text | None = None
    host: dict[str, Any] = Field(default_factory=dict)


def _job(value: object) -> object:
    return value if isinstance(value, Job) else job_from_wire(value)


class JobEvent(Message):
    """coordinator -> client and watchers on `<prefix>/jobs/<job>`: the job as it now stands."""

    type: Literal["job"] = "job"
    job: Annotated[
        Job, BeforeValidator(_job)
    ]  # its `executions` are only those that changed (all of them when first announced)
    counts: dict[str, int] = Field(default_factory=dict)  # executions in each state
    total: Annotated[int, Field(ge=0)] = 0  # executions in all


def job_event_body(job: Job, counts: dict[str, int]) -> dict[str, Any]:
    """What `JobEvent(job=job, counts=counts, total=...).model_dump(mode="json")` returns,
    without validating again a job the coordinator built from messages it validated: pydantic
    took about a third of the coordinator's time per result."""
    total = sum(counts.values())
    return {
        "v": PROTOCOL_VERSION,
        "type": "job",
        "job": as_dict(job),
        "counts": dict(counts),
        "total": total,
    }


def dispatch_body(job: Job, node: str, start_by_ms: int) -> dict[str, Any]:
    """What `Dispatch(...).model_dump(mode="json")` returns for a stored job's execution on
    `node`, without validating again what was validated when the job was submitted."""
    return {
        "v": PROTOCOL_VERSION,
        "type": "dispatch",
        "job_id": job.job_id,
        "node": node,
        "command": job.command,
        "timeout_s": job.timeout_s,
        "start_by_ms": start_by_ms,
    }


class Rejected(Message):
    """coordinator -> submitter: a refused submission, on `<prefix>/jobs/<job>` when the job id
    could be read, and always on `<prefix>/rejected`."""

    type: Literal["rejected"] = "rejected"
    job_id: str | None = None
    nonce: str | None = None  # of the refused message, so its sender knows it is the one
    code: Text
    reason: Text


class Query(Message):
    """client -> coordinator on `<prefix>/rpc/request`."""

    type: Literal["query"] = "query"
    query: Literal["result", "results", "nodes"]
    reply_to: Annotated[str, Field(pattern=REPLY_ID_RE.pattern)]
    correlation: Annotated[str, Field(min_length=1, max_length=64)]
    job_id: JobId | None = None
    node: NodeName | None = None
    state: JobState | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 20
    where: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    node_state: Literal["online", "offline", "unknown"] | None = None


class Reply(Message):
    """coordinator -> client on `<prefix>/rpc/reply/<reply_to>`."""

    type: Literal["reply"] = "reply"
    correlation: str
    ok: bool
    code: str | None = None
    error: str | None = None
    data: Any = None


class NodeInfo(Message):
    """worker -> everyone, retained on `<prefix>/nodes/<node>/info`."""

    type: Literal["info"] = "info"
    node: NodeName
    session: Millis
    published_ms: Millis
    agent_version: Text
    labels: dict[str, str] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)


class NodeStatus(Message):
    """worker (or its Last Will) -> everyone, retained on `<prefix>/nodes/<node>/status`."""

    type: Literal["status"] = "status"
    node: NodeName
    state: Literal["online", "offline", "conflict"]
    session: Millis
    seq: Annotated[int, Field(ge=0, lt=2**31)] = 0
    published_ms: Millis
    reason: Text | None = None  # with "conflict": what happened, for a person


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        Submit,
        Cancel,
        Dispatch,
        Result,
        Output,
        JobEvent,
        Rejected,
        Query,
        Reply,
        NodeInfo,
        NodeStatus,
    )
}


def encode(msg: Message, keyring: Keyring, now_s: int, kid: str | None = None) -> bytes:
    return signing.sign(msg.model_dump(mode="json"), keyring, now_s, kid=kid)


def encode_unsigned(msg: Message) -> bytes:
    """For refusals the sender cannot sign for its reader (an unknown or wrong key)."""
    return signing.canonical(msg.model_dump(mode="json"))


def decode(
    payload: bytes, keyring: Keyring, expect: tuple[type[Message], ...] | None = None
) -> tuple[Message, Auth]:
    """Parse, verify and validate one message; every failure is a `Refused`."""
    obj = signing.parse(payload)
    auth = signing.verify(obj, keyring)
    # Verified: a refusal from here on can be signed for its sender.
    return _validate(obj, expect, auth.kid), auth


def decode_unverified(payload: bytes, expect: tuple[type[Message], ...]) -> Message:
    """Parse and validate without checking the signature: only for what cannot hurt when
    forged (a refusal read by its sender, a watcher's display). Failures are `Refused`."""
    return _validate(signing.parse(payload), expect, None)


def _validate(
    obj: dict[str, Any], expect: tuple[type[Message], ...] | None, kid: str | None
) -> Message:
    body = message_body(obj, kid)
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise Refused("bad_type", f"unknown message type {body.get('type')!r}", kid)
    if expect is not None and cls not in expect:
        names = ", ".join(c.model_fields["type"].default for c in expect)
        raise Refused("bad_type", f"message type {kind!r} not expected here ({names})", kid)
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        raise Refused("invalid", describe_validation(e), kid) from e


def describe_validation(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def peek(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort job id and nonce of a payload we refuse, so the refusal can reach (and be
    recognised by) its sender."""
    try:
        obj = signing.parse(payload)
    except Refused:
        # Refused as bad_json (a float, a duplicate key) may still name its job and nonce:
        # read them leniently, so the refusal reaches its sender.
        try:
            if len(payload) > signing.MAX_PAYLOAD_BYTES:
                return None, None
            obj = json.loads(payload.decode("utf-8"))
        except (ValueError, RecursionError):
            return None, None
        if not isinstance(obj, dict):
            return None, None
    job_id, auth = obj.get("job_id"), obj.get("auth")
    nonce = auth.get("nonce") if isinstance(auth, dict) else None
    return (
        job_id if isinstance(job_id, str) and JOB_ID_RE.fullmatch(job_id) else None,
        nonce if isinstance(nonce, str) and signing.NONCE_RE.fullmatch(nonce) else None,
    )
