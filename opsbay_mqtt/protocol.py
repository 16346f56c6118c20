"""The wire protocol, version 1: the one place where each message is defined, encoded, decoded
and checked against its topic (docs/protocol.md is its contract).

Every message is a frozen dataclass whose fields carry their limits as `Rule`s. From these
definitions come both ways of validating: the plain checks here, which the command line uses
(importing pydantic would double the start-up of every `opsbay submit --wait`), and pydantic
models derived from them, which the daemons install (`models.install`). The tests run every
case through both.

The fields that two messages or records share are defined once and inherited: what was asked
to run (`JobSpec`: a submission and the job recorded from it) and how a run ended (`Outcome`: a
result and the execution recorded from it), so a conversion between them holds by
construction (`spec_of`, `outcome_of`).

Decoding (`decode`) parses, verifies the signature, checks the version, the type expected (on
this topic), every field, and that the body names what its topic names. Every failure is one
`Refused` with a reason code; nothing else escapes.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, overload

from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.signing import Auth, Keyring
from opsbay_mqtt.states import ExecState, JobState
from opsbay_mqtt.topics import JOB_ID_RE, NODE_NAME_RE, REPLY_ID_RE

PROTOCOL_VERSION = 1
MAX_COMMAND_BYTES = 64 * 1024
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_TARGET_ITEMS = 1000
MAX_EXECUTIONS = 10_000
# A rollout limit: a count ("10") or a share of the executions ("25%").
LIMIT_PATTERN = r"(0|[1-9][0-9]{0,5})%?"
# A target item: a node name, or a glob (`*`, `?`); never `/`, `+` or `#`.
TARGET_ITEM_RE = re.compile(r"[A-Za-z0-9*?][A-Za-z0-9._*?-]{0,62}")
# Schedules: the shortest interval (fleet health checks run that often), the longest, and the
# longest random delay.
MIN_EVERY_S = 10
MAX_EVERY_S = 366 * 86400
MAX_JITTER_S = 86400


# -- the limits a field carries
class Rule:
    """A limit on a field's value: `test` for the plain checks, `says` for the error, and the
    same limit as pydantic `Field` arguments (`field`) or, when it has none, as a function that
    raises ValueError (`check`, run after pydantic's own checks). Hashed by identity, as
    `Annotated` metadata must be hashable."""

    __slots__ = ("check", "field", "says", "test")

    def __init__(
        self,
        says: str,
        test: Callable[[Any], bool],
        field: dict[str, Any],
        check: Callable[[Any], Any] | None = None,
    ) -> None:
        self.says, self.test, self.field, self.check = says, test, field, check


def pattern(rx: re.Pattern[str] | str) -> Rule:
    text = rx if isinstance(rx, str) else rx.pattern
    body = text.removeprefix("^").removesuffix("$")
    # re.fullmatch: compiled when first used (re caches it), not when this module is imported.
    return Rule(
        f"must match {body}",
        lambda v: re.fullmatch(body, v) is not None,
        {"pattern": f"^(?:{body})$"},
    )


def between(low: int, high: int) -> Rule:
    return Rule(f"must be {low} to {high}", lambda v: low <= v <= high, {"ge": low, "le": high})


def size(low: int, high: int) -> Rule:
    return Rule(
        f"must hold {low} to {high} items or characters",
        lambda v: low <= len(v) <= high,
        {"min_length": low, "max_length": high},
    )


def checked_by(check: Callable[[Any], Any]) -> Rule:
    def test(value: Any) -> bool:
        check(value)
        return True

    return Rule("", test, {}, check)


def _command_bytes(command: str) -> str:
    n = len(command.encode("utf-8", errors="surrogatepass"))
    if n > MAX_COMMAND_BYTES:
        raise ValueError(f"command is {n} bytes; at most {MAX_COMMAND_BYTES} are allowed")
    if "\x00" in command:
        raise ValueError("command holds a NUL character, which no shell command can hold")
    return command


def _target(value: str) -> str:
    if not value:  # no target: labels (`where`) choose the nodes
        return value
    items = value.split(",")
    if len(items) > MAX_TARGET_ITEMS:
        raise ValueError(f"at most {MAX_TARGET_ITEMS} comma-separated names or globs")
    for item in items:
        if not TARGET_ITEM_RE.fullmatch(item):
            raise ValueError(f"{item!r} is not a node name or a glob (A-Z a-z 0-9 . _ - * ?)")
    return value


def _cron(expr: str) -> str:
    from opsbay_mqtt import schedules  # cronsim: imported by the schedule commands only

    return schedules.check_cron(expr)


def _zone(name: str) -> str:
    from opsbay_mqtt import schedules

    return schedules.check_zone(name)


JobId = Annotated[str, pattern(JOB_ID_RE)]
NodeName = Annotated[str, pattern(NODE_NAME_RE)]
Millis = Annotated[int, between(0, 2**53 - 1)]
Count = Annotated[int, between(0, 2**53 - 1)]
Seq = Annotated[int, between(0, 2**31 - 1)]
Text = Annotated[str, size(0, 1024)]
Command = Annotated[str, size(1, 4 * MAX_COMMAND_BYTES), checked_by(_command_bytes)]
Target = Annotated[str, size(0, 64 * MAX_TARGET_ITEMS), checked_by(_target)]
Labels = Annotated[
    dict[Annotated[str, pattern(r"[A-Za-z0-9._/-]{1,64}")], Annotated[str, size(0, 256)]],
    size(0, 32),
]
Limit = Annotated[str, pattern(LIMIT_PATTERN)]
TimeoutS = Annotated[int, between(1, MAX_TIMEOUT_S)]
ScheduleName = Annotated[str, pattern(NODE_NAME_RE)]  # the rule of node names
CronExpr = Annotated[str, size(1, 256), checked_by(_cron)]
Zone = Annotated[str, size(1, 64), checked_by(_zone)]


class _Plain:
    """What every record and message shares: equality and a readable form (defined once, see
    the package note). Treat them as frozen: `replace` makes changed copies."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({shown})"


# -- what is recorded and shared
@dataclass(kw_only=True, repr=False, eq=False)
class JobSpec(_Plain):
    """What is asked to run: a submission's fields that its job records."""

    job_id: JobId
    target: Target = ""
    where: Labels = field(default_factory=dict)
    command: Command
    timeout_s: TimeoutS
    start_by_ms: Millis
    batch: Limit | None = None
    max_failures: Limit | None = None


@dataclass(kw_only=True, repr=False, eq=False)
class Outcome(_Plain):
    """How a run ended, as a worker reports it and the coordinator records it."""

    state: ExecState
    exit_code: Annotated[int, between(-(2**31), 2**31 - 1)] | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: Count = 0
    stderr_bytes: Count = 0
    truncated: bool = False
    started_ms: Millis | None = None
    finished_ms: Millis | None = None
    duration_ms: Millis | None = None
    reason: Text | None = None
    host: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, repr=False, eq=False)
