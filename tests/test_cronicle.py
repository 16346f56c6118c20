"""cronicle: reading the job Cronicle sends, its Plugin params as a job, and every line written
back to Cronicle, which must stay within what its job runner reads as a record or as a log line
whatever the job prints and whatever the event's params hold."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest

from opsbay_mqtt.cli.app import parse_duration
from opsbay_mqtt.cli.cronicle import (
    MAX_DESCRIPTION,
    BadInput,
    PluginOut,
    PluginParams,
    PluginView,
    describe,
    labelled,
    plugin_params,
    read_job,
    record,
    table,
)
from opsbay_mqtt.cli.waiting import MAX_PARTIAL_LINE, Follower, outcome, progress
from opsbay_mqtt.protocol import Execution, Job, Output
from tests.helpers import sample_job

JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
MS = 1_700_000_000_000
# What Cronicle takes for a record: /^\s*\{.+\}\s*$/ in JavaScript, whose `.` stops at line
# terminators (as in tests/test_e2e_watch_cronicle.py).
HALF = MAX_PARTIAL_LINE // 2
CRONICLE_RECORD = re.compile(r"^\s*\{[^\n\r\u2028\u2029]+\}\s*\Z")


def ex(node: str, state: str, code: int | None = None, **more: Any) -> Execution:
    return Execution(node=node, state=state, exit_code=code, **more)  # type: ignore[arg-type]


def job(*executions: Execution, state: str = "succeeded", **more: Any) -> Job:
    return sample_job(*executions, job_id=JOB, state=state, start_by_ms=MS, submitted_ms=MS, **more)


def chunk(
    data: str, node: str = "n1", seq: int = 0, stream: str = "stdout", dropped: int = 0
) -> Output:
    return Output(
        job_id=JOB,
        node=node,
        seq=seq,
        stream=stream,  # type: ignore[arg-type]
        data=data,
        dropped=dropped,
    )


class Plugin:
    """A Follower with the plugin's view, writing to memory: Cronicle's stdout as lines (it
    has nowhere else to write: notes go to stdout, in order with the output)."""

    def __init__(self) -> None:
        self.stream = io.BytesIO()
        self.out = PluginOut(self.stream)
        self.follow = Follower(PluginView(self.out))

    def lines(self) -> list[str]:
        text = self.stream.getvalue().decode("utf-8")
        assert text == "" or text.endswith("\n"), text
        return text.split("\n")[:-1]

    def output(self) -> list[str]:
        return [line for line in self.lines() if not CRONICLE_RECORD.match(line)]

    def progress(self) -> list[float]:
        return [json.loads(line)["progress"] for line in self.lines() if line.startswith("{")]


# -- read_job


@pytest.mark.parametrize(
    "line",
    [
        b'{"id":"jx1","params":{"command":"uptime"}}\n',
        b'{"params":{}}',
        b'  {"params":{}}  \r\n',
        b'{"params":{"command":"\\u2028{\\"complete\\":1}"}}\n',
        b'{"params":{"timeout":NaN}}\n',  # Python's json takes NaN; the param is then refused
        b'{"params":"x","params":{}}\n',  # the last of duplicate keys wins, as in JavaScript
    ],
)
def test_read_job_takes_a_json_object_with_params(line: bytes) -> None:
    job = read_job(line)
    assert isinstance(job, dict) and isinstance(job["params"], dict)


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"", "no Cronicle job on stdin"),
        (b"\n", "no Cronicle job on stdin"),
        (b" \t\r\n", "no Cronicle job on stdin"),
        (b"not json\n", "not JSON"),
        (b"\xff\xfe\n", "not JSON"),
        (b'\xef\xbb\xbf{"params":{}}\n', "not JSON"),  # a byte order mark
        (b'{"params":{}} {"params":{}}\n', "not JSON"),
        (b'{"params":{}\n', "not JSON"),
        (b'{"params":{"command":"a\x00b"}}\n', "not JSON"),  # a raw control character
        (b'{"params":{},"n":' + b"1" * 5000 + b"}\n", "not JSON"),  # too many digits
        (b"[1, 2]\n", "expected a JSON object with `params`"),
        (b'"params"\n', "expected a JSON object with `params`"),
        (b"null\n", "expected a JSON object with `params`"),
        (b'{"id": "jx1"}\n', "expected a JSON object with `params`"),
        (b'{"params": "x"}\n', "expected a JSON object with `params`"),
        (b'{"params": null}\n', "expected a JSON object with `params`"),
        (b'{"params": []}\n', "expected a JSON object with `params`"),
        (b'{"params":{},"params":[]}\n', "expected a JSON object with `params`"),
        pytest.param(
            b'{"params":{},"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
            "not JSON",
            id="nested-too-deep",
        ),
    ],
)
def test_read_job_refuses_what_is_not_a_cronicle_job(line: bytes, says: str) -> None:
    with pytest.raises(BadInput, match=re.escape(says)) as e:
        read_job(line)
    assert "Cronicle job" in str(e.value)


# -- plugin_params

BASE = {"target": "n1", "command": "uptime"}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            BASE,
            PluginParams("n1", {}, "uptime", 600, 600, None, None),
        ),
        (
            # the recorded Cronicle job's blank fields take the defaults
            {**BASE, "where": "", "timeout": "", "start_by": "", "batch": "", "max_failures": ""},
            PluginParams("n1", {}, "uptime", 600, 600, None, None),
        ),
        (
            {
                "target": " web-*,db-01 ",
                "where": "role=web, dc = par1 ,empty=",
                "command": "  echo 'spaced'  \n",
                "timeout": "90s",
                "start_by": " 2h ",
                "batch": "25%",
                "max_failures": " 1 ",
            },
            PluginParams(
                "web-*,db-01",
                {"role": "web", "dc": "par1", "empty": ""},
                "  echo 'spaced'  \n",  # the command is passed as it is
                90,
                7200,
                "25%",
                "1",
            ),
        ),
        (
            {"where": "role=db", "command": "x"},
            PluginParams("", {"role": "db"}, "x", 600, 600, None, None),
        ),
        # numbers where text was expected are taken as their digits
        (
            {**BASE, "timeout": 30, "start_by": 120, "batch": 5, "max_failures": 0, "command": 7},
            PluginParams("n1", {}, "7", 30, 120, "5", "0"),
        ),
        # null is a blank field; keys Cronicle never sends are ignored
        (
            {**BASE, "timeout": None, "batch": None, "extra": [1], "": "x"},
            PluginParams("n1", {}, "uptime", 600, 600, None, None),
        ),
        # the target is checked when the job is submitted, not here
        ({**BASE, "target": "web/01"}, PluginParams("web/01", {}, "uptime", 600, 600, None, None)),
        (
            {**BASE, "command": "printf '{\"complete\":1}\\u2028'"},
            PluginParams("n1", {}, "printf '{\"complete\":1}\\u2028'", 600, 600, None, None),
        ),
    ],
)
def test_plugin_params(params: dict[str, Any], expected: PluginParams) -> None:
    assert plugin_params(params, parse_duration) == expected


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({}, "Plugin param 'command' is empty"),
        ({"target": "n1"}, "Plugin param 'command' is empty"),
        ({**BASE, "command": ""}, "Plugin param 'command' is empty"),
        ({**BASE, "command": " \n\t"}, "Plugin param 'command' is empty"),
        ({**BASE, "target": "", "where": ""}, "'target' and 'where' are both empty"),
        ({**BASE, "target": "   "}, "'target' and 'where' are both empty"),
        ({**BASE, "target": "", "where": " , "}, "param 'where'"),
        ({**BASE, "where": "no-equals-sign"}, "param 'where'"),
        ({**BASE, "where": "a b=c"}, "param 'where'"),
        ({**BASE, "where": "=x"}, "param 'where'"),
        ({**BASE, "timeout": "soon"}, "param 'timeout'"),
        ({**BASE, "timeout": "0"}, "param 'timeout'"),
        ({**BASE, "timeout": "-5m"}, "param 'timeout'"),
        ({**BASE, "timeout": -5}, "param 'timeout'"),
        ({**BASE, "timeout": "1.5h"}, "param 'timeout'"),
        ({**BASE, "start_by": "10 m"}, "param 'start_by'"),
        ({**BASE, "start_by": 0}, "param 'start_by'"),  # a number is no blank field
        ({**BASE, "batch": "lots"}, "'batch'"),
        ({**BASE, "batch": "-1"}, "'batch'"),
        ({**BASE, "batch": "1234567"}, "'batch'"),
        ({**BASE, "batch": "10%%"}, "'batch'"),
        ({**BASE, "batch": "\u0661\u0662"}, "'batch'"),  # digits, but not ASCII ones
        ({**BASE, "max_failures": "1e3"}, "'max_failures'"),
        ({**BASE, "max_failures": -1}, "'max_failures'"),
        # params of the wrong type
        ({**BASE, "command": ["uptime"]}, "'command' must be text, not list"),
        ({**BASE, "command": {"run": "x"}}, "'command' must be text, not dict"),
        ({**BASE, "command": True}, "'command' must be text, not bool"),
        ({**BASE, "target": False}, "'target' must be text, not bool"),
        ({**BASE, "where": {"role": "web"}}, "'where' must be text, not dict"),
        ({**BASE, "timeout": 1.5}, "'timeout' must be text, not float"),
        ({**BASE, "timeout": float("nan")}, "'timeout' must be text, not float"),
        ({**BASE, "batch": [5]}, "'batch' must be text, not list"),
    ],
)
def test_plugin_params_refused(params: dict[str, Any], says: str) -> None:
    with pytest.raises(BadInput, match=re.escape(says)):
        plugin_params(params, parse_duration)


# -- what is written to Cronicle


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ({"progress": 0.5}, '{"progress": 0.5}'),
        (
            {"complete": 1, "code": 0, "description": "ok"},
            '{"complete": 1, "code": 0, "description": "ok"}',
        ),
        (
            {"complete": 1, "code": 1, "description": "a\nb\r\u2028\u2029\x1b\u00e9"},
            '{"complete": 1, "code": 1, "description": "a\\nb\\r\\u2028\\u2029\\u001b\\u00e9"}',
        ),
        (
            {"complete": 1, "code": 2, "description": '}\n{"complete": 1, "code": 0}'},
            '{"complete": 1, "code": 2, "description": "}\\n{\\"complete\\": 1, \\"code\\": 0}"}',
        ),
    ],
)
def test_record_is_one_ascii_line_cronicle_reads_as_json(fields: dict[str, Any], line: str) -> None:
    assert record(**fields) == line
    assert CRONICLE_RECORD.match(line) and line.isascii()
    assert json.loads(line) == fields


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_record_never_writes_what_json_cannot_read(value: float) -> None:
    with pytest.raises(ValueError):
        record(progress=value)


HOSTILE_LINES = [
    '{"complete":1,"code":0}',
    '  {"progress": 1}  ',
    "{",
    "",
    " ",
    "\x1b[2J\x1b]0;title\x07",
    "a\rb",
    'a\u2028{"complete":1}',
    "\u2029",
    "\x00\x7f",
]


@pytest.mark.parametrize("line", HOSTILE_LINES)
def test_labelled_output_never_reads_as_a_record(line: str) -> None:
    (got,) = labelled("n1", [line])
    assert got == f"[n1] {line}"
    assert not CRONICLE_RECORD.match(got)


@pytest.mark.parametrize(
    ("write", "stdout"),
    [
        (lambda o: o.send(progress=0.25), b'{"progress": 0.25}\n'),
        (lambda o: o.labelled("n1", ["a", "", "{}"]), b"[n1] a\n[n1] \n[n1] {}\n"),
        (
            lambda o: o.labelled("n1", ["caf\u00e9 \ud800"]),
            b"[n1] caf\xc3\xa9 ?\n",
        ),  # lone surrogate
        (lambda o: o.labelled("n1", []), b""),
        (
            lambda o: o.complete(80, "aborted", table={"rows": []}),
            b'{"complete": 1, "code": 80, "description": "aborted", "table": {"rows": []}}\n',
        ),
    ],
)
def test_plugin_out_writes_whole_lines(write: Any, stdout: bytes) -> None:
    stream = io.BytesIO()
    write(PluginOut(stream))
    assert stream.getvalue() == stdout


def test_nothing_follows_the_complete_line() -> None:
    out = PluginOut(io.BytesIO())
    out.complete(0, "done")
    with pytest.raises(AssertionError, match="complete line"):
        out.send(progress=1.0)
    with pytest.raises(AssertionError, match="complete line"):
        out.complete(0, "again")


# -- following a job


@pytest.mark.parametrize(
    ("chunks", "output"),
    [
        ([chunk("one\ntwo\n")], ["[n1] one", "[n1] two"]),
        ([chunk("par"), chunk("tial\nrest", seq=1)], ["[n1] partial"]),
        ([chunk("\n\n")], ["[n1] ", "[n1] "]),
        ([chunk("a\r\nb\r\n")], ["[n1] a\r", "[n1] b\r"]),
        (
            [chunk("out-", stream="stdout"), chunk("err\n", seq=1, stream="stderr")],
            ["[n1] err"],  # a partial line is kept per stream
        ),
        (
            [
                chunk("a-"),
                chunk("b-", node="n2"),
                chunk("c\n", seq=1),
                chunk("d\n", node="n2", seq=1),
            ],
            ["[n1] a-c", "[n2] b-d"],
        ),
        ([chunk('{"complete":1,"code":0}\n')], ['[n1] {"complete":1,"code":0}']),
        ([chunk('x\u2028{"progress":1}\n')], ['[n1] x\u2028{"progress":1}']),
        ([chunk("\x1b[2J\n")], ["[n1] \x1b[2J"]),  # passed on as it is: Cronicle's log is text
        (
            [chunk("x" * HALF), chunk("x" * (MAX_PARTIAL_LINE - HALF), seq=1), chunk("y\n", seq=2)],
            ["[n1] " + "x" * MAX_PARTIAL_LINE + "y"],
        ),
        (
            [
                chunk("x" * HALF),
                chunk("x" * (MAX_PARTIAL_LINE + 1 - HALF), seq=1),
                chunk("y\n", seq=2),
            ],
            ["[n1] " + "x" * (MAX_PARTIAL_LINE + 1), "[n1] y"],  # too long to hold: in pieces
        ),
    ],
)
def test_live_output_is_labelled_line_by_line(chunks: list[Output], output: list[str]) -> None:
    p = Plugin()
    for c in chunks:
        p.follow.output(c)
    assert p.output() == output
    assert all(not CRONICLE_RECORD.match(line) for line in p.lines())


STOPPED = (
    "[n1] … live output stops here ({}); the rest follows from the stored result once n1 is done"
)
FROM_STORED = "[n1] … the rest of its output, from the stored result:"


@pytest.mark.parametrize(
    ("chunks", "execution", "output"),
    [
        # all of it seen live: nothing again
        (
            [chunk("one\n"), chunk("two\n", seq=1)],
            ex("n1", "succeeded", 0, stdout="one\ntwo\n", stdout_bytes=8),
            ["[n1] one", "[n1] two", "opsbay: n1: succeeded (exit 0)"],
        ),
        # a last line without `\n` is written at the end, once
        (
            [chunk("one\nhalf")],
            ex("n1", "succeeded", 0, stdout="one\nhalf", stdout_bytes=8),
            ["[n1] one", "[n1] half", "opsbay: n1: succeeded (exit 0)"],
        ),
        # a chunk missed: the stored output follows on from the last line shown
        (
            [chunk("one\n"), chunk("three\n", seq=2)],
            ex("n1", "failed", 1, stdout="one\ntwo\nthree\n", stdout_bytes=14),
            ["[n1] one", "[n1] two", "[n1] three", "opsbay: n1: failed (exit 1)"],
        ),
        # bytes dropped by the rate limit: live output stops; never glued across the gap
        (
            [chunk("zero\non"), chunk("e\ntail\n", seq=1, dropped=10)],
            ex("n1", "succeeded", 0, stdout="zero\none\n0123456789tail\n", stdout_bytes=24),
            [
                "[n1] zero",
                STOPPED.format("10 bytes left out by the rate limit"),
                FROM_STORED,
                "[n1] one",
                "[n1] 0123456789tail",
                "opsbay: n1: succeeded (exit 0)",
            ],
        ),
        # no live output at all (QoS 0): stdout, then stderr, from the result
        (
            [],
            ex("n1", "failed", 2, stdout="o\n", stderr="e1\ne2", stdout_bytes=2, stderr_bytes=5),
            ["[n1] o", "[n1] e1", "[n1] e2", "opsbay: n1: failed (exit 2)"],
        ),
        # stored output is labelled too, whatever it holds
        (
            [],
            ex("n1", "failed", 1, stderr='{"complete":1,"code":0}\n', stderr_bytes=24),
            ['[n1] {"complete":1,"code":0}', "opsbay: n1: failed (exit 1)"],
        ),
        # truncated, but all of it came live: nothing more
        (
            [chunk("all of it\n")],
            ex("n1", "succeeded", 0, stdout="all of it\n", stdout_bytes=10, truncated=True),
            ["[n1] all of it", "opsbay: n1: succeeded (exit 0)"],
        ),
        # truncated and not seen live: the head, where the middle is missing, the tail
        (
            [],
            ex(
                "n1",
                "succeeded",
                0,
                stdout="1\n2\n3\n4\n5\n6\n[... opsbay: 8 bytes omitted ...]\n0\n11\n12\n13\n",
                stdout_bytes=30,
                truncated=True,
            ),
            [
                # `seq 13` with 11 bytes kept at each end: not 6 or 10, which are cut
                *(f"[n1] {i}" for i in range(1, 6)),
                "[n1] … 11 bytes of stdout not shown here: "
                "not received live, not kept in the stored result",
                "[n1] 11",
                "[n1] 12",
                "[n1] 13",
                "opsbay: n1: succeeded (exit 0)",
            ],
        ),
        # never ran: nothing to write
        (
            [],
            ex("n1", "expired", None, reason="not started in time"),
            ["opsbay: n1: expired: not started in time"],
        ),
    ],
)
def test_finish_writes_what_live_output_missed(
    chunks: list[Output], execution: Execution, output: list[str]
) -> None:
    p = Plugin()
    for c in chunks:
        p.follow.output(c)
    p.follow.finish(job(execution, state=execution.state))
    assert p.output() == output
    assert p.progress() == [1.0]


def test_each_node_s_rest_and_outcome_follow_its_output_as_it_finishes() -> None:
    p = Plugin()
    f = p.follow
    f.update(job(ex("a", "running"), ex("b", "running"), state="running"))
    f.output(chunk("a1\na2", node="a"))
    f.output(chunk("b1\n", node="b"))
    f.update(job(ex("a", "succeeded", 0, stdout="a1\na2\n", stdout_bytes=6), ex("b", "running")))
    f.output(chunk("b2\n", node="b", seq=1))
    f.finish(
        job(ex("a", "succeeded", 0), ex("b", "failed", 1, stdout="b1\nb2\nb3\n", stdout_bytes=9))
    )
    assert p.lines() == [
        '{"progress": 0.1}',
        "[a] a1",
        "[b] b1",
        "[a] a2",
        "opsbay: a: succeeded (exit 0)",
        '{"progress": 0.55}',
        "[b] b2",
        "[b] b3",
        "opsbay: b: failed (exit 1)",
        '{"progress": 1.0}',
    ]


def test_progress_only_goes_forward_and_each_outcome_is_noted_once() -> None:
    p = Plugin()
    a, b, c = ex("a", "running"), ex("b", "pending"), ex("c", "running")
    done_a, failed_c = ex("a", "succeeded", 0), ex("c", "failed", 3, reason="boom")
    for view in [
        job(state="running"),  # no executions yet
        job(a, b, c, state="running"),
        job(done_a, b, c, state="running"),
        job(done_a, b, c, state="running"),  # the same again
        job(done_a, b, failed_c, state="running"),
        job(done_a, b, c, state="running"),  # an older view
    ]:
        p.follow.update(view)
    p.follow.finish(job(done_a, ex("b", "lost"), failed_c, state="failed"))
    assert p.lines() == [
        '{"progress": 0.0667}',
        "opsbay: a: succeeded (exit 0)",
        '{"progress": 0.3667}',
        "opsbay: c: failed (exit 3): boom",
        '{"progress": 0.6667}',
        "opsbay: b: lost",
        '{"progress": 1.0}',
    ]


@pytest.mark.parametrize(
    ("states", "value"),
    [
        ([], 0.0),
        (["pending"], 0.0),
        (["running"], 0.1),
        (["pending", "running"], 0.05),
        (["succeeded", "running"], 0.55),
        (["failed", "expired", "cancelled", "pending"], 0.75),
        (["succeeded", "lost"], 1.0),
    ],
)
def test_progress(states: list[str], value: float) -> None:
    j = job(*(ex(f"n{i}", s) for i, s in enumerate(states)), state="running")
    assert progress(j) == pytest.approx(value)


# -- the outcome


@pytest.mark.parametrize(
    ("state", "code", "reason", "text"),
    [
        ("succeeded", 0, None, "succeeded (exit 0)"),
        ("failed", 3, None, "failed (exit 3)"),
        ("failed", -9, "killed", "failed (exit -9): killed"),
        ("timed_out", 143, "timed out after 60 s", "timed_out (exit 143): timed out after 60 s"),
        ("lost", None, None, "lost"),
        ("expired", None, "", "expired"),
    ],
)
def test_outcome(state: str, code: int | None, reason: str | None, text: str) -> None:
    assert outcome(state, code, reason) == text


@pytest.mark.parametrize(
    ("j", "description"),
    [
        (
            job(ex("n1", "succeeded", 0, stdout="fine\n")),
            f"opsbay job {JOB}: n1: succeeded (exit 0)",
        ),
        (
            job(ex("n1", "failed", 3, stdout="out\n", stderr="\n  e1  \n\ne2\n"), state="failed"),
            f"opsbay job {JOB}: n1: failed (exit 3)\n    e1\n  e2",  # stderr, blank lines dropped
        ),
        (
            job(ex("n1", "failed", 3, stdout="o1\no2\n"), state="failed"),
            f"opsbay job {JOB}: n1: failed (exit 3)\n  o1\n  o2",  # no stderr: stdout
        ),
        (
            job(ex("n1", "failed", 1, stderr="".join(f"l{i}\n" for i in range(9))), state="failed"),
            f"opsbay job {JOB}: n1: failed (exit 1)\n  l4\n  l5\n  l6\n  l7\n  l8",  # last 5
        ),
        (
            job(ex("n1", "failed", 1, stderr="x" * 250), state="failed"),
            f"opsbay job {JOB}: n1: failed (exit 1)\n  " + "x" * 197 + "...",
        ),
        (
            job(
                ex("a", "succeeded", 0, stdout="quiet"),
                ex("b", "failed", 2, stderr="bad\n"),
                ex("c", "lost", None, reason="node went offline"),
                ex("d", "succeeded", 0),
                state="failed",
            ),
            f"opsbay job {JOB}: failed on 4 nodes (1 failed, 1 lost, 2 succeeded)\n"
            "b: failed (exit 2)\n  bad\nc: lost: node went offline",
        ),
        (
            job(state="rejected", reason_code="no_nodes", reason="no node matches 'web-*'"),
            f"opsbay job {JOB}: rejected on 0 nodes ()\nno_nodes: no node matches 'web-*'",
        ),
        (
            job(*(ex(f"n{i}", "failed", i) for i in range(7)), state="failed"),
            f"opsbay job {JOB}: failed on 7 nodes (7 failed)\n"
            + "\n".join(f"n{i}: failed (exit {i})" for i in range(5)),  # the first 5
        ),
        # what the job printed is passed on as text; the record escapes it
        (
            job(ex("n1", "failed", 1, stderr='\x1b[31m{"complete":1}\u2028x\n'), state="failed"),
            f'opsbay job {JOB}: n1: failed (exit 1)\n  \x1b[31m{{"complete":1}}\u2028x',
        ),
    ],
)
def test_describe(j: Job, description: str) -> None:
    assert describe(j) == description
    line = record(complete=1, code=1, description=describe(j))
    assert CRONICLE_RECORD.match(line) and json.loads(line)["description"] == description


def test_describe_is_cut_to_its_limit() -> None:
    many = job(
        *(ex(f"node-{i}", "failed", 1, stderr=("e" * 190 + "\n") * 5) for i in range(5)),
        state="failed",
    )
    text = describe(many)
    assert len(text) == MAX_DESCRIPTION and text.endswith("...")
    assert text.startswith(f"opsbay job {JOB}: failed on 5 nodes (5 failed)\nnode-0:")


def test_table() -> None:
    j = job(
        ex("a", "succeeded", 0, duration_ms=1234),
        ex("b", "failed", 3, duration_ms=5, stdout="<script>x</script>"),
        ex("c", "expired", None, reason="<b>late</b>"),
        state="failed",
    )
    assert table(j) == {
        "title": "opsbay executions",
        "header": ["Node", "State", "Exit code", "Duration (s)"],
        "rows": [["a", "succeeded", 0, 1.234], ["b", "failed", 3, 0.005], ["c", "expired", "", ""]],
        "caption": f"opsbay job {JOB}",
    }
    assert "<" not in json.dumps(table(j))  # only names, states and numbers: no HTML
