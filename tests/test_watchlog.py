"""watchlog: what `opsbay watch` subscribes to, which messages it reads and shows, and the lines
it prints for them, including for messages whoever may publish chose to make hostile."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from opsbay_mqtt.cli.watchlog import (
    JOB_PREFIX_RE,
    Seen,
    clock,
    human_lines,
    json_line,
    matches,
    read_message,
    split_lines,
    subscriptions,
)
from opsbay_mqtt.protocol import (
    Execution,
    Job,
    JobEvent,
    Message,
    NodeStatus,
    Output,
    Rejected,
    Result,
    encode,
    encode_unsigned,
    replace,
    wire,
)
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from tests.helpers import sample_job

TOPICS = Topics("ob")
KEYRING = Keyring.shared("watch-secret")
OTHER_KEYRING = Keyring.shared("another-secret", kid="other")
FORGER = Keyring.shared("not-the-watch-secret")  # claims our key id, "default"
NOW_S = 1_700_000_000  # 2023-11-14 22:13:20 UTC
NOW = NOW_S + 0.123
CLOCK = "22:13:20.123"  # NOW in UTC, see the `utc` fixture
JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
JOB2 = "0a1b2c3d-0000-4000-8000-000000000002"


@pytest.fixture
def utc() -> Iterator[None]:
    """Local time is UTC for the test, so printed clocks can be compared."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()


def ex(node: str, state: str, code: int | None = None, reason: str | None = None) -> Execution:
    return Execution(node=node, state=state, exit_code=code, reason=reason)  # type: ignore[arg-type]


def job(*executions: Execution, state: str = "running", job_id: str = JOB) -> Job:
    ms = NOW_S * 1000
    return sample_job(*executions, job_id=job_id, state=state, start_by_ms=ms, submitted_ms=ms)


def event(
    *executions: Execution, state: str = "running", counts: dict[str, int] | None = None
) -> JobEvent:
    return JobEvent(
        job=job(*executions, state=state), counts=counts or {}, total=sum((counts or {}).values())
    )


def status(node: str = "n1", state: str = "online") -> NodeStatus:
    return NodeStatus(node=node, state=state, session=1, published_ms=1)  # type: ignore[arg-type]


def output(data: str, node: str = "n1", dropped: int = 0, job_id: str = JOB) -> Output:
    return Output(job_id=job_id, node=node, seq=0, stream="stdout", data=data, dropped=dropped)


def signed(msg: Message, keyring: Keyring = KEYRING) -> bytes:
    return encode(msg, keyring, NOW_S)


def raw(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


# -- subscriptions


@pytest.mark.parametrize(
    ("job_filter", "node", "with_output", "subs"),
    [
        (None, None, False, [("ob/jobs/+", 1), ("ob/nodes/+/status", 1)]),
        (JOB, None, False, [(f"ob/jobs/{JOB}", 1), ("ob/nodes/+/status", 1)]),
        # the start of an id cannot narrow a topic filter: every job, picked by `matches`
        ("6f1c2b1e", None, False, [("ob/jobs/+", 1), ("ob/nodes/+/status", 1)]),
        (None, "n1", False, [("ob/jobs/+", 1), ("ob/nodes/n1/status", 1)]),
        (
            None,
            None,
            True,
            [("ob/jobs/+", 1), ("ob/nodes/+/status", 1), ("ob/output/+/+", 0)],
        ),
        (
            JOB,
            "n1",
            True,
            [(f"ob/jobs/{JOB}", 1), ("ob/nodes/n1/status", 1), (f"ob/output/n1/{JOB}", 0)],
        ),
        (JOB.upper(), None, False, [("ob/jobs/+", 1), ("ob/nodes/+/status", 1)]),
    ],
)
def test_subscriptions(
    job_filter: str | None, node: str | None, with_output: bool, subs: list[tuple[str, int]]
) -> None:
    assert subscriptions(TOPICS, job_filter, node, with_output) == subs


def test_subscriptions_under_a_nested_prefix() -> None:
    assert subscriptions(Topics("site/a"), None, "n1", True) == [
        ("site/a/jobs/+", 1),
        ("site/a/nodes/n1/status", 1),
        ("site/a/output/n1/+", 0),
    ]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        (JOB, True),
        ("6", True),
        ("6f1c2b1e-8a", True),
        ("-", True),
        ("", False),
        (JOB + "0", False),  # 37 characters
        (JOB.upper(), False),
        ("+", False),
        ("#", False),
        ("not/a-job", False),
        ("6f1c\n", False),
        ("6f1c ", False),
    ],
)
def test_job_filter(text: str, ok: bool) -> None:
    assert bool(JOB_PREFIX_RE.fullmatch(text)) is ok


