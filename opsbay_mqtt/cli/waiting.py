"""Following a job to its end, for `submit --wait` and the Cronicle plugin: each node's output,
assembled from its live chunks and its stored result (pure: `OutputAssembly`); the executions
as they end and what is left once the job is over (`Follower`); and how that looks, a `View`:
`TerminalView` here (stdout and stderr, a progress line on a terminal), `cronicle.PluginView`
for Cronicle."""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol, TextIO

from opsbay_mqtt import states

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import Execution, Job, Output

STREAMS = ("stdout", "stderr")
MAX_PARTIAL_LINE = 64 * 1024  # characters: a longer line is passed on in pieces
REORDER_WINDOW = 4  # chunks held back while an earlier one is missing, before it counts as lost
RUNNING_SHARE = 0.1  # of a node's part of the progress, once it runs
# How runner.HeadTail marks the middle of an output it did not keep.
_OMITTED = re.compile(r"\n\[\.\.\. opsbay: (\d+) bytes omitted \.\.\.\]\n")
# What decoding the head and the tail apart makes of a character cut at their edges.
_CUT_AT_END, _CUT_AT_START = re.compile(r"\ufffd\Z"), re.compile(r"\A\ufffd{1,3}")
_NOT_KEPT = "not received live, not kept in the stored result"


@dataclass(frozen=True)
class Line:
    """A line of a node's output as the command wrote it. `end` is "\\n", or "" for an output's
    last line without one (and for the pieces of a line too long to hold)."""

    node: str
    stream: str
    text: str
    end: str = "\n"


@dataclass(frozen=True)
class Note:
    """A line about a node's output, not of it: where some is missing, and why. `stream` is
    None when it concerns both."""

    node: str
    stream: str | None
    text: str  # starts with "… "


Shown = Line | Note


@dataclass
class _Stream:
    shown: int = 0  # UTF-8 bytes of the output shown so far, up to the end of a `Line`
    last: bytes = b""  # the last `Line` shown: the stored result must hold it just before `shown`
    partial: str = ""  # received live after that, not shown yet: the line being written
    clean: bool = True  # no U+FFFD received: then the bytes of the text are the bytes written


@dataclass
class _Node:
    streams: dict[str, _Stream] = field(default_factory=lambda: {s: _Stream() for s in STREAMS})
    next_seq: int = 0
    held: dict[int, Output] = field(default_factory=dict)  # arrived before an earlier one
    live: bool = True  # until the first gap: live output after it is not shown
    done: bool = False


class OutputAssembly:
    """Each node's output shown once, in order, never made up: from its live chunks while it
    runs, then from its stored result (pure).

    Live output (QoS 0, rate-limited) can miss chunks (a gap in `seq`) or bytes (`dropped`);
    the stored result is complete but keeps only the head and tail of a long output (and the
    coordinator may keep only the tail of that). So:
    - Chunks are taken in `seq` order (a few held back while one is missing); a line is shown
      once complete, so a line is never split or glued at a chunk's edge.
    - At a node's first gap its live output stops, with a note: what comes after a gap cannot
      be placed without guessing, and the line being written is not glued to it.
    - When the node is done, each stream resumes from its stored result exactly where the lines
      shown end (a byte offset, checked against the last line shown). A line cut where the stored
      result stops keeping is left out, and a note says how many bytes are missing there. If the
      stored result does not line up, a note says so and it is shown whole.
    - When live output was complete, only its last line without a "\\n" is left to show.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}

    def live(self, chunk: Output) -> list[Shown]:
        """What a live chunk adds: the lines it completes, or a note at the node's first gap."""
        n = self._nodes.setdefault(chunk.node, _Node())
        if n.done or not n.live or chunk.seq < n.next_seq:
            return []  # after the end, after a gap, or seen before
        n.held.setdefault(chunk.seq, chunk)
        shown: list[Shown] = []
        while n.next_seq in n.held:
            c = n.held.pop(n.next_seq)
            if c.dropped:  # dropped before this chunk (the rate limit), or within it: a gap
                return shown + _stop(c.node, n, f"{c.dropped:,} bytes left out by the rate limit")
            n.next_seq += 1
            shown += _take(c, n.streams[c.stream])
        if len(n.held) > REORDER_WINDOW:
            shown += _stop(chunk.node, n, "a chunk of it was lost")
        return shown

    def finish(self, ex: Execution) -> list[Shown]:
        """The rest of a node's output once its execution is over (nothing the second time)."""
        n = self._nodes.setdefault(ex.node, _Node())
        if n.done:
            return []
        n.done = True
        live: list[Shown] = []
        stored: list[Shown] = []
        for name in STREAMS:
            s = n.streams[name]
            text, total = (
                (ex.stdout, ex.stdout_bytes) if name == "stdout" else (ex.stderr, ex.stderr_bytes)
            )
            if s.clean and s.shown + _size(s.partial) == total:  # all of it came live
                live += [Line(ex.node, name, s.partial, "")] if s.partial else []
            elif total == 0 and not text:  # nothing stored (never ran, or lost): live is all
                live += [Line(ex.node, name, s.partial, "")] if s.partial else []
                if not n.live and s.shown:
                    live.append(Note(ex.node, name, f"… the rest of {name} is not known"))
            else:
                stored += _from_stored(ex.node, name, s, text, total, ex.truncated)
        if not n.live and stored:
            stored.insert(
                0, Note(ex.node, None, "… the rest of its output, from the stored result:")
            )
        return live + stored


