"""waiting.OutputAssembly: each node's output as `submit --wait` and the Cronicle plugin show it,
from live chunks (QoS 0, rate-limited: some missing) and the stored result (head and tail of a
long output). What is shown is exactly what the command wrote, once and in order, or says where
something is missing: issue 11, section 7.

The hand-written tables give chunks as they arrive; the simulated ones make them as a worker
does (`livelog.LiveOutput`, its clock passed in) and the stored result as the runner does
(`runner.HeadTail`), then lose some chunks on the way."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest

from opsbay_mqtt.cli.waiting import (
    MAX_PARTIAL_LINE,
    Ending,
    Follower,
    Line,
    Note,
    OutputAssembly,
    Shown,
    TerminalView,
)
from opsbay_mqtt.livelog import CHUNK_BYTES, FLUSH_EVERY_S, LiveOutput
from opsbay_mqtt.protocol import Execution, Job, Output
from opsbay_mqtt.runner import HeadTail
from tests.helpers import sample_job

JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
NOT_KEPT = "not received live, not kept in the stored result"


def chunk(
    seq: int, data: str, stream: str = "stdout", dropped: int = 0, node: str = "n1"
) -> Output:
    return Output(job_id=JOB, node=node, seq=seq, stream=stream, data=data, dropped=dropped)  # type: ignore[arg-type]


def done(
    stdout: str = "",
    stderr: str = "",
    *,
    stdout_bytes: int | None = None,
    truncated: bool = False,
    state: str = "succeeded",
    node: str = "n1",
) -> Execution:
    """An execution over, its output stored whole unless said otherwise."""
    return Execution(
        node=node,
        state=state,  # type: ignore[arg-type]
        exit_code=0 if state == "succeeded" else None,
        stdout=stdout,
        stderr=stderr,
        stdout_bytes=len(stdout.encode()) if stdout_bytes is None else stdout_bytes,
        stderr_bytes=len(stderr.encode()),
        truncated=truncated,
    )


def assemble(chunks: list[Output], ex: Execution) -> list[Shown]:
    a = OutputAssembly()
    shown = [item for c in chunks for item in a.live(c)]
    shown += a.finish(ex)
    assert a.finish(ex) == [], "a node is finished once"
    return shown


def seen(shown: list[Shown]) -> list[str]:
    """As a reader sees it: stderr lines marked `2> `, a last line without "\\n" marked."""
    out = []
    for item in shown:
        if isinstance(item, Note):
            out.append(item.text)
        else:
            text = item.text if item.stream == "stdout" else f"2> {item.text}"
            out.append(text if item.end else f"{text} (no newline)")
    return out


def stops(why: str) -> str:
    return (
        f"… live output stops here ({why}); the rest follows from the stored result once n1 is done"
    )


RESUMES = "… the rest of its output, from the stored result:"


def head_tail(text: str, cap: int) -> Execution:
    """Stored as the runner stores it: `cap` bytes of head and tail."""
    kept = HeadTail(cap)
    kept.write(text.encode())
    return done(kept.text(), stdout_bytes=kept.total, truncated=kept.truncated)


SEQ13 = "".join(f"{i}\n" for i in range(1, 14))  # 30 bytes
END = ["11", "12", "13"]
CUT = "".join(f"{i} é\n" for i in range(1, 6))  # 25 bytes: 5 a line
CD = ["charlie", "delta"]
HALF = MAX_PARTIAL_LINE // 2
MISMATCH = "… the stored stdout does not line up with the output above; here it is whole:"

# -- chunks as they arrive


@pytest.mark.parametrize(
    ("chunks", "ex", "expected"),
    [
        pytest.param(
            [chunk(0, "one\ntw"), chunk(1, "o\nthree\n")],
            done("one\ntwo\nthree\n"),
            ["one", "two", "three"],
            id="in-order-a-line-across-chunks",
        ),
        pytest.param(
            [chunk(0, "1\n2"), *(chunk(i, f"{i + 2}\n") for i in range(2, 8))],
            done("1\n2\n3\n4\n5\n6\n7\n8\n9\n"),
            ["1", stops("a chunk of it was lost"), RESUMES, *"23456789"],
            id="a-chunk-lost-in-the-middle",
        ),
        pytest.param(
            [chunk(0, "alpha\nbr"), chunk(1, "lie\ndelta\n", dropped=9)],
            done("alpha\nbravo\ncharlie\ndelta\n"),
            # not "brlie": the line being written is never glued across the gap
            ["alpha", stops("9 bytes left out by the rate limit"), RESUMES, "bravo", *CD],
            id="bytes-dropped-mid-line",
        ),
        pytest.param(
            [chunk(0, "1\n2\n3")],
            done("1\n2\n3\n4\n"),
            ["1", "2", "3", "4"],
            id="the-last-chunk-lost",
        ),
        pytest.param(
            [chunk(0, "a\n"), chunk(2, "c\n"), chunk(1, "b\n"), chunk(3, "d")],
            done("a\nb\nc\nd"),
            ["a", "b", "c", "d (no newline)"],
            id="reordered",
        ),
        pytest.param(
            [chunk(0, "a\n"), chunk(0, "a\n"), chunk(2, "c\n"), chunk(1, "b\n"), chunk(2, "c\n")],
            done("a\nb\nc\n"),
            ["a", "b", "c"],
            id="duplicates",
        ),
        pytest.param(
            [chunk(0, "caf"), chunk(1, "é ✓\n𝄞"), chunk(2, "\n")],
            done("café ✓\n𝄞\n"),
            ["café ✓", "𝄞"],
            id="multi-byte-characters",
        ),
        pytest.param(
            [chunk(0, "x\nno newline at the end")],
            done("x\nno newline at the end"),
            ["x", "no newline at the end (no newline)"],
            id="no-final-newline",
        ),
        pytest.param(
            [chunk(0, "x\ny")],
            done("x\nyz"),
            ["x", "yz (no newline)"],  # once, and whole
            id="no-final-newline-its-end-lost",
        ),
        pytest.param(
            [chunk(0, "o1\n"), chunk(1, "e1\ne", stream="stderr"), chunk(2, "o2")],
            done("o1\no2", "e1\ne2\n"),
            ["o1", "2> e1", "o2 (no newline)", "2> e2"],
            id="stdout-and-stderr",
        ),
        pytest.param(
            [chunk(0, "1\n2\n"), chunk(1, "3\n", stream="stderr"), chunk(2, "4\n", dropped=5)],
            done("1\n2\n5\n6\n", "3\n4\n"),
            ["1", "2", "2> 3", stops("5 bytes left out by the rate limit"), RESUMES, *"56", "2> 4"],
            id="a-gap-stops-both-streams",
        ),
        pytest.param(
            [chunk(0, SEQ13[:-4]), chunk(1, SEQ13[-4:])],
            head_tail(SEQ13, 11),
            [str(i) for i in range(1, 14)],
            id="truncated-but-all-of-it-came-live",
        ),
        pytest.param(
            [],
            head_tail(SEQ13, 11),
            # 11 bytes kept at each end: 6 and 10 may be cut lines, so they are not shown
            [*"12345", f"… 11 bytes of stdout not shown here: {NOT_KEPT}", "11", "12", "13"],
            id="truncated-nothing-live",
        ),
        pytest.param(
            [chunk(0, SEQ13[:22]), chunk(1, SEQ13[22:], dropped=3)],
            head_tail(SEQ13, 11),
            # 1..10 came live, past the head and into the tail: it goes on from there
            [*"123456789", "10", stops("3 bytes left out by the rate limit"), RESUMES, *END],
            id="truncated-live-past-the-head",
        ),
        pytest.param(
            [chunk(0, SEQ13[:3])],
            head_tail(SEQ13, 5),
            ["1", "2", f"… 23 bytes of stdout not shown here: {NOT_KEPT}", "13"],
            id="truncated-live-within-the-head",
        ),
        pytest.param(
            [],
            head_tail(CUT, 7),  # b"1 \xc3\xa9\n2 \xc3" ... b"\xa9\n5 \xc3\xa9\n"
            ["1 é", f"… 15 bytes of stdout not shown here: {NOT_KEPT}", "5 é"],
            id="truncated-characters-cut-at-both-edges",
        ),
        pytest.param(
            [chunk(0, CUT[:16]), chunk(1, CUT[16:], dropped=2)],
            head_tail(CUT, 7),
            [*CUT.splitlines()[:4], stops("2 bytes left out by the rate limit"), RESUMES, "5 é"],
            id="truncated-characters-cut-live-into-the-tail",
        ),
        pytest.param(
            [],
            done("12\n13\n", stdout_bytes=30, truncated=True),
            [f"… 27 bytes of stdout not shown here: {NOT_KEPT}", "13"],
            id="cut-to-its-tail-by-the-coordinator",
        ),
        pytest.param(
            [],
            done("13", stdout_bytes=30, truncated=True),
            [f"… the last 30 bytes of stdout are not shown: {NOT_KEPT}"],
            id="only-a-cut-line-kept",
        ),
        pytest.param(
            [chunk(0, "a\nb"), chunk(2, "x\n"), *(chunk(i, "y\n") for i in range(3, 7))],
            done("c\nd\n"),
            ["a", stops("a chunk of it was lost"), RESUMES, MISMATCH, "c", "d"],
            id="stored-result-that-does-not-line-up",
        ),
        pytest.param(
            [chunk(0, "a\ufffd\nb")],
            done("a\ufffd\nb\n", stdout_bytes=5),  # b"a\xff\nb\n": not UTF-8
            ["a\ufffd", "b"],
            id="not-utf-8",
        ),
        pytest.param(
            [chunk(0, "1\n2"), chunk(1, "3\n", dropped=2)],
            done(state="lost"),
            ["1", stops("2 bytes left out by the rate limit"), "… the rest of stdout is not known"],
            id="lost-nothing-stored",
        ),
        pytest.param(
            [chunk(0, "1\n2")],
            done(state="lost"),
            ["1", "2 (no newline)"],
            id="lost-the-live-output-is-all-there-is",
        ),
        pytest.param(
            [chunk(0, "x" * MAX_PARTIAL_LINE), chunk(1, "xx\ny\n")],
            done("x" * (MAX_PARTIAL_LINE + 2) + "\ny\n"),
            ["x" * (MAX_PARTIAL_LINE + 2), "y"],
            id="a-long-line",
        ),
        pytest.param(
            [
                chunk(0, "x" * HALF),
                chunk(1, "x" * (MAX_PARTIAL_LINE + 1 - HALF)),
                chunk(2, "x\ny\n"),
            ],
            done("x" * (MAX_PARTIAL_LINE + 2) + "\ny\n"),
            ["x" * (MAX_PARTIAL_LINE + 1) + " (no newline)", "x", "y"],  # in pieces
            id="a-line-too-long-to-hold",
        ),
        pytest.param([], done(state="expired"), [], id="never-ran"),
    ],
)
def test_assembly(chunks: list[Output], ex: Execution, expected: list[str]) -> None:
    assert seen(assemble(chunks, ex)) == expected


def test_nothing_live_after_the_node_is_done() -> None:
    a = OutputAssembly()
    assert seen(a.live(chunk(0, "a\n"))) == ["a"]
    assert seen(a.finish(done("a\nb\n"))) == ["b"]
    assert a.live(chunk(1, "late\n")) == []


def test_nodes_are_assembled_apart() -> None:
    a = OutputAssembly()
    got = a.live(chunk(0, "a-", node="a")) + a.live(chunk(0, "b-", node="b"))
    got += a.live(chunk(2, "lost-before\n", node="a", dropped=1))
    got += a.live(chunk(1, "b\n", node="b"))
    got += a.finish(done("a-a\n", node="a")) + a.finish(done("b-b\n", node="b"))
    assert [(x.node, x.text) for x in got] == [("b", "b-b"), ("a", "a-a")]


# -- chunks as a worker makes them, some lost on the way


@dataclass
class Run:
    """A command's output as the worker sends it live and as it is stored."""

    chunks: list[Output]
    ex: Execution