# -- read_message

EVENT = event(ex("n1", "running"))


@pytest.mark.parametrize(
    ("topic", "payload", "keyring", "shown"),
    [
        # signed with a key we hold: verified
        (f"ob/jobs/{JOB}", signed(EVENT), KEYRING, (EVENT, True)),
        ("ob/nodes/n1/status", signed(status()), KEYRING, (status(), True)),
        (f"ob/output/n1/{JOB}", signed(output("hi\n")), KEYRING, (output("hi\n"), True)),
        (
            f"ob/jobs/{JOB}",
            signed(Rejected(job_id=JOB, code="denied", reason="no")),
            KEYRING,
            (Rejected(job_id=JOB, code="denied", reason="no"), True),
        ),
        # no key, another key, no signature, a forged signature: shown, unverified
        (f"ob/jobs/{JOB}", signed(EVENT), None, (EVENT, False)),
        (f"ob/jobs/{JOB}", signed(EVENT, OTHER_KEYRING), KEYRING, (EVENT, False)),
        ("ob/nodes/n1/status", encode_unsigned(status()), KEYRING, (status(), False)),
        (
            "ob/nodes/n1/status",
            signed(status(), FORGER),
            KEYRING,
            (status(), False),
        ),
        # signed with a key we hold, but not what this topic carries: not shown
        (f"ob/jobs/{JOB}", signed(output("x")), KEYRING, None),
        ("ob/nodes/n1/status", signed(EVENT), KEYRING, None),
        # ... nor without a key
        (f"ob/jobs/{JOB}", signed(output("x")), None, None),
        # naming another job or node than the topic does
        (f"ob/jobs/{JOB2}", signed(EVENT), KEYRING, None),
        ("ob/nodes/n2/status", signed(status("n1")), KEYRING, None),
        ("ob/nodes/n2/status", encode_unsigned(status("n1")), None, None),
        (f"ob/output/n2/{JOB}", signed(output("x")), KEYRING, None),
        (f"ob/output/n1/{JOB2}", signed(output("x")), KEYRING, None),
        (f"ob/jobs/{JOB}", signed(Rejected(code="c", reason="r")), KEYRING, None),
        # topics watch does not read, or not of this bus
        ("ob/rejected", signed(Rejected(code="c", reason="r")), KEYRING, None),
        (
            f"ob/results/n1/{JOB}",
            signed(Result(job_id=JOB, node="n1", state="succeeded")),
            KEYRING,
            None,
        ),
        ("opsbay/nodes/n1/status", signed(status()), KEYRING, None),
        ("ob/nodes/n1/status/extra", signed(status()), KEYRING, None),
        ("ob/nodes/+/status", signed(status()), KEYRING, None),
        ("ob/jobs/not-a-job", signed(EVENT), KEYRING, None),
        # payloads that are not a message
        ("ob/nodes/n1/status", b"", None, None),
        ("ob/nodes/n1/status", b"{", KEYRING, None),
        ("ob/nodes/n1/status", b"\xff\xfe", None, None),
        ("ob/nodes/n1/status", b"[1, 2]", None, None),
        ("ob/nodes/n1/status", b"[" * 100_000, None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "v": 2}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "v": "1"}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "type": 7}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "state": "gone"}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "extra": 1}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "session": 1.5}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "node": None}), None, None),
        ("ob/nodes/n1/status", raw({**wire(status()), "node": "n1/x"}), None, None),
        (
            "ob/nodes/n1/status",
            b'{"v":1,"type":"status","node":"n1","node":"n1","state":"online",'
            b'"session":1,"published_ms":1}',
            None,
            None,
        ),
    ],
)
def test_read_message(
    topic: str, payload: bytes, keyring: Keyring | None, shown: tuple[Message, bool] | None
) -> None:
    seen = read_message(TOPICS, topic, payload, keyring)
    assert (seen and (seen.msg, seen.verified)) == shown


