"""protocol: encode/decode of every message type, and every refusal of decode.

Every test here runs twice: with the plain checks (the command line's) and with the pydantic
models derived from the same definitions (the daemons'), which must agree."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsbay_mqtt import models, protocol, signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import (
    MAX_COMMAND_BYTES,
    MAX_TIMEOUT_S,
    MESSAGE_TYPES,
    Cancel,
    Dispatch,
    Execution,
    Job,
    JobEvent,
    Message,
    NodeInfo,
    NodeStatus,
    Output,
    Query,
    Rejected,
    Reply,
    Result,
    ScheduleChange,
    ScheduleSpec,
    Submit,
    decode,
    encode,
    peek,
    wire,
)
from opsbay_mqtt.signing import Keyring
from tests.helpers import sample_job

KEYRING = Keyring.shared("protocol-secret")


@pytest.fixture(autouse=True, params=["plain", "pydantic"])
def validator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each way of validating messages."""
    check = models.validate if request.param == "pydantic" else protocol.plain_validate
    monkeypatch.setattr(protocol, "validate_message", check)
    return str(request.param)


NOW = 1_700_000_000
MS = NOW * 1000
JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"

SAMPLES: list[Message] = [
    Submit(job_id=JOB, target="web-01", command="echo h\u00e9llo", timeout_s=60, start_by_ms=MS),
    Dispatch(job_id=JOB, node="web-01", command="uptime", timeout_s=1, start_by_ms=MS + 5),
    Cancel(job_id=JOB, node="web-01"),
    Output(job_id=JOB, node="web-01", seq=3, stream="stderr", data="caf\u00e9\n", dropped=12),
    Result(
        job_id=JOB,
        node="web-01",
        state="failed",
        session=MS - 100,
        exit_code=3,
        stdout="out\n",
        stderr="err \x7f\n",
        stdout_bytes=4,
        stderr_bytes=6,
        truncated=True,
        started_ms=MS,
        finished_ms=MS + 20,
        duration_ms=20,
        reason="exit 3",
        host={"hostname": "web-01", "load_x100": [12, 30, 45]},
    ),
    Result(job_id=JOB, node="n1", state="running"),
    JobEvent(
        job=Job(
            job_id=JOB,
            state="running",
            target="web-01",
            command="sleep 1",
            timeout_s=10,
            start_by_ms=MS + 60_000,
            submitted_ms=MS,
            submitted_by="default",
            executions=[
                Execution(node="web-01", state="running", dispatched_ms=MS, started_ms=MS + 1),
                Execution(node="web-02", state="pending"),
            ],
        )
    ),
    Rejected(job_id=JOB, code="stale", reason="timestamp is 400 s old"),
    Rejected(code="bad_json", reason="message is not a JSON object"),
    Query(query="result", reply_to="r-1", correlation="c1", job_id=JOB),
    Query(query="results", reply_to="r_2", correlation="c2", node="web", state="failed", limit=5),
    ScheduleChange(
        op="add",
        name="nightly",
        change_id="0123456789abcdef",
        reply_to="r-3",
        correlation="c3",
        spec=ScheduleSpec(
            cron="30 2 * * 1-5",
            tz="Europe/Berlin",
            where={"role": "db"},
            command="backup --all",
            timeout_s=7200,
            start_within_s=600,
            batch="1",
            jitter_s=120,
        ),
    ),
    ScheduleChange(
        op="run", name="nightly", change_id="f" * 32, reply_to="r-3", correlation="c4", job_id=JOB
    ),
    Reply(correlation="c1", ok=True, data={"jobs": [{"job_id": JOB}], "n": 1}),
    Reply(correlation="c2", ok=False, code="not_found", error="no such job"),
    NodeInfo(
        node="web-01",
        session=MS,
        published_ms=MS + 1,
        agent_version="0.1.0",
        labels={"role": "web"},
        facts={"cpu_count": 4, "distro": "Debian"},
    ),
    NodeStatus(node="web-01", state="online", session=MS, seq=2, published_ms=MS + 2),
    NodeStatus(node="web-01", state="offline", session=MS, published_ms=MS + 3),
]


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert set(MESSAGE_TYPES) == {m.type for m in SAMPLES}  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_encode_decode_round_trip(msg: Message) -> None:
    wire = encode(msg, KEYRING, NOW)
    got, auth = decode(wire, KEYRING)
    assert got == msg
    assert type(got) is type(msg)
    assert (auth.kid, auth.ts) == ("default", NOW)
    got2, _ = decode(wire, KEYRING, expect=(type(msg),))
    assert got2 == msg
    # what any subscriber sees: a plain JSON object with v, type, auth and sig
    plain = json.loads(wire)
    assert plain["v"] == 1
    assert plain["type"] == msg.type  # type: ignore[attr-defined]
    assert set(plain["auth"]) == {"kid", "ts", "nonce"}