class Execution(Outcome):
    """One job on one node, as the coordinator records it."""

    node: str
    dispatched_ms: int | None = None
    start_by_ms: int | None = None


@dataclass(kw_only=True, repr=False, eq=False)
class Job(JobSpec):
    """A job and its executions (all of them, or those an event or a listing carries)."""

    target: Target = field()  # required here: always recorded ("" when labels chose)
    state: JobState
    submitted_ms: int
    submitted_by: str
    submitted_kid: str = ""
    reason_code: str | None = None
    reason: str | None = None
    schedule: str | None = None  # the schedule that started it
    executions: list[Execution] = field(default_factory=list)


@dataclass(kw_only=True, repr=False, eq=False)
class ScheduleSpec(_Plain):
    """When a schedule runs (`cron` in `tz`, or `every_s`) and what each run is: a job for
    its target, whose start-by deadline is `start_within_s` after the due time."""

    cron: CronExpr | None = None
    every_s: Annotated[int, between(MIN_EVERY_S, MAX_EVERY_S)] | None = None
    tz: Zone = "UTC"
    target: Target = ""
    where: Labels = field(default_factory=dict)
    command: Command
    timeout_s: TimeoutS
    start_within_s: TimeoutS
    batch: Limit | None = None
    max_failures: Limit | None = None
    overlap: Literal["skip", "allow"] = "skip"
    catch_up: Literal["none", "latest"] = "latest"
    jitter_s: Annotated[int, between(0, MAX_JITTER_S)] = 0

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("give cron or every_s, one of them")
        if self.every_s is not None and self.tz != "UTC":
            raise ValueError("tz applies to cron only: every_s counts seconds, in UTC")
        if self.every_s is not None and self.jitter_s >= self.every_s:
            raise ValueError("jitter_s must be shorter than every_s")
        _check_targets(self.target, self.where, self.batch)