# -- matches


@pytest.mark.parametrize(
    ("msg", "job_filter", "node", "ok"),
    [
        (EVENT, None, None, True),
        (EVENT, JOB, None, True),
        (EVENT, JOB[:8], None, True),
        (EVENT, JOB2[:8], None, False),
        (EVENT, None, "n1", True),
        (EVENT, None, "n2", False),
        (event(), None, "n1", False),  # announces no execution, so none of n1's
        (event(ex("n1", "running"), ex("n2", "running")), JOB[:4], "n2", True),
        (Rejected(job_id=JOB, code="c", reason="r"), JOB[:3], None, True),
        (Rejected(job_id=JOB, code="c", reason="r"), None, "n1", False),
        (Rejected(code="c", reason="r"), None, None, True),
        (Rejected(code="c", reason="r"), "6", None, False),
        (status("n1"), None, None, True),
        (status("n1"), None, "n1", True),
        (status("n1"), None, "n10", False),
        (status("n1"), JOB[:8], None, False),  # a status concerns no job
        (output("x"), JOB, "n1", True),
        (output("x"), JOB2, "n1", False),
        (output("x", node="n2"), None, "n1", False),
    ],
)
def test_matches(msg: Message, job_filter: str | None, node: str | None, ok: bool) -> None:
    assert matches(Seen(msg, True), job_filter, node) is ok


# -- what is printed


@pytest.mark.parametrize(
    ("now", "text"),
    [
        (0.0, "00:00:00.000"),
        (59.999, "00:00:59.999"),
        (NOW, CLOCK),
        (NOW_S + 0.9995, "22:13:20.999"),  # milliseconds are cut, never rounded up
        (NOW_S + 0.5, "22:13:20.500"),
    ],
)
def test_clock(utc: None, now: float, text: str) -> None:
    assert clock(now) == text


J = JOB[:8]