def _size(text: str) -> int:
    return len(_utf8(text))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON can carry a lone surrogate


def _take(c: Output, s: _Stream) -> list[Shown]:
    s.clean = s.clean and "\ufffd" not in c.data
    *lines, rest = (s.partial + c.data).split("\n")
    complete = [Line(c.node, c.stream, line) for line in lines]
    if len(rest) > MAX_PARTIAL_LINE:
        complete.append(Line(c.node, c.stream, rest, ""))
        rest = ""
    s.partial = rest
    for line in complete:
        s.last = _utf8(line.text + line.end)
        s.shown += len(s.last)
    return list(complete)


def _stop(node: str, n: _Node, why: str) -> list[Shown]:
    n.live = False
    n.held.clear()
    for s in n.streams.values():
        s.partial = ""  # never glued to what follows the gap; the stored result has it
    text = f"… live output stops here ({why}); the rest follows from the stored result"
    return [Note(node, None, f"{text} once {node} is done")]


def _from_stored(
    node: str, stream: str, s: _Stream, stored: str, total: int, truncated: bool
) -> list[Shown]:
    pieces, total = _pieces(stored, total, truncated)
    shown = _resume(node, stream, pieces, total, s.shown, s.last, s.clean)
    if shown is not None:
        return shown
    whole = _resume(node, stream, pieces, total, 0, b"", True)
    assert whole is not None  # from the start, there is nothing to line up with
    said = f"… the stored {stream} does not line up with the output above; here it is whole:"
    return [Note(node, stream, said), *whole]


def _pieces(text: str, total: int, truncated: bool) -> tuple[list[tuple[int, bytes]], int]:
    """The stored output as (offset, bytes) pieces of the output `total` bytes long, and that
    length. Truncated: runner.HeadTail's head and tail, `cap` bytes each around its marker,
    decoded apart (so a character cut at either edge is a U+FFFD, left out here); or, cut by
    the coordinator to fit in one message, the end of that (then a head cut short is left out:
    where it ends is not known to the byte)."""
    data = _utf8(text)
    if truncated:
        for m in _OMITTED.finditer(text):
            cap, odd = divmod(total - int(m[1]), 2)
            head = _utf8(_CUT_AT_END.sub("", text[: m.start()]))
            tail = _utf8(_CUT_AT_START.sub("", text[m.end() :]))
            if not odd and len(head) <= cap and cap - 3 <= len(tail) <= cap:  # that marker
                whole_head = [(0, head)] if len(head) >= cap - 3 else []
                return [*whole_head, (total - len(tail), tail)], total
        if len(data) <= total:
            return [(total - len(data), data)], total
    # All of it: counted as text, as live output is (the same bytes, unless not UTF-8).
    return [(0, data)], len(data)