@dataclass(kw_only=True, repr=False, eq=False)
class Schedule(ScheduleSpec):
    """A schedule as the coordinator records it."""

    name: str
    owner: str  # the client identity that made it ("shared" for the shared key)
    owner_kid: str
    paused: bool = False
    created_ms: int
    updated_ms: int
    next_due_ms: int  # the next due time not yet handled (fired or skipped)
    last_job_id: str | None = None
    change_id: str = ""  # of the request that last changed it: a retry is answered, not redone


@dataclass(kw_only=True, repr=False, eq=False)
class ScheduleRun(_Plain):
    """What became of one due time (or, with `count` > 1, of several missed in a row)."""

    name: str
    due_ms: int
    recorded_ms: int
    job_id: str | None = None  # a run: its job; None: skipped
    code: str  # scheduled, caught_up, manual; or skipped: overlap, missed, refused
    reason: str | None = None
    count: int = 1
    last_due_ms: int | None = None  # with count > 1: the last of them
    state: str | None = None  # the job's state, when read with it


# -- the messages
@dataclass(kw_only=True, repr=False, eq=False)
class Message(_Plain):
    """Every message: `v` (the protocol version) and `type` (its kind, one per class)."""

    # The fields a message names that its topic names too (`decode(..., topic=...)`).
    NAMES: ClassVar[tuple[str, ...]] = ()
    v: Literal[1] = 1


@dataclass(kw_only=True, repr=False, eq=False)
class Submit(JobSpec, Message):
    """client -> coordinator on `<prefix>/submit`."""

    NAMES = ("job_id",)
    type: Literal["submit"] = "submit"
    # When the submitter stops waiting for the acknowledgement: arriving later, it is refused
    # (`too_late`) and never stored, so a submission its sender gave up on never runs.
    accept_by_ms: Millis | None = None

    def __post_init__(self) -> None:
        _check_targets(self.target, self.where, self.batch)


def _check_targets(target: str, where: dict[str, str], batch: str | None) -> None:
    """What a submission and a schedule's runs must say about their nodes (ValueError)."""
    if not target and not where:
        raise ValueError("give a target, labels (where), or both")
    if batch in ("0", "0%"):
        raise ValueError("batch must be at least 1")


@dataclass(kw_only=True, repr=False, eq=False)
class Cancel(Message):
    """client -> coordinator on `<prefix>/submit` (no `node`), and coordinator -> worker on
    `<prefix>/nodes/<node>/jobs` (with `node`): stop a job."""

    NAMES = ("job_id", "node")
    type: Literal["cancel"] = "cancel"
    job_id: JobId
    node: NodeName | None = None


@dataclass(kw_only=True, repr=False, eq=False)
class Output(Message):
    """worker -> watchers on `<prefix>/output/<node>/<job>` (QoS 0): live output, in order
    of `seq`; `dropped` bytes were left out before this chunk (rate limit). Never relied on:
    the final result holds the output."""

    NAMES = ("job_id", "node")
    type: Literal["output"] = "output"
    job_id: JobId
    node: NodeName
    seq: Seq
    stream: Literal["stdout", "stderr"]
    data: Annotated[str, size(0, 65536)]
    dropped: Count = 0


@dataclass(kw_only=True, repr=False, eq=False)
class Dispatch(Message):
    """coordinator -> worker on `<prefix>/nodes/<node>/jobs`."""

    NAMES = ("job_id", "node")
    type: Literal["dispatch"] = "dispatch"
    job_id: JobId
    node: NodeName
    command: Command
    timeout_s: TimeoutS
    start_by_ms: Millis