def refusal(payload: bytes, expect: tuple[type[Message], ...] | None = None) -> Refused:
    with pytest.raises(Refused) as e:
        decode(payload, KEYRING, expect)
    return e.value


def submit_body(**changes: Any) -> dict[str, Any]:
    body = wire(SAMPLES[0])
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return body


def sign(body: dict[str, Any]) -> bytes:
    return signing.sign(body, KEYRING, NOW)


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"v": 2}, "bad_version"),
        ({"v": 0}, "bad_version"),
        ({"v": "1"}, "bad_version"),
        ({"v": None}, "bad_version"),
        ({"v": ...}, "bad_version"),
        ({"v": [1]}, "bad_version"),
        ({"v": True}, "bad_version"),
        ({"type": "nope"}, "bad_type"),
        ({"type": "Submit"}, "bad_type"),
        ({"type": ...}, "bad_type"),
        ({"type": None}, "bad_type"),
        ({"type": 1}, "bad_type"),
        ({"type": ["submit"]}, "bad_type"),
        ({"type": {"submit": 1}}, "bad_type"),
        ({"command": ...}, "invalid"),
        ({"job_id": ...}, "invalid"),
        ({"timeout_s": "60"}, "invalid"),
        ({"timeout_s": True}, "invalid"),
        ({"start_by_ms": -1}, "invalid"),
        ({"command": 5}, "invalid"),
        ({"command": ["echo"]}, "invalid"),
        ({"target": None}, "invalid"),
        ({"extra": 1}, "invalid"),
        ({"job_id": "not-a-uuid"}, "invalid"),
        ({"job_id": JOB.upper()}, "invalid"),
        ({"job_id": JOB + "\n"}, "invalid"),
        ({"target": "web/01"}, "invalid"),
        ({"target": "+"}, "invalid"),
        ({"target": "#"}, "invalid"),
        ({"target": ""}, "invalid"),
        ({"target": "web\n"}, "invalid"),
        ({"target": "-web"}, "invalid"),
        ({"target": "a" * 64}, "invalid"),
        ({"timeout_s": 0}, "invalid"),
        ({"timeout_s": -1}, "invalid"),
        ({"timeout_s": MAX_TIMEOUT_S + 1}, "invalid"),
        ({"command": ""}, "invalid"),
        ({"command": "x" * (MAX_COMMAND_BYTES + 1)}, "invalid"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_decode_refuses(changes: dict[str, Any], code: str) -> None:
    assert refusal(sign(submit_body(**changes))).code == code


def test_decode_limits_are_inclusive() -> None:
    for changes in (
        {"timeout_s": 1},
        {"timeout_s": MAX_TIMEOUT_S},
        {"command": "x" * MAX_COMMAND_BYTES},
        {"target": "a" * 63},
    ):
        msg, _ = decode(sign(submit_body(**changes)), KEYRING)
        assert isinstance(msg, Submit)


def test_decode_refuses_a_command_over_the_byte_limit() -> None:
    """MAX_COMMAND_BYTES is a number of bytes: a command of multi-byte characters counts them."""
    command = "\u20ac" * (MAX_COMMAND_BYTES // 3 + 1)  # 3 bytes each in UTF-8
    assert len(command.encode()) > MAX_COMMAND_BYTES
    assert refusal(sign(submit_body(command=command))).code == "invalid"


@pytest.mark.parametrize(
    ("msg", "expect"),
    [
        (SAMPLES[0], (Dispatch,)),
        (SAMPLES[1], (Submit,)),
        (SAMPLES[2], (NodeInfo, NodeStatus)),
        (SAMPLES[-1], (Result,)),
        (SAMPLES[5], (JobEvent, Reply)),
    ],
    ids=lambda v: getattr(v, "type", "expect"),
)
def test_decode_refuses_a_type_not_expected(
    msg: Message, expect: tuple[type[Message], ...]
) -> None:
    assert refusal(encode(msg, KEYRING, NOW), expect).code == "bad_type"


@pytest.mark.parametrize(
    ("model", "changes"),
    [
        (Result, {"state": "done"}),
        (Result, {"node": "a/b"}),
        (Result, {"stdout_bytes": -1}),
        (Result, {"truncated": 1}),
        (Result, {"exit_code": "0"}),
        (Result, {"exit_code": 2**31}),  # a record's column holds 32 bits
        (Result, {"reason": "r" * 1025}),
        (NodeStatus, {"state": "away"}),
        (NodeStatus, {"seq": -1}),
        (NodeStatus, {"seq": 2**31}),
        (NodeInfo, {"labels": {"k": 1}}),
        (Query, {"query": "drop"}),
        (Query, {"reply_to": "a/b"}),
        (Query, {"correlation": ""}),
        (Query, {"limit": 0}),
        (Query, {"limit": 1001}),
        (Query, {"schedule": "a b"}),
        (ScheduleChange, {"op": "edit"}),
        (ScheduleChange, {"name": "a/b"}),
        (ScheduleChange, {"change_id": "XYZ"}),
        (ScheduleChange, {"spec": None}),  # add without its spec
        (ScheduleChange, {"job_id": JOB}),  # a job id with add
        (ScheduleChange, {"spec": {"cron": "61 * * * *"}}),
        (JobEvent, {"job": {"job_id": JOB}}),
        (Rejected, {"code": None}),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_decode_refuses_invalid_fields_of_other_types(
    model: type[Message], changes: dict[str, Any]
) -> None:
    body = wire(next(m for m in SAMPLES if type(m) is model))
    body.update(changes)
    assert refusal(sign(body)).code == "invalid"


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"cron": None}, "give cron or every_s, one of them"),
        ({"every_s": 60}, "give cron or every_s, one of them"),
        ({"cron": None, "every_s": 5}, "every_s"),
        ({"cron": None, "every_s": 60, "tz": "UTC", "jitter_s": 60}, "shorter than every_s"),
        ({"cron": None, "every_s": 60, "jitter_s": 0}, "tz applies to cron only"),
        ({"tz": "Mars/Base"}, "is not a time zone"),
        ({"tz": "localtime"}, "is not a time zone"),
        ({"cron": "@reboot"}, "@reboot has no due time"),
        ({"overlap": "queue"}, "overlap"),
        ({"jitter_s": 86401}, "jitter_s"),
        ({"target": "", "where": {}}, "give a target, labels (where), or both"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_a_schedule_spec_is_checked_as_the_docs_say(changes: dict[str, Any], says: str) -> None:
    body = wire(next(m for m in SAMPLES if isinstance(m, ScheduleChange) and m.spec))
    body["spec"].update(changes)
    e = refusal(sign(body))
    assert e.code == "invalid" and says in e.text, e.text


def test_decode_refuses_what_signing_refuses() -> None:
    signed = encode(SAMPLES[0], KEYRING, NOW)
    assert refusal(b"[]").code == "bad_json"
    assert refusal(json.dumps(wire(SAMPLES[0])).encode()).code == "unsigned"
    assert refusal(signed.replace(b"echo", b"ECHO")).code == "bad_signature"
    other = Keyring(keys={"other": b"x"}, signing_kid="other")
    with pytest.raises(Refused) as e:
        decode(signed, other)
    assert e.value.code == "unknown_key"
    with pytest.raises(Refused) as e:
        decode(signed, Keyring.shared("wrong"))
    assert e.value.code == "bad_signature"


def test_refused_text_names_the_field() -> None:
    e = refusal(sign(submit_body(timeout_s=0)))
    assert "timeout_s" in e.text
    assert str(e).startswith("invalid: ")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (encode(SAMPLES[0], KEYRING, NOW), JOB),
        (json.dumps({"job_id": JOB}).encode(), JOB),
        (json.dumps({"job_id": JOB.upper()}).encode(), None),
        (json.dumps({"job_id": 5}).encode(), None),
        (b"not json", None),
        (b"[]", None),
    ],
)
def test_peek_job_id(payload: bytes, expected: str | None) -> None:
    assert peek(payload)[0] == expected


# -- properties: decode only ever raises Refused

PROPERTY = settings(
    database=None, deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow]
)