@pytest.mark.parametrize(
    ("msg", "verified", "full_ids", "node", "lines"),
    [
        (
            event(ex("n1", "running"), counts={"running": 1}),
            True,
            False,
            None,
            [f"{CLOCK} job {J} running: n1 running [0/1]"],
        ),
        (
            event(
                ex("n1", "succeeded", 0, "why not"),
                ex("n2", "failed", 3, "exit status 3"),
                ex("n3", "lost", None, "node went offline"),
                state="failed",
                counts={"succeeded": 1, "failed": 1, "lost": 1, "running": 2},
            ),
            True,
            False,
            None,
            [
                f"{CLOCK} job {J} failed: n1 succeeded exit 0, n2 failed exit 3 (exit status 3), "
                "n3 lost (node went offline) [3/5]"
            ],
        ),
        (
            event(ex("n1", "running"), ex("n2", "succeeded", 0), counts={"succeeded": 1}),
            False,
            True,
            "n2",
            [f"{CLOCK} (unverified) job {JOB} running: n2 succeeded exit 0 [1/1]"],
        ),
        (event(state="pending"), True, False, None, [f"{CLOCK} job {J} pending [0/0]"]),
        (
            JobEvent(job=replace(job(state="pending"), schedule="nightly"), counts={}, total=0),
            True,
            False,
            None,
            [f"{CLOCK} job {J} (schedule nightly) pending [0/0]"],
        ),
        (
            Rejected(job_id=JOB, code="denied", reason="not allowed"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} rejected: denied: not allowed"],
        ),
        (
            Rejected(code="bad_json", reason="x"),
            True,
            True,
            None,
            [f"{CLOCK} job ? rejected: bad_json: x"],
        ),
        (status("n1", "offline"), False, False, None, [f"{CLOCK} (unverified) node n1 offline"]),
        (
            output("one\n\ntwo\nthree"),
            True,
            False,
            None,
            [
                f"{CLOCK} job {J} [n1] one",
                f"{CLOCK} job {J} [n1] ",
                f"{CLOCK} job {J} [n1] two",
                f"{CLOCK} job {J} [n1] three",
            ],
        ),
        (
            output("tail\n", dropped=4096),
            True,
            False,
            None,
            [f"{CLOCK} job {J} [n1] 4096 bytes dropped", f"{CLOCK} job {J} [n1] tail"],
        ),
        (output(""), True, False, None, []),
        (output("", dropped=7), True, False, None, [f"{CLOCK} job {J} [n1] 7 bytes dropped"]),
        # hostile output: control characters escaped (tab kept), nothing else touched
        (
            output("\x1b]0;pwned\x07\x1b[2J\rover\x00\x7f\tend\n"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} [n1] \\x1b]0;pwned\\x07\\x1b[2J\\x0dover\\x00\\x7f\tend"],
        ),
        (
            output('{"complete":1,"code":0}\n{"progress":1}'),
            True,
            False,
            None,
            [
                f'{CLOCK} job {J} [n1] {{"complete":1,"code":0}}',
                f'{CLOCK} job {J} [n1] {{"progress":1}}',
            ],
        ),
        (
            output("a\u2028b\u2029c\u00e9\n"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} [n1] a\u2028b\u2029c\u00e9"],
        ),
        (
            output("a\r\nb\r\n"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} [n1] a\\x0d", f"{CLOCK} job {J} [n1] b\\x0d"],
        ),
        (
            Rejected(job_id=JOB, code="c\x1b[31m", reason="line\nbreak"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} rejected: c\\x1b[31m: line\\x0abreak"],
        ),
        (
            event(ex("n1", "failed", 1, "boom\x1b[0m\nnext"), state="failed"),
            True,
            False,
            None,
            [f"{CLOCK} job {J} failed: n1 failed exit 1 (boom\\x1b[0m\\x0anext) [0/0]"],
        ),
    ],
)
def test_human_lines(
    utc: None,
    msg: Message,
    verified: bool,
    full_ids: bool,
    node: str | None,
    lines: list[str],
) -> None:
    got = human_lines(Seen(msg, verified), NOW, full_ids, node)
    assert got == lines
    assert all("\n" not in line and "\x1b" not in line for line in got)


@pytest.mark.parametrize(
    ("msg", "verified"),
    [
        (EVENT, True),
        (status("n1", "offline"), False),
        (output('a\u2028b\x1b[0m\n{"complete":1}\n'), True),
        (Rejected(job_id=None, code="c", reason="r\u00e9"), False),
    ],
)
def test_json_line(msg: Message, verified: bool) -> None:
    line = json_line(Seen(msg, verified))
    assert line.isascii() and "\n" not in line and "\r" not in line
    body = json.loads(line)
    assert body == {**wire(msg), "verified": verified}
    assert "auth" not in body and "sig" not in body


@pytest.mark.parametrize(
    ("text", "lines"),
    [
        ("", []),
        ("\n", [""]),
        ("a", ["a"]),
        ("a\n", ["a"]),
        ("a\n\nb\n\n", ["a", "", "b", ""]),
        ("a\r\nb", ["a\r", "b"]),
        ("a\rb", ["a\rb"]),
        ("a\u2028b\u0085c\x0bd", ["a\u2028b\u0085c\x0bd"]),  # `\n` only, not str.splitlines
    ],
)
def test_split_lines(text: str, lines: list[str]) -> None:
    assert split_lines(text) == lines