@dataclass(kw_only=True, repr=False, eq=False)
class Result(Outcome, Message):
    """worker -> coordinator and watchers on `<prefix>/results/<node>/<job>`."""

    NAMES = ("job_id", "node")
    type: Literal["result"] = "result"
    job_id: JobId
    node: NodeName
    session: Millis = 0


@dataclass(kw_only=True, repr=False, eq=False)
class JobEvent(Message):
    """coordinator -> client and watchers on `<prefix>/jobs/<job>`: the job as it now stands;
    its `executions` are only those that changed (all of them when first announced)."""

    NAMES = ("job_id",)
    type: Literal["job"] = "job"
    job: Job
    counts: dict[str, int] = field(default_factory=dict)  # executions in each state
    total: Count = 0  # executions in all

    @property
    def job_id(self) -> str:
        return self.job.job_id


@dataclass(kw_only=True, repr=False, eq=False)
class Rejected(Message):
    """coordinator -> submitter: a refused submission, on `<prefix>/jobs/<job>` when the job id
    could be read, and always on `<prefix>/rejected`."""

    NAMES = ("job_id",)
    type: Literal["rejected"] = "rejected"
    job_id: str | None = None
    nonce: str | None = None  # of the refused message, so its sender knows it is the one
    code: Text
    reason: Text


QueryKind = Literal["result", "results", "nodes", "schedules", "schedule"]


@dataclass(kw_only=True, repr=False, eq=False)
class Query(Message):
    """client -> coordinator on `<prefix>/rpc/request`."""

    type: Literal["query"] = "query"
    query: QueryKind
    reply_to: Annotated[str, pattern(REPLY_ID_RE)]
    correlation: Annotated[str, size(1, 64)]
    job_id: JobId | None = None
    node: NodeName | None = None
    state: JobState | None = None
    limit: Annotated[int, between(1, 1000)] = 20
    where: Labels = field(default_factory=dict)
    node_state: Literal["online", "offline", "unknown"] | None = None
    schedule: ScheduleName | None = None  # `schedule`: which; `results`: its runs only


ScheduleOp = Literal["add", "pause", "resume", "remove", "run"]


@dataclass(kw_only=True, repr=False, eq=False)
class ScheduleChange(Message):
    """client -> coordinator on `<prefix>/rpc/request`, answered by a `Reply`: add (with
    `spec`), pause, resume or remove a schedule, or run it once now (as job `job_id`, chosen
    by the client). `change_id`, chosen by the client and kept when the request is sent again,
    makes a retry of a change that was made answer as it did, not fail or act twice."""

    type: Literal["schedule"] = "schedule"
    op: ScheduleOp
    name: ScheduleName
    change_id: Annotated[str, pattern(r"[0-9a-f]{16,64}")]
    reply_to: Annotated[str, pattern(REPLY_ID_RE)]
    correlation: Annotated[str, size(1, 64)]
    spec: ScheduleSpec | None = None
    job_id: JobId | None = None

    def __post_init__(self) -> None:
        if (self.op == "add") != (self.spec is not None):
            raise ValueError("spec goes with op add, and only with it")
        if (self.op == "run") != (self.job_id is not None):
            raise ValueError("job_id goes with op run, and only with it")


@dataclass(kw_only=True, repr=False, eq=False)
class Reply(Message):
    """coordinator -> client on `<prefix>/rpc/reply/<reply_to>`."""

    type: Literal["reply"] = "reply"
    correlation: str
    ok: bool
    code: str | None = None
    error: str | None = None
    data: Any = None


@dataclass(kw_only=True, repr=False, eq=False)
class NodeInfo(Message):
    """worker -> everyone, retained on `<prefix>/nodes/<node>/info`."""

    NAMES = ("node",)
    type: Literal["info"] = "info"
    node: NodeName
    session: Millis
    published_ms: Millis
    agent_version: Text
    labels: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, repr=False, eq=False)
class NodeStatus(Message):
    """worker (or its Last Will) -> everyone, retained on `<prefix>/nodes/<node>/status`."""

    NAMES = ("node",)
    type: Literal["status"] = "status"
    node: NodeName
    state: Literal["online", "offline", "conflict"]
    session: Millis
    seq: Seq = 0
    published_ms: Millis
    reason: Text | None = None  # with "conflict": what happened, for a person