def run(text: str, *, read: int, seconds_per_read: float, cap: int = 1 << 24) -> Run:
    """The worker's side: the runner reads `read` bytes at a time (`seconds_per_read` apart)
    into LiveOutput, flushed every 100 ms and at the end, and into the stored head and tail."""
    raw = text.encode()
    sent: list[Output] = []
    now = 0.0
    live = LiveOutput(JOB, "n1", sent.append, clock=lambda: now)
    kept = HeadTail(cap)
    flushed = 0.0
    for at in range(0, len(raw), read):
        piece = raw[at : at + read]
        live.write("stdout", piece)
        kept.write(piece)
        now += seconds_per_read
        if now - flushed >= FLUSH_EVERY_S:
            live.flush()
            flushed = now
    live.flush(final=True)
    return Run(sent, done(kept.text(), stdout_bytes=kept.total, truncated=kept.truncated))


def problems(shown: list[Shown], text: str) -> list[str]:
    """What is wrong with `shown` as stdout that was `text` (its lines all different): a line
    never written, a line twice or out of order, lines left out where no note says so."""
    lines = text.split("\n")
    final = lines.pop()
    place = {line: i for i, line in enumerate(lines)}
    assert len(place) == len(lines), "the test needs lines that differ"
    wrong: list[str] = []
    expected, noted, ended = 0, False, False
    for item in shown:
        if isinstance(item, Note):
            noted = True
            continue
        if ended:
            wrong.append(f"after the last line: {item.text!r}")
        if item.end == "":
            if item.text != final:
                wrong.append(f"not the last line: {item.text!r}")
            ended = True
        elif item.text not in place:
            wrong.append(f"never written: {item.text[:40]!r}")
        elif place[item.text] < expected:
            wrong.append(f"twice or out of order: {item.text[:40]!r}")
        else:
            if place[item.text] > expected and not noted:
                wrong.append(f"lines {expected}..{place[item.text] - 1} left out, no note")
            expected, noted = place[item.text] + 1, False
    if expected < len(lines) and not noted:
        wrong.append(f"lines {expected}.. left out at the end, no note")
    if final and not ended and not noted:
        wrong.append("the last line (no newline) left out, no note")
    return wrong


