"""What `submit --wait` shows while it waits and when it is done: progress across nodes, live
output, and each node's output labelled by node (I/O at the edge; the text comes from render)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from opsbay_mqtt import states
from opsbay_mqtt.records import Execution, Job

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import Output


def _labelled(text: str, node: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(
        f"[{node}] {line}" if line.endswith("\n") else f"[{node}] {line}\n" for line in lines
    )


class WaitView:
    """Progress on stderr (one live line on a terminal, plain lines otherwise), live output if
    followed, and the final output. One execution prints its output as it is; several print
    theirs line by line, labelled `[node]`."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self.tty = err.isatty()
        self.reported: set[str] = set()  # nodes whose outcome was printed
        self.streamed: dict[str, int] = {}  # node -> next expected output seq
        self.gaps: set[str] = set()  # nodes whose live output missed chunks
        self._status_shown = False

    def update(self, job: Job) -> None:
        many = len(job.executions) > 1 or (job.executions and job.target != job.executions[0].node)
        if not many:
            return
        for ex in job.executions:
            if states.is_terminal(ex.state) and ex.node not in self.reported:
                self.reported.add(ex.node)
                self._clear()
                self.err.write(f"opsbay: {ex.node}: {_outcome(ex)}\n")
        if self.tty:
            done = sum(states.is_terminal(x.state) for x in job.executions)
            running = sum(x.state == "running" for x in job.executions)
            failed = sum(
                x.state not in ("succeeded", "pending", "running") and states.is_terminal(x.state)
                for x in job.executions
            )
            self.err.write(
                f"\r{done}/{len(job.executions)} done, {running} running, {failed} not succeeded"
            )
            self._status_shown = True
        self.err.flush()

    def _clear(self) -> None:
        if self._status_shown:
            self.err.write("\r\033[K")
            self._status_shown = False

    def output(self, chunk: Output, labelled: bool) -> None:
        """A live chunk. Kept in order; a missed one is noted (the final result is complete)."""
        expected = self.streamed.get(chunk.node, 0)
        if chunk.seq != expected or chunk.dropped:
            self.gaps.add(chunk.node)
        self.streamed[chunk.node] = chunk.seq + 1
        self._clear()
        stream = self.out if chunk.stream == "stdout" else self.err
        stream.write(_labelled(chunk.data, chunk.node) if labelled else chunk.data)
        stream.flush()

    def finish(self, job: Job) -> None:
        """The final output: whatever was not already shown live, and each node's outcome."""
        self._clear()
        many = len(job.executions) > 1 or (job.executions and job.target != job.executions[0].node)
        for ex in job.executions:
            shown = ex.node in self.streamed and ex.node not in self.gaps and not ex.truncated
            if not shown:
                if ex.node in self.gaps:
                    self.err.write(
                        f"opsbay: {ex.node}: live output was incomplete; the stored output:\n"
                    )
                self.out.write(_labelled(ex.stdout, ex.node) if many else ex.stdout)
                self.out.flush()
                self.err.write(_labelled(ex.stderr, ex.node) if many else ex.stderr)
            if ex.node not in self.reported and ex.state != "succeeded":
                self.err.write(f"opsbay: job {job.job_id} on {ex.node}: {_outcome(ex)}\n")
            if ex.truncated:
                self.err.write(
                    f"opsbay: {ex.node}: output truncated: {ex.stdout_bytes} bytes of stdout, "
                    f"{ex.stderr_bytes} of stderr (head and tail kept)\n"
                )
        if many:
            counts: dict[str, int] = {}
            for ex in job.executions:
                counts[ex.state] = counts.get(ex.state, 0) + 1
            summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            self.err.write(f"opsbay: job {job.job_id}: {job.state} ({summary})\n")
        self.err.flush()


def _outcome(ex: Execution) -> str:
    code = f" (exit {ex.exit_code})" if ex.exit_code is not None else ""
    why = f": {ex.reason}" if ex.reason else ""
    return f"{ex.state}{code}{why}"