def _resume(
    node: str,
    stream: str,
    pieces: list[tuple[int, bytes]],
    total: int,
    pos: int,
    last: bytes,
    clean: bool,
) -> list[Shown] | None:
    """What the stored pieces hold after the first `pos` bytes, which were shown ending with
    `last`; None if they do not line up with that."""
    if pos > total:
        return None
    shown: list[Shown] = []
    for start, data in pieces:
        if start + len(data) <= pos:
            continue  # shown already
        if start <= pos:  # continues what was shown: check that it does
            k = pos - start
            placed = start == 0 or (clean and "\ufffd".encode() not in data)
            seen = data[:k]
            if not placed or not (seen.endswith(last) or last.endswith(seen)):
                return None
            body = data[k:]
        else:  # after bytes not kept: its first line may be cut, so it starts after that
            cut = data.find(b"\n")
            if cut < 0:
                continue
            body = data[cut + 1 :]
            missing = start + cut + 1 - pos
            said = f"… {missing:,} bytes of {stream} not shown here: {_NOT_KEPT}"
            shown.append(Note(node, stream, said))
        try:
            *lines, rest = body.decode("utf-8", "surrogatepass").split("\n")
        except UnicodeDecodeError:  # the offsets do not fall between characters
            return None
        shown += [Line(node, stream, line) for line in lines]
        end = start + len(data)
        if end == total and rest:
            shown.append(Line(node, stream, rest, ""))  # the last line, without a "\n"
            rest = ""
        pos = end - _size(rest)  # a line cut where the piece ends is left out
    if pos < total:
        said = f"… the last {total - pos:,} bytes of {stream} are not shown: {_NOT_KEPT}"
        shown.append(Note(node, stream, said))
    return shown


# ---------------------------------------------------------------------------- following a job


class View(Protocol):
    """How a `Follower` shows the job it follows: `TerminalView` for `submit --wait`,
    `cronicle.PluginView` for the Cronicle plugin."""

    def per_node(self, job: Job) -> bool:
        """Whether each execution's end is shown as it comes, or only once the job is over."""

    def live(self, shown: list[Shown]) -> None:
        """What a live chunk added: the lines it completed, or a note where live output stops."""

    def running(self, job: Job, ended: list[tuple[Execution, list[Shown]]]) -> None:
        """A view of the job while it runs, with the executions over since the last one, each
        with the rest of its output."""

    def over(self, job: Job, endings: list[Ending]) -> None:
        """The job is over: each of its executions, in order."""


class Ending(NamedTuple):
    """An execution once the job is over: the rest of its output (None when none of it was
    followed and it is not shown node by node: its stored output is shown as it is), and
    whether its end was already shown, while the job ran."""

    ex: Execution
    rest: list[Shown] | None
    told: bool


class Follower:
    """One job followed to its end, for `submit --wait` and the Cronicle plugin: each node's
    output shown once and in order (`OutputAssembly`: live chunks, then the stored result),
    each execution's end as it comes, and what is left once the job is over. The `View`
    decides how it looks; `update` and `output` are `Client.wait`'s callbacks."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.assembly = OutputAssembly()
        self.told: set[str] = set()  # nodes whose end was shown while the job ran
        self.followed: set[str] = set()  # nodes whose live output came

    def output(self, chunk: Output) -> None:
        """A live chunk: its complete lines, in order; a note where live output stops."""
        self.followed.add(chunk.node)
        shown = self.assembly.live(chunk)
        if shown:
            self.view.live(shown)

    def update(self, job: Job) -> None:
        """A new view of the job: the executions over since the last, each with the rest of
        its output."""
        if not self.view.per_node(job):
            return
        ended = []
        for ex in job.executions:
            if states.is_terminal(ex.state) and ex.node not in self.told:
                self.told.add(ex.node)
                ended.append((ex, self.assembly.finish(ex)))
        self.view.running(job, ended)

    def finish(self, job: Job) -> None:
        """The job as it ended: each execution with the rest of its output."""
        per_node = self.view.per_node(job)
        self.view.over(job, [self._ending(ex, per_node) for ex in job.executions])

    def _ending(self, ex: Execution, per_node: bool) -> Ending:
        followed = per_node or ex.node in self.followed
        return Ending(ex, self.assembly.finish(ex) if followed else None, ex.node in self.told)


def progress(job: Job) -> float:
    """How far the job is, from 0 to 1: each node's part is done when its execution is over,
    and a tenth done while it runs."""
    if not job.executions:
        return 0.0
    done = sum(
        1.0 if states.is_terminal(x.state) else RUNNING_SHARE if x.state == "running" else 0.0
        for x in job.executions
    )  # summed in order, not counted: a count rounds some values apart in the 4th decimal
    return done / len(job.executions)


def state_counts(job: Job) -> str:
    """How many executions are in each state: `1 failed, 2 succeeded`."""
    counts = Counter(ex.state for ex in job.executions)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def outcome(state: str, exit_code: int | None, reason: str | None) -> str:
    """One execution's outcome: `failed (exit 3): reason`."""
    code = f" (exit {exit_code})" if exit_code is not None else ""
    return f"{state}{code}" + (f": {reason}" if reason else "")