def shown_after_losing(r: Run, lost: set[int]) -> list[Shown]:
    sent = {c.seq for c in r.chunks}
    assert lost <= sent, f"only {len(sent)} chunks"
    return assemble([c for c in r.chunks if c.seq not in lost], r.ex)


SEQ = "".join(f"{i}\n" for i in range(1, 100_001))  # `seq 1 100000`: 588,895 bytes
MULTI = "".join(f"{i} é✓𝄞 ünï\n" for i in range(1, 12_001))  # 2-, 3- and 4-byte characters
SLOW = 1.0  # a second per read: never beyond the rate limit


@pytest.mark.parametrize(
    ("text", "read", "seconds_per_read", "lost"),
    [
        pytest.param(SEQ, CHUNK_BYTES, SLOW, set(), id="seq-in-order"),
        pytest.param(SEQ, CHUNK_BYTES, SLOW, {3, 17, 18}, id="seq-chunks-lost"),
        pytest.param(SEQ, CHUNK_BYTES, SLOW, {35}, id="seq-its-last-chunk-lost"),
        pytest.param(MULTI, 1000, SLOW, set(), id="multi-byte-cut-at-every-read"),
        pytest.param(MULTI, 1000, SLOW, {2, 40, 41}, id="multi-byte-chunks-lost"),
        pytest.param(SEQ + "no newline", 4096, SLOW, {100}, id="no-final-newline"),
        pytest.param(SEQ, 65536, 0.0, set(), id="seq-fast-all-stored"),
        pytest.param(SEQ, 4096, 0.005, {2, 20}, id="seq-fast-trickling-all-stored"),
    ],
)
def test_output_stored_whole_is_shown_whole_whatever_live_missed(
    text: str, read: int, seconds_per_read: float, lost: set[int]
) -> None:
    shown = shown_after_losing(run(text, read=read, seconds_per_read=seconds_per_read), lost)
    assert problems(shown, text) == []
    assert "".join(x.text + x.end for x in shown if isinstance(x, Line)) == text
    if not lost and seconds_per_read == SLOW:
        assert not [x for x in shown if isinstance(x, Note)]


