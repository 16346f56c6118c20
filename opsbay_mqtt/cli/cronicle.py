"""The Cronicle Plugin's pure parts: reading the job Cronicle sends, turning its Plugin params
into a job, and everything written back: progress, labelled output, the closing `complete` line
with its description and table. The command, its connection and its signals are in `cli.fleet`.

This follows Cronicle's Plugin documentation, docs/Plugins.md in jhuckaby/Cronicle ("JSON
Input", "JSON Output", "Reporting Progress", "Custom Data Tables"), and what its job runner
does with a Plugin's streams, lib/job.js with jhuckaby/pixl-json-stream:
- The job arrives on STDIN as one JSON object compacted onto one line, then EOL; STDIN is then
  closed. `params` holds the Plugin's parameters as filled in for the event (text fields are
  strings; a blank field is "").
- STDOUT is split on EOL (`\\n`); a line matching /^\\s*\\{.+\\}\\s*$/ is parsed as JSON and its
  keys are merged into Cronicle's job record (any key: `id`, `command`, ... too); any other
  non-blank line is appended to the job log. A line that looks like JSON but does not parse is
  logged as an error. So every line of job output is written here with a `[node] ` label: it
  can never start with `{`, so no job output can act as a command to Cronicle.
- `{"progress": X}`, X from 0.0 to 1.0, moves the progress bar.
- `{"complete": 1, "code": 0}` ends the job; a non-zero `code` is a failure, shown with its
  `description` (Cronicle substitutes "Unknown Error" when there is none). `complete` without
  `code` means 0. After the first `complete` line Cronicle processes no further JSON, so it is
  the last line written. `table` (`title`, `header`, `rows`, `caption`) may ride along and is
  shown on the Job Details page. `code` is compared loosely (`!= 0`); integers are used here.
- STDERR is not parsed: Cronicle appends it to the job log as it is, as it reads it. It is a
  second pipe, so its lines land among stdout's in no set order: this plugin's notes on the
  output (where some is missing, each node's outcome) go to stdout, as `opsbay: ` lines, after
  the output they are about.
- Abort (the Abort button, or the event's timeout) sends SIGTERM, then SIGKILL after the
  server's `child_kill_timeout` (10 s by default): the opsbay job is then cancelled.
- If the Plugin exits without a `complete` line Cronicle fails the job with "Process exited
  without reporting job completion." (or "crashed with code: N").
JSON lines are written ASCII-only (`json.dumps`, `ensure_ascii`): U+2028 and U+2029 end a line
for JavaScript's `.`, so a raw one in a description would stop Cronicle matching the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from opsbay_mqtt import states
from opsbay_mqtt.cli.waiting import Ending, Shown, outcome, progress, state_counts
from opsbay_mqtt.client import SubmitArgs
from opsbay_mqtt.errors import ConfigError, OpsbayError
from opsbay_mqtt.policy import parse_labels
from opsbay_mqtt.protocol import LIMIT_PATTERN

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import Execution, Job

MAX_INPUT_BYTES = 16 * 1024 * 1024
MAX_DESCRIPTION = 2000


class BadInput(OpsbayError):
    """What Cronicle sent is not a job (exit 2), or its params are not usable (code 2)."""


# The Plugin params, as submit arguments.
PluginParams = SubmitArgs


def read_job(line: bytes) -> dict[str, Any]:
    """The Cronicle job from its one line of JSON: an object with a `params` object."""
    if not line.strip():
        raise BadInput("no Cronicle job on stdin (expected one line of JSON)")
    try:
        job = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"stdin is not a Cronicle job: not JSON ({e})") from e
    if not isinstance(job, dict) or not isinstance(job.get("params"), dict):
        raise BadInput("stdin is not a Cronicle job: expected a JSON object with `params`")
    return job


def _param(params: Mapping[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise BadInput(f"Plugin param {name!r} must be text, not {type(value).__name__}")
    return value if name == "command" else value.strip() or None


def plugin_params(
    params: Mapping[str, Any], parse_duration: Callable[[str, str], int]
) -> PluginParams:
    """The Plugin params as a job: target and/or where, command, durations, rollout limits.
    `parse_duration(text, name)` is the CLI's (seconds, or ConfigError naming `name`)."""
    command = _param(params, "command")
    if command is None or not command.strip():
        raise BadInput("Plugin param 'command' is empty: give the command to run")
    where_text = _param(params, "where")
    try:
        where = parse_labels(where_text.split(",") if where_text else [], "param 'where'")
        timeout_s = parse_duration(_param(params, "timeout") or "10m", "param 'timeout'")
        start_by_s = parse_duration(_param(params, "start_by") or "10m", "param 'start_by'")
    except ConfigError as e:
        raise BadInput(str(e)) from e
    target = _param(params, "target") or ""
    if not target and not where:
        raise BadInput("Plugin params 'target' and 'where' are both empty: give one or both")
    limits = {name: _param(params, name) for name in ("batch", "max_failures")}
    for name, value in limits.items():
        if value is not None and not re.fullmatch(LIMIT_PATTERN, value):
            raise BadInput(f"Plugin param {name!r}: {value!r} is not a count (10) or share (25%)")
    return PluginParams(
        target=target,
        where=where,
        command=command,
        timeout_s=timeout_s,
        start_by_s=start_by_s,
        batch=limits["batch"],
        max_failures=limits["max_failures"],
    )