scalars = st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
FIELD_NAMES = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)})
SAMPLE_BODIES = [wire(m) for m in SAMPLES]


@st.composite
def message_like(draw: st.DrawFn) -> dict[str, Any]:
    """Objects close to real messages: a sample with fields added, removed and replaced."""
    body: dict[str, Any] = dict(draw(st.sampled_from(SAMPLE_BODIES)))
    for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=4)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(json_values)
    body["v"] = draw(st.sampled_from([1, 1, 1, 2, 0, True, "1", None]) | json_values)
    body["type"] = draw(st.sampled_from([*MESSAGE_TYPES, "nope"]) | json_values)
    return body


expects = st.none() | st.lists(st.sampled_from(list(MESSAGE_TYPES.values())), min_size=1).map(tuple)


def only_refused(payload: bytes, expect: tuple[type[Message], ...] | None) -> None:
    with contextlib.suppress(Refused):
        decode(payload, KEYRING, expect)


@PROPERTY
@given(payload=st.binary(max_size=512), expect=expects)
def test_property_decode_of_arbitrary_bytes(
    payload: bytes, expect: tuple[type[Message], ...] | None
) -> None:
    only_refused(payload, expect)


@PROPERTY
@given(body=st.dictionaries(st.text(), json_values) | message_like(), expect=expects)
def test_property_decode_of_signed_objects(
    body: dict[str, Any], expect: tuple[type[Message], ...] | None
) -> None:
    only_refused(sign(body), expect)