@pytest.mark.parametrize(
    ("text", "read", "seconds_per_read", "lost"),
    [
        pytest.param(SEQ, 65536, 0.0, set(), id="seq-beyond-the-burst"),
        pytest.param(SEQ, 4096, 0.005, set(), id="seq-trickling-past-the-rate-limit"),
        pytest.param(SEQ, 4096, 0.005, {1, 5}, id="seq-trickling-and-chunks-lost"),
        pytest.param(SEQ, CHUNK_BYTES, SLOW, {2}, id="seq-a-chunk-lost-within-the-head"),
        pytest.param(SEQ, CHUNK_BYTES, SLOW, {33}, id="seq-a-chunk-lost-within-the-tail"),
        pytest.param(SEQ, CHUNK_BYTES, SLOW, {15}, id="seq-a-chunk-lost-in-the-middle"),
        pytest.param(MULTI, 65536, 0.0, set(), id="multi-byte-beyond-the-burst"),
        pytest.param(MULTI, 1000, SLOW, {10}, id="multi-byte-a-chunk-lost-within-the-head"),
        pytest.param(MULTI, 1000, SLOW, {250}, id="multi-byte-a-chunk-lost-within-the-tail"),
        pytest.param(MULTI, 1000, SLOW, {120}, id="multi-byte-a-chunk-lost-in-the-middle"),
    ],
)
def test_output_with_its_middle_not_stored_is_shown_once_in_order_saying_what_is_missing(
    text: str, read: int, seconds_per_read: float, lost: set[int]
) -> None:
    """The issue's case: `seq 1 100000`, the stored result keeping 64 KiB at each end; and
    the same with characters of 2 to 4 bytes, which the head and the tail may cut."""
    r = run(text, read=read, seconds_per_read=seconds_per_read, cap=64 * 1024)
    assert r.ex.truncated
    shown = shown_after_losing(r, lost)
    assert problems(shown, text) == []
    lines = text.split("\n")[:-1]
    kept = {x.text for x in shown if isinstance(x, Line)}
    assert lines[0] in kept and lines[-1] in kept
    missing = sum(len(f"{line}\n".encode()) for line in lines if line not in kept)
    said = [x.text for x in shown if isinstance(x, Note) and "bytes of stdout not shown" in x.text]
    # what the notes say is missing adds up to what is
    assert sum(int(t.split()[1].replace(",", "")) for t in said) == missing