def _type_name(cls: type[Message]) -> str:
    return str(cls.__dataclass_fields__["type"].default)


MESSAGES: tuple[type[Message], ...] = (
    Submit,
    Cancel,
    Dispatch,
    Result,
    Output,
    JobEvent,
    Rejected,
    Query,
    ScheduleChange,
    Reply,
    NodeInfo,
    NodeStatus,
)
MESSAGE_TYPES: dict[str, type[Message]] = {_type_name(cls): cls for cls in MESSAGES}
# Which messages travel on which topic (the kinds of `Topics.parse`).
ON_TOPIC: dict[str, tuple[type[Message], ...]] = {
    "submit": (Submit, Cancel),
    "rpc_request": (Query, ScheduleChange),
    "rpc_reply": (Reply,),
    "node_jobs": (Dispatch, Cancel),
    "node_info": (NodeInfo,),
    "node_status": (NodeStatus,),
    "result": (Result,),
    "output": (Output,),
    "job_events": (JobEvent, Rejected),
    "rejected": (Rejected,),
}
Topic = tuple[str, dict[str, str]]  # a parsed topic: `Topics.parse`


# -- conversions, by construction
def fields_of(record: Any) -> dict[str, Any]:
    """A record's or message's own fields, not copied (a job's executions stay records)."""
    return {name: getattr(record, name) for name in _names(type(record))}


def spec_of(sub: JobSpec) -> dict[str, Any]:
    """What a submission asked to run, as the fields of the job recorded from it."""
    return {name: getattr(sub, name) for name in _names(JobSpec)}


def outcome_of(done: Outcome) -> dict[str, Any]:
    """How a run ended (a result's, or a runner's outcome), as the fields of an execution."""
    return {name: getattr(done, name) for name in _names(Outcome)}


_R = TypeVar("_R")


def replace(record: _R, /, **changes: Any) -> _R:
    """`dataclasses.replace` without running `__init__` and `__post_init__` again: for records
    built from checked data (the coordinator does it several times per message)."""
    cls = type(record)
    unknown = changes.keys() - set(_names(cls))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    new = object.__new__(cls)
    new.__dict__.update(record.__dict__)
    new.__dict__.update(changes)
    return new


def wire(record: Any) -> dict[str, Any]:
    """A message or record as JSON-ready data: new dicts and lists all the way down."""
    plan = _WIRE.get(type(record))
    if plan is None:
        plan = _WIRE[type(record)] = _wire_plan(type(record))
    out: dict[str, Any] = {}
    for name, kind in plan:
        value = getattr(record, name)
        if kind is _PLAIN or value is None:
            out[name] = value
        elif kind is _RECORDS:
            out[name] = [wire(x) for x in value]
        elif kind is _RECORD:
            out[name] = wire(value)
        elif isinstance(value, dict):  # _COPY: a dict, or any JSON value
            out[name] = dict(value)
        else:
            out[name] = list(value) if isinstance(value, list) else value
    return out


# How `wire` turns each field into JSON, worked out once per class from its type.
_PLAIN, _COPY, _RECORD, _RECORDS = "plain", "copy", "record", "records"
_WIRE: dict[type, tuple[tuple[str, str], ...]] = {}


def _wire_plan(cls: type) -> tuple[tuple[str, str], ...]:
    holding = dict(record_fields(cls))
    plan = []
    for name, hint in hints(cls).items():
        kinds = {typing.get_origin(t) for t in _flatten(hint)}
        if name in holding:
            kind = _RECORDS if list in kinds else _RECORD
        elif dict in kinds or list in kinds or Any in _flatten(hint):
            kind = _COPY
        else:
            kind = _PLAIN
        plan.append((name, kind))
    return tuple(plan)


def record_fields(cls: type) -> tuple[tuple[str, type], ...]:
    """The fields of `cls` that hold a record, or a list of records, with the record's class
    (a job event's `job`, a job's `executions`)."""
    found = []
    for name, hint in hints(cls).items():
        for t in _flatten(hint):
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                found.append((name, t))
                break
    return tuple(found)


# -- encode and decode
def encode(msg: Message, keyring: Keyring, now_s: int, kid: str | None = None) -> bytes:
    return signing.sign(wire(msg), keyring, now_s, kid=kid)


