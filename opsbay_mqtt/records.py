"""The protocol's plain data: a job and its executions as the coordinator records them, a
refusal as its submitter reads it, what someone asks to run, the protocol's version and the
form of a rollout limit.

Plain frozen dataclasses (a named tuple for `SubmitArgs`), not pydantic models (`protocol` holds
those): the coordinator builds jobs from messages it has already validated and from its own
database, and the CLI reads them from signed messages without importing pydantic, which would
double the start-up of every `opsbay submit --wait`. What comes over the wire is still checked
field by field (`*_from_wire`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from opsbay_mqtt.errors import Refused
from opsbay_mqtt.states import ExecState, JobState

PROTOCOL_VERSION = 1
# A rollout limit: a count ("10") or a share of the executions ("25%").
LIMIT_PATTERN = r"(0|[1-9][0-9]{0,5})%?"


@dataclass(frozen=True, kw_only=True)
class Execution:
    """One job on one node."""

    node: str
    state: ExecState
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    dispatched_ms: int | None = None
    start_by_ms: int | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    duration_ms: int | None = None
    reason: str | None = None
    host: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job and its executions (all of them, or those an event or a listing carries)."""

    job_id: str
    state: JobState
    target: str
    where: dict[str, str] = field(default_factory=dict)
    command: str
    timeout_s: int
    start_by_ms: int
    batch: str | None = None
    max_failures: str | None = None
    submitted_ms: int
    submitted_by: str
    submitted_kid: str = ""
    reason_code: str | None = None
    reason: str | None = None
    executions: list[Execution] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Rejection:
    """A refused submission or cancel, as its submitter reads it (the `rejected` message)."""

    job_id: str | None = None
    nonce: str | None = None  # of the refused message, so its sender knows it is the one
    code: str
    reason: str


class SubmitArgs(typing.NamedTuple):
    """What someone asks to run, before a job id and an absolute deadline are chosen (the
    arguments of Client.submit, from the command line or a Cronicle job)."""

    target: str
    where: dict[str, str]
    command: str
    timeout_s: int
    start_by_s: int
    batch: str | None
    max_failures: str | None


_Record = typing.TypeVar("_Record", Job, Execution)


def replace(record: _Record, /, **changes: Any) -> _Record:
    """`dataclasses.replace` for a job or an execution, without running `__init__` again (the
    coordinator does it several times per message; docs/benchmarks.md). The records have no
    `__post_init__`, so the result is the same."""
    cls = type(record)
    unknown = changes.keys() - _HINTS[cls].keys()
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    new = object.__new__(cls)
    new.__dict__.update(record.__dict__)
    new.__dict__.update(changes)
    return new


def as_dict(record: Job | Execution) -> dict[str, Any]:
    """The record as JSON-ready data (what replies and events carry): new dicts all the way
    down, so the caller may change them."""
    d = fields_of(record)
    if isinstance(record, Job):
        d["where"] = dict(record.where)
        d["executions"] = [as_dict(x) for x in record.executions]
    else:
        d["host"] = dict(record.host)
    return d


def fields_of(record: Job | Execution) -> dict[str, Any]:
    """The record's own fields, not copied (a job's executions stay records)."""
    return {f: getattr(record, f) for f in _HINTS[type(record)]}


def message_body(obj: dict[str, Any], kid: str | None) -> dict[str, Any]:
    """A parsed message without its signature, once its version is this protocol's; `Refused`
    otherwise (signed for `kid`, the key that proved the sender, if any)."""
    body = {k: v for k, v in obj.items() if k not in ("auth", "sig")}
    version = body.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Refused("bad_version", f"protocol version {version!r} is not supported (1)", kid)
    return body


def job_from_wire(data: object) -> Job:
    """A job read from a message: every field checked against its type; ValueError if not."""
    fields = _checked(Job, data, "job")
    executions = fields.get("executions", [])
    fields["executions"] = [
        Execution(**_checked(Execution, x, f"job.executions.{i}")) for i, x in enumerate(executions)
    ]
    return Job(**fields)


def rejection_from_wire(body: dict[str, Any]) -> Rejection:
    """A `rejected` message's body (without `v`, `type`, `auth` and `sig`); ValueError if it
    is not one."""
    return Rejection(**_checked(Rejection, body, "rejected"))


_HINTS: dict[type, dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in (Execution, Job, Rejection)
}
_REQUIRED: dict[type, frozenset[str]] = {
    cls: frozenset(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    for cls in (Execution, Job, Rejection)
}


def _checked(cls: type, data: object, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: an object was expected")
    checks = _CHECKS[cls]
    unknown = sorted(set(data) - set(checks))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
    for name in _REQUIRED[cls] - set(data):
        raise ValueError(f"{where}.{name}: missing")
    for name, value in data.items():
        if not checks[name](value):
            raise ValueError(f"{where}.{name}: {value!r:.60} is not of the expected type")
    return dict(data)


def _check(hint: Any) -> Callable[[object], bool]:
    """A test for whether a JSON value is of the type `hint`, worked out once per field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return lambda value: True
    if origin in (typing.Union, types.UnionType):
        alternatives = [_check(arg) for arg in typing.get_args(hint)]
        return lambda value: any(fits(value) for fits in alternatives)
    if origin is Literal:
        allowed = typing.get_args(hint)
        return lambda value: any(type(value) is type(a) and value == a for a in allowed)
    if origin is dict:
        key, item = (_check(arg) for arg in typing.get_args(hint))
        return lambda value: (
            isinstance(value, dict) and all(key(k) and item(v) for k, v in value.items())
        )
    if origin is list:
        return lambda value: isinstance(value, list)  # the items are checked by the caller
    if hint is type(None):
        return lambda value: value is None
    if hint is bool or hint is int:
        return lambda value: type(value) is hint  # True is not a count, nor 1 a flag
    return lambda value: isinstance(value, hint)


_CHECKS: dict[type, dict[str, Callable[[object], bool]]] = {
    cls: {name: _check(hint) for name, hint in hints.items()} for cls, hints in _HINTS.items()
}