def test_the_checker_catches_what_the_old_way_showed() -> None:
    """What this replaces (issue 11, 7): the line being written glued to whatever came after a
    gap, and the whole stored result again after live output. Kept to show the test data
    catches it: lines seq never printed, lines twice."""
    r = run(SEQ, read=4096, seconds_per_read=0.005, cap=64 * 1024)
    text = "".join(c.data for c in r.chunks if c.stream == "stdout") + r.ex.stdout
    old: list[Shown] = [Line("n1", "stdout", line) for line in text.split("\n")[:-1]]
    wrong = problems(old, SEQ)
    assert any("never written" in w for w in wrong) and any("twice" in w for w in wrong)


# -- submit --wait


def test_wait_view_labels_each_node_and_shows_each_line_once() -> None:
    out, err = io.StringIO(), io.StringIO()
    view = Follower(TerminalView(out, err, labelled=True))
    view.output(chunk(0, "a1\na", node="a"))
    view.output(chunk(0, "b1\n", node="b"))
    view.output(chunk(1, "2\n", node="a", dropped=4))
    a, b = done("a1\na2\na3\n", node="a"), done("b1\nb2\n", node="b", state="failed")
    view.update(sample_job(a, done(node="b", state="running"), job_id=JOB, state="running"))
    view.finish(sample_job(a, b, job_id=JOB, state="failed"))
    assert out.getvalue().splitlines() == [
        "[a] a1",
        "[b] b1",
        "[a] … live output stops here (4 bytes left out by the rate limit); "
        "the rest follows from the stored result once a is done",
        "[a] … the rest of its output, from the stored result:",
        "[a] a2",
        "[a] a3",
        "[b] b2",
    ]
    assert err.getvalue().splitlines() == [
        "opsbay: a: succeeded (exit 0)",
        f"opsbay: job {JOB} on b: failed",
        f"opsbay: job {JOB}: failed (1 failed, 1 succeeded)",
    ]