def record(**fields: Any) -> str:
    """One line Cronicle reads as JSON: one object, ASCII-only, no NaN."""
    return json.dumps(fields, ensure_ascii=True, allow_nan=False)


def labelled(node: str, lines: list[str]) -> list[str]:
    """Job output as Cronicle's log lines: each `[node] `-labelled, so none can start with `{`."""
    return [f"[{node}] {line}" for line in lines]


class PluginOut:
    """Cronicle's STDOUT (the stream is passed in): records, labelled lines, `complete` last."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.completed = False

    def _write(self, line: str) -> None:
        self.stream.write(line.encode("utf-8", "replace") + b"\n")
        self.stream.flush()

    def send(self, **fields: Any) -> None:
        assert not self.completed, "nothing may follow the complete line"
        self._write(record(**fields))

    def labelled(self, node: str, lines: list[str]) -> None:
        for line in labelled(node, lines):
            self._write(line)

    def note(self, text: str) -> None:
        """One of the plugin's own lines for the log, `opsbay: ...`, in order with the output."""
        assert text.startswith("opsbay: ")
        self._write(text)

    def complete(self, code: int, description: str, **extra: Any) -> None:
        self.send(complete=1, code=code, description=description, **extra)
        self.completed = True


class PluginView:
    """A `waiting.Follower`'s view for Cronicle: progress, and each node's output, labelled, while
    the job runs; as each node finishes, the rest of its output (from the stored result where
    live output, QoS 0 and rate-limited, was incomplete) and then its outcome. All on stdout,
    so Cronicle's log keeps them in order."""

    def __init__(self, out: PluginOut) -> None:
        self.out = out
        self.progress = 0.0

    def per_node(self, job: Job) -> bool:
        return True

    def live(self, shown: list[Shown]) -> None:
        for item in shown:
            self.out.labelled(item.node, [item.text])  # a line, or a note: `… ` what is missing

    def running(self, job: Job, ended: list[tuple[Execution, list[Shown]]]) -> None:
        for ex, rest in ended:
            self._ended(ex, rest)
        self._progress(progress(job))

    def over(self, job: Job, endings: list[Ending]) -> None:
        for ex, rest, told in endings:
            if states.is_terminal(ex.state) and not told:
                self._ended(ex, rest or [])
        self._progress(progress(job))
        self._progress(1.0)

    def _ended(self, ex: Execution, rest: list[Shown]) -> None:
        self.live(rest)
        self.out.note(f"opsbay: {ex.node}: {outcome(ex.state, ex.exit_code, ex.reason)}")

    def _progress(self, value: float) -> None:
        if value > self.progress:
            self.progress = value
            self.out.send(progress=round(value, 4))


def _tail(text: str, lines: int = 5, width: int = 200) -> list[str]:
    kept = [line.rstrip() for line in text.split("\n") if line.strip()][-lines:]
    return [line if len(line) <= width else line[: width - 3] + "..." for line in kept]


def describe(job: Job) -> str:
    """Cronicle's description of the outcome: the state and, for each node that did not
    succeed, its outcome and the last lines it printed (stderr, else stdout)."""
    failed = [x for x in job.executions if x.state != "succeeded"]
    if len(job.executions) == 1:
        ex = job.executions[0]
        lines = [
            f"opsbay job {job.job_id}: {ex.node}: {outcome(ex.state, ex.exit_code, ex.reason)}"
        ]
    else:
        summary = state_counts(job)
        lines = [f"opsbay job {job.job_id}: {job.state} on {len(job.executions)} nodes ({summary})"]
    if job.reason:
        lines.append(f"{job.reason_code}: {job.reason}")
    for ex in failed[:5]:
        if len(job.executions) > 1:
            lines.append(f"{ex.node}: {outcome(ex.state, ex.exit_code, ex.reason)}")
        lines += [f"  {line}" for line in _tail(ex.stderr) or _tail(ex.stdout)]
    text = "\n".join(lines)
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 3] + "..."


def table(job: Job) -> dict[str, Any]:
    """Cronicle's custom data table: one row per node. Only node names, states and numbers,
    since Cronicle may render the cells as HTML."""
    rows = [
        [
            ex.node,
            ex.state,
            "" if ex.exit_code is None else ex.exit_code,
            "" if ex.duration_ms is None else round(ex.duration_ms / 1000, 3),
        ]
        for ex in job.executions
    ]
    return {
        "title": "opsbay executions",
        "header": ["Node", "State", "Exit code", "Duration (s)"],
        "rows": rows,
        "caption": f"opsbay job {job.job_id}",
    }