# ---------------------------------------------------------------------------- submit --wait


class TerminalView:
    """`submit --wait` on a terminal or in a script: progress on stderr (one live line on a
    terminal), live output if followed, and the final output. One execution prints its output
    as it is; several print theirs line by line, labelled `[node]`, each node's rest and
    outcome as it finishes. `labelled`: live output is labelled even from one node (the
    target could have named several)."""

    def __init__(
        self, out: TextIO = sys.stdout, err: TextIO = sys.stderr, *, labelled: bool = False
    ) -> None:
        self.out, self.err = out, err
        self.labelled = labelled
        self.tty = err.isatty()
        self._status_shown = False

    def per_node(self, job: Job) -> bool:
        return len(job.executions) > 1 or bool(
            job.executions and job.target != job.executions[0].node
        )

    def live(self, shown: list[Shown]) -> None:
        self._clear()
        self._show(shown, self.labelled)

    def running(self, job: Job, ended: list[tuple[Execution, list[Shown]]]) -> None:
        for ex, rest in ended:
            self._clear()
            self._show(rest, labelled=True)
            self.err.write(f"opsbay: {ex.node}: {_outcome(ex, job.timeout_s)}\n")
        if self.tty:
            self.err.write(_status(job))
            self._status_shown = True
        self.err.flush()

    def over(self, job: Job, endings: list[Ending]) -> None:
        self._clear()
        many = self.per_node(job)
        for ex, rest, told in endings:
            if rest is not None:
                self._show(rest, labelled=many)
            else:
                self.out.write(ex.stdout)
                self.out.flush()
                self.err.write(ex.stderr)
            if not told and ex.state != "succeeded":
                outcome = _outcome(ex, job.timeout_s)
                self.err.write(f"opsbay: job {job.job_id} on {ex.node}: {outcome}\n")
            if ex.truncated:
                self.err.write(
                    f"opsbay: {ex.node}: output truncated: {ex.stdout_bytes} bytes of stdout, "
                    f"{ex.stderr_bytes} of stderr (head and tail kept)\n"
                )
        if many:
            self.err.write(f"opsbay: job {job.job_id}: {job.state} ({state_counts(job)})\n")
        self.err.flush()

    def _clear(self) -> None:
        if self._status_shown:
            self.err.write("\r\033[K")
            self._status_shown = False

    def _show(self, shown: list[Shown], labelled: bool) -> None:
        """Lines to stdout or stderr as the command wrote them; notes to stderr, except among
        labelled output, where they stand in the stream they are about."""
        for item in shown:
            if isinstance(item, Line):
                to = self.out if item.stream == "stdout" else self.err
                text = f"[{item.node}] {item.text}\n" if labelled else item.text + item.end
            else:
                to = self.out if labelled and item.stream != "stderr" else self.err
                text = f"[{item.node}] " if labelled else f"opsbay: {item.node}: "
                text += item.text + "\n"
            (self.err if to is self.out else self.out).flush()  # keep the two in order
            to.write(text)
        self.out.flush()
        self.err.flush()


def _status(job: Job) -> str:
    """The progress line: `\\r3/5 done, 1 running, 1 not succeeded`."""
    counts = Counter(ex.state for ex in job.executions)
    done = sum(n for state, n in counts.items() if states.is_terminal(state))
    running, failed = counts["running"], done - counts["succeeded"]
    return f"\r{done}/{len(job.executions)} done, {running} running, {failed} not succeeded"


def _outcome(ex: Execution, timeout_s: int) -> str:
    if ex.state == "timed_out":  # not the 143 of the TERM: the CLI exits 124
        why = f": {ex.reason}" if ex.reason else ""
        return f"timed_out (killed after the {timeout_s} s timeout; exit 124){why}"
    return outcome(ex.state, ex.exit_code, ex.reason)