def test_wait_view_one_node_followed_writes_its_output_as_it_is() -> None:
    out, err = io.StringIO(), io.StringIO()
    view = Follower(TerminalView(out, err))
    view.output(chunk(0, "line 1\nli", node="n1"))
    view.output(chunk(1, "ne 2\nno newline", node="n1"))
    ex = done("line 1\nline 2\nno newline", node="n1")
    view.finish(sample_job(ex, job_id=JOB, target="n1"))
    assert (out.getvalue(), err.getvalue()) == ("line 1\nline 2\nno newline", "")


class Recorder:
    """A `waiting.View` that keeps what the follower gives it."""

    def __init__(self, per_node: bool) -> None:
        self.node_by_node = per_node
        self.seen: list[object] = []

    def per_node(self, job: Job) -> bool:
        return self.node_by_node

    def live(self, shown: list[Shown]) -> None:
        self.seen.append(("live", [x.text for x in shown]))

    def running(self, job: Job, ended: list[tuple[Execution, list[Shown]]]) -> None:
        self.seen.append(("running", [(ex.node, [x.text for x in rest]) for ex, rest in ended]))

    def over(self, job: Job, endings: list[Ending]) -> None:
        self.seen.append(("over", [(e.ex.node, e.told, _texts(e.rest)) for e in endings]))


def _texts(shown: list[Shown] | None) -> list[str] | None:
    return None if shown is None else [x.text for x in shown]


def test_follower_tells_each_end_once_then_the_rest_of_each_node_once_the_job_is_over() -> None:
    view = Recorder(per_node=True)
    f = Follower(view)
    f.output(chunk(0, "a1\na", node="a"))
    running = done(node="b", state="running")
    f.update(sample_job(done("a1\na2\n", node="a"), running, job_id=JOB, state="running"))
    f.update(sample_job(done("a1\na2\n", node="a"), running, job_id=JOB, state="running"))
    f.finish(sample_job(done("a1\na2\n", node="a"), done("b1\n", node="b"), job_id=JOB))
    assert view.seen == [
        ("live", ["a1"]),
        ("running", [("a", ["a2"])]),
        ("running", []),  # a's end is told once
        ("over", [("a", True, []), ("b", False, ["b1"])]),
    ]


def test_follower_of_one_node_leaves_its_output_as_stored_unless_followed() -> None:
    view = Recorder(per_node=False)
    f = Follower(view)
    f.update(sample_job(done("x\n"), job_id=JOB))  # not node by node: nothing until the end
    f.finish(sample_job(done("x\n"), job_id=JOB))
    followed = Recorder(per_node=False)
    g = Follower(followed)
    g.output(chunk(0, "x\n"))
    g.finish(sample_job(done("x\n"), job_id=JOB))
    assert view.seen == [("over", [("n1", False, None)])]
    assert followed.seen == [("live", ["x"]), ("over", [("n1", False, [])])]