def encode_unsigned(msg: Message) -> bytes:
    """For refusals the sender cannot sign for its reader (an unknown or wrong key)."""
    return signing.canonical(wire(msg))


_M = TypeVar("_M", bound=Message)
_N = TypeVar("_N", bound=Message)
Expect = type[Message] | tuple[type[Message], ...] | None


@overload
def decode(
    payload: bytes, keyring: Keyring, expect: type[_M], topic: Topic | None = None
) -> tuple[_M, Auth]: ...
@overload
def decode(
    payload: bytes,
    keyring: Keyring,
    expect: tuple[type[_M], type[_N]],
    topic: Topic | None = None,
) -> tuple[_M | _N, Auth]: ...
@overload
def decode(
    payload: bytes, keyring: Keyring, expect: Expect = None, topic: Topic | None = None
) -> tuple[Message, Auth]: ...
def decode(
    payload: bytes, keyring: Keyring, expect: Expect = None, topic: Topic | None = None
) -> tuple[Message, Auth]:
    """Parse, verify and validate one message of a type in `expect` (default: any that may
    travel on `topic`), that names what `topic` (`Topics.parse`) names. `Refused` if not."""
    obj = signing.parse(payload)
    auth = signing.verify(obj, keyring)
    # Verified: a refusal from here on can be signed for its sender.
    return _message(obj, expect, topic, auth.kid), auth


@overload
def decode_unverified(payload: bytes, expect: type[_M], topic: Topic | None = None) -> _M: ...
@overload
def decode_unverified(
    payload: bytes, expect: tuple[type[_M], type[_N]], topic: Topic | None = None
) -> _M | _N: ...
@overload
def decode_unverified(
    payload: bytes, expect: Expect = None, topic: Topic | None = None
) -> Message: ...
def decode_unverified(payload: bytes, expect: Expect = None, topic: Topic | None = None) -> Message:
    """`decode` without checking the signature: only for what cannot hurt when forged (a
    refusal read by its sender, a watcher's display)."""
    return _message(signing.parse(payload), expect, topic, None)


def record(cls: type[_R], data: object, where: str = "") -> _R:
    """A record (a `Job` from a query's answer, ...) read from JSON data, every field checked;
    ValueError if it is not one."""
    built: _R = _plain_build(cls, data, where or cls.__name__.lower())
    return built


def _message(obj: dict[str, Any], expect: Expect, topic: Topic | None, kid: str | None) -> Message:
    body = {k: v for k, v in obj.items() if k not in ("auth", "sig")}
    version = body.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Refused("bad_version", f"protocol version {version!r} is not supported (1)", kid)
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise Refused("bad_type", f"unknown message type {kind!r}", kid)
    allowed = (expect,) if isinstance(expect, type) else expect
    if topic is not None:
        on_topic = ON_TOPIC.get(topic[0], ())
        allowed = tuple(c for c in allowed if c in on_topic) if allowed else on_topic
    if allowed is not None and cls not in allowed:
        names = ", ".join(_type_name(c) for c in allowed) or "none"
        raise Refused("bad_type", f"message type {kind!r} not expected here ({names})", kid)
    try:
        msg = validate_message(cls, body)
    except ValueError as e:  # pydantic's ValidationError is one too
        raise Refused("invalid", describe(e), kid) from e
    if topic is not None:
        for name in cls.NAMES:
            if name in topic[1] and getattr(msg, name) != topic[1][name]:
                raise Refused("wrong_topic", f"the message names another {name} than its topic")
    return msg


def describe(e: ValueError) -> str:
    """A validation error in a few words: which fields, and what is wrong with them."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    parts = []
    for err in errors()[:5]:
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


# -- the plain checks, worked out once per class from its definition
def plain_validate(cls: type[Message], body: dict[str, Any]) -> Message:
    """A message's body checked field by field and built as `cls`; ValueError if it is not."""
    msg: Message = _plain_build(cls, body, "")
    return msg


# How messages are validated in this process: the plain checks, or pydantic (`models.install`).
validate_message: Callable[[type[Message], dict[str, Any]], Message] = plain_validate