# Text with lone surrogates, spelt as \\udXXX escapes: no UTF-8 form, and no valid signature.
surrogate_text = st.text(st.characters(categories=["Cs", "Ll", "Nd"]), min_size=1)


@PROPERTY
@given(body=message_like(), extra=surrogate_text, where=st.sampled_from(["key", "value"]))
def test_property_decode_of_unsigned_text_with_escapes(
    body: dict[str, Any], extra: str, where: str
) -> None:
    wire = json.loads(sign(body))
    if where == "key":
        wire[extra] = 1
    else:
        wire["zz"] = [extra]
    only_refused(json.dumps(wire, ensure_ascii=True).encode(), None)


def test_a_job_event_built_by_the_coordinator_decodes_to_the_same_job() -> None:
    """The coordinator builds events from its records (no second validation): what it sends
    must pass both ways of checking and come back as the same records."""
    job = sample_job(
        Execution(node="web-01", state="running", started_ms=MS, dispatched_ms=MS),
        Execution(
            node="web-02",
            state="failed",
            exit_code=3,
            stdout="out\n",
            stderr="é\x7f",
            host={"a": 1},
        ),
        where={"role": "web"},
        batch="50%",
    )
    event = JobEvent(job=job, counts={"running": 1, "failed": 1}, total=2)
    got, _ = decode(encode(event, KEYRING, NOW), KEYRING, JobEvent)
    assert got == event and type(got.job.executions[0]) is Execution


@pytest.mark.parametrize(
    ("msg", "topic", "code"),
    [
        (SAMPLES[1], ("node_jobs", {"node": "web-01"}), None),
        (SAMPLES[1], ("node_jobs", {"node": "web-02"}), "wrong_topic"),
        (SAMPLES[1], ("result", {"node": "web-01", "job_id": JOB}), "bad_type"),
        (SAMPLES[0], ("submit", {}), None),
        (SAMPLES[4], ("result", {"node": "web-01", "job_id": JOB}), None),
        (SAMPLES[4], ("result", {"node": "web-01", "job_id": "0" * 8 + JOB[8:]}), "wrong_topic"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_decode_checks_the_body_against_its_topic(
    msg: Message, topic: protocol.Topic, code: str | None
) -> None:
    payload = encode(msg, KEYRING, NOW)
    if code is None:
        assert decode(payload, KEYRING, topic=topic)[0] == msg
    else:
        with pytest.raises(Refused) as e:
            decode(payload, KEYRING, topic=topic)
        assert e.value.code == code