_NAMES: dict[type, tuple[str, ...]] = {}
_FIELDS: dict[type, tuple[dict[str, Callable[[object, str], Any]], frozenset[str]]] = {}


def _names(cls: type) -> tuple[str, ...]:
    names = _NAMES.get(cls)
    if names is None:
        names = _NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def hints(cls: type) -> dict[str, Any]:
    """A record's or message's field types, with their rules (`Annotated`)."""
    names = set(_names(cls))
    return {
        name: hint
        for name, hint in typing.get_type_hints(cls, include_extras=True).items()
        if name in names
    }


def required(cls: type) -> frozenset[str]:
    return frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def _plain_build(cls: type, data: object, where: str) -> Any:
    checks = _FIELDS.get(cls)
    if checks is None:
        checks = _FIELDS[cls] = (
            {name: _checker(hint) for name, hint in hints(cls).items()},
            required(cls),
        )
    fields, needed = checks
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'message'}: an object was expected")
    at = f"{where}." if where else ""
    unknown = sorted(map(str, data.keys() - fields.keys()))
    if unknown:
        raise ValueError(f"{at}{unknown[0]}: unknown field")
    for name in sorted(needed - data.keys()):
        raise ValueError(f"{at}{name}: missing")
    values = {name: fields[name](value, at + name) for name, value in data.items()}
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where or 'message'}: {e}") from None


def _checker(hint: Any) -> Callable[[object, str], Any]:
    """A function that checks a JSON value against the type `hint` (and its rules) and
    returns it (a record for a record type); ValueError naming `where` if it does not fit."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        inner, *rules = typing.get_args(hint)
        base = _checker(inner)

        def annotated(value: object, where: str) -> Any:
            value = base(value, where)
            if value is not None:
                for rule in rules:
                    try:
                        ok = rule.test(value)
                    except ValueError as e:
                        raise ValueError(f"{where}: {e}") from None
                    if not ok:
                        raise ValueError(f"{where}: {value!r:.60} {rule.says}")
            return value

        return annotated
    if dataclasses.is_dataclass(hint):
        return lambda value, where: _plain_build(hint, value, where)  # type: ignore[arg-type]
    if hint is Any:
        return lambda value, where: value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if len(options) == 2 and type(None) in options:  # X | None: the common case, fast
            some = _checker(next(o for o in options if o is not type(None)))
            return lambda value, where: None if value is None else some(value, where)
        alternatives = [_checker(o) for o in options]

        def union(value: object, where: str) -> Any:
            for fits in alternatives:
                try:
                    return fits(value, where)
                except ValueError:
                    pass
            raise ValueError(f"{where}: {value!r:.60} is not of the expected type")

        return union
    if origin is Literal:
        allowed = typing.get_args(hint)

        def literal(value: object, where: str) -> Any:
            if any(type(value) is type(a) and value == a for a in allowed):
                return value
            raise ValueError(
                f"{where}: {value!r:.60} is not one of {', '.join(map(repr, allowed))}"
            )

        return literal
    if origin is dict:
        key, item = (_checker(arg) for arg in typing.get_args(hint))

        def mapping(value: object, where: str) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: an object was expected")
            return {key(k, where): item(v, f"{where}.{k}") for k, v in value.items()}

        return mapping
    if origin is list:
        (item,) = (_checker(arg) for arg in typing.get_args(hint))

        def sequence(value: object, where: str) -> Any:
            if not isinstance(value, list):
                raise ValueError(f"{where}: a list was expected")
            return [item(x, f"{where}.{i}") for i, x in enumerate(value)]

        return sequence
    if hint is type(None):
        expected: tuple[type, ...] = (type(None),)
    elif hint is bool or hint is int:
        expected = (hint,)  # exactly: True is not a count, nor 1 a flag
    else:
        expected = (hint,)

    def simple(value: object, where: str) -> Any:
        if type(value) not in expected and not (
            hint is not bool and hint is not int and isinstance(value, hint)
        ):
            raise ValueError(f"{where}: {value!r:.60} is not of the expected type")
        return value

    return simple


def _flatten(hint: Any) -> list[Any]:
    return [hint, *(x for arg in typing.get_args(hint) for x in _flatten(arg))]
