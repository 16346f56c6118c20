"""`opsbay watch` (the bus as it happens, one line per event) and `opsbay cronicle` (a Cronicle
Plugin that runs one opsbay job per Cronicle job).

The Cronicle side follows Cronicle's Plugin documentation, docs/Plugins.md in jhuckaby/Cronicle
("JSON Input", "JSON Output", "Reporting Progress", "Custom Data Tables"), and what its job
runner does with a Plugin's streams, lib/job.js with jhuckaby/pixl-json-stream:
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
- STDERR is not parsed: Cronicle appends it to the job log as it is. This plugin's own notes
  (job id, per-node outcomes) go there.
- Abort (the Abort button, or the event's timeout) sends SIGTERM, then SIGKILL after the
  server's `child_kill_timeout` (10 s by default): the opsbay job is then cancelled.
- If the Plugin exits without a `complete` line Cronicle fails the job with "Process exited
  without reporting job completion." (or "crashed with code: N").
JSON lines are written ASCII-only (`json.dumps`, `ensure_ascii`): U+2028 and U+2029 end a line
for JavaScript's `.`, so a raw one in a description would stop Cronicle matching the line.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO

import typer

from opsbay_mqtt.cli import Verbose, app, bus_options, fail, parse_duration, run, setup_logging
from opsbay_mqtt.errors import OpsbayError

if TYPE_CHECKING:
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.protocol import Job, Message, Output
    from opsbay_mqtt.settings import BusOptions, Settings
    from opsbay_mqtt.signing import Keyring
    from opsbay_mqtt.topics import Topics

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- watch


@dataclass(frozen=True)
class Seen:
    """One message a watcher received and could read; `verified` when its signature checked."""

    msg: Message
    verified: bool


def read_message(
    topics: Topics, topic: str, payload: bytes, keyring: Keyring | None
) -> Seen | None:
    """Decode a job event, rejection, node status or output chunk; None for anything else,
    or for a message that does not name what its topic names."""
    from opsbay_mqtt.errors import Refused
    from opsbay_mqtt.protocol import JobEvent, NodeStatus, Output, Rejected

    try:
        kind, fields = topics.parse(topic)
    except Refused:
        return None
    expect: tuple[type[Message], ...] = {
        "job_events": (JobEvent, Rejected),
        "node_status": (NodeStatus,),
        "output": (Output,),
    }.get(kind, ())
    seen = _decode(payload, keyring, expect) if expect else None
    if seen is None:
        return None
    m = seen.msg
    if isinstance(m, JobEvent):
        named = {"job_id": m.job.job_id}
    elif isinstance(m, Rejected):
        named = {"job_id": m.job_id or ""}
    elif isinstance(m, NodeStatus):
        named = {"node": m.node}
    else:
        assert isinstance(m, Output)
        named = {"job_id": m.job_id, "node": m.node}
    return seen if named == fields else None


def _decode(
    payload: bytes, keyring: Keyring | None, expect: tuple[type[Message], ...]
) -> Seen | None:
    from pydantic import ValidationError

    from opsbay_mqtt import signing
    from opsbay_mqtt.errors import Refused
    from opsbay_mqtt.protocol import MESSAGE_TYPES, PROTOCOL_VERSION, decode

    if keyring is not None:
        try:
            return Seen(decode(payload, keyring, expect)[0], True)
        except Refused as e:
            if e.kid is not None:  # signed with a key we hold, and still wrong: not shown
                log.warning("ignored an invalid message: %s", e)
                return None
            # else: signed with a key we do not hold (or not signed): shown as unverified
    try:
        body = {k: v for k, v in signing.parse(payload).items() if k not in ("auth", "sig")}
        kind = body.get("type")
        cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
        if body.get("v") != PROTOCOL_VERSION or cls is None or cls not in expect:
            return None
        return Seen(cls.model_validate(body), False)
    except (Refused, ValidationError) as e:
        log.debug("ignored an unreadable message: %s", e)
        return None


def matches(seen: Seen, job: str | None, node: str | None) -> bool:
    """Whether a message concerns job `job` (a full id or its start) and node `node`."""
    from opsbay_mqtt.protocol import JobEvent, NodeStatus, Output, Rejected

    m = seen.msg
    if isinstance(m, JobEvent):
        job_id: str | None = m.job.job_id
        nodes = {ex.node for ex in m.job.executions}
    elif isinstance(m, Rejected):
        job_id, nodes = m.job_id, set()
    elif isinstance(m, NodeStatus):
        job_id, nodes = None, {m.node}
    else:
        assert isinstance(m, Output)
        job_id, nodes = m.job_id, {m.node}
    if job is not None and not (job_id or "").startswith(job):
        return False
    return node is None or node in nodes


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _visible(text: str) -> str:
    """Control characters shown escaped: whoever can publish must not drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _clock(now: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def human_lines(
    seen: Seen, now: float, full_ids: bool = False, node: str | None = None
) -> list[str]:
    """What `opsbay watch` prints for one message (an output chunk may take several lines)."""
    from opsbay_mqtt import states
    from opsbay_mqtt.protocol import JobEvent, NodeStatus, Output, Rejected

    m = seen.msg
    head = _clock(now) + ("" if seen.verified else " (unverified)")

    def jid(job_id: str | None) -> str:
        return "?" if job_id is None else job_id if full_ids else job_id[:8]

    if isinstance(m, JobEvent):
        execs = [ex for ex in m.job.executions if node is None or ex.node == node]
        parts = []
        for ex in execs:
            code = f" exit {ex.exit_code}" if ex.exit_code is not None else ""
            why = f" ({ex.reason})" if ex.reason and ex.state != "succeeded" else ""
            parts.append(f"{ex.node} {ex.state}{code}{why}")
        done = sum(n for s, n in m.counts.items() if states.is_terminal(s))
        what = f": {', '.join(parts)}" if parts else ""
        return [_visible(f"{head} job {jid(m.job.job_id)} {m.job.state}{what} [{done}/{m.total}]")]
    if isinstance(m, Rejected):
        return [_visible(f"{head} job {jid(m.job_id)} rejected: {m.code}: {m.reason}")]
    if isinstance(m, NodeStatus):
        return [f"{head} node {m.node} {m.state}"]
    assert isinstance(m, Output)
    out = [f"{head} job {jid(m.job_id)} [{m.node}] {m.dropped} bytes dropped"] if m.dropped else []
    out += [_visible(f"{head} job {jid(m.job_id)} [{m.node}] {line}") for line in _lines(m.data)]
    return out


def json_line(seen: Seen) -> str:
    """What `opsbay watch --json` prints: the message body (no auth, no sig) and `verified`."""
    body = seen.msg.model_dump(mode="json")
    body["verified"] = seen.verified
    return json.dumps(body)


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _watch_settings(bus: BusOptions) -> tuple[Settings, Keyring | None]:
    """Settings, and the keyring to verify with; a watcher with no key at all still watches."""
    import dataclasses

    from opsbay_mqtt.settings import resolve

    if bus.secret or bus.secret_file is not None or bus.key_file is not None:
        # The coordinator's role takes every key it is given: a watcher signs nothing, it
        # verifies with whatever it holds.
        s = resolve(bus, "coordinator")
        return s, s.keyring
    # resolve() insists on a key; give it a placeholder to validate the rest, then drop it.
    s = resolve(dataclasses.replace(bus, secret="none"), "client")
    return s, None


def _print(line: str) -> None:
    sys.stdout.buffer.write(line.encode("utf-8", "replace") + b"\n")
    sys.stdout.buffer.flush()


@app.command()
@bus_options
def watch(
    bus: BusOptions,
    job: Annotated[
        str | None,
        typer.Option("--job", metavar="JOB_ID", help="Only this job (its id, or the start of it)."),
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", metavar="NODE", help="Only what concerns this node.")
    ] = None,
    output: Annotated[
        bool, typer.Option("--output", help="Also show live output, each line labelled [node].")
    ] = False,
    retained: Annotated[
        bool,
        typer.Option("--retained", help="Start with each node's current (retained) status."),
    ] = False,
    full_ids: Annotated[
        bool, typer.Option("--full-ids", help="Show whole job ids (default: the first 8).")
    ] = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="One JSON object per line: the message body, plus `verified` (its signature "
            "checked with a key we hold).",
        ),
    ] = False,
    count: Annotated[
        int | None,
        typer.Option("--count", metavar="N", min=1, help="Stop after printing N events."),
    ] = None,
    for_: Annotated[
        str | None,
        typer.Option("--for", metavar="DURATION", help="Stop after this long (30, 90s, 15m)."),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Show the bus as it happens: job state changes (with the nodes that changed, their state
    and exit code), nodes going online or offline, and with --output live output. Runs until
    Ctrl-C, --count or --for. Signatures are checked with the key given (OPSBAY_SECRET,
    OPSBAY_KEY_FILE); without one, or for messages signed with a key we do not hold, lines are
    marked unverified: anyone who may publish to the broker could have sent them."""
    from opsbay_mqtt import render
    from opsbay_mqtt.topics import JOB_ID_RE, validate_node

    setup_logging(logging.INFO if verbose else logging.WARNING)
    if job is not None and not re.fullmatch(r"[0-9a-f-]{1,36}", job):
        fail(render.EXIT_USAGE, f"--job: {job!r} is not a job id (or the start of one)")
    if node is not None:
        name = node
        run(lambda: validate_node(name))
    stop_after = run(lambda: parse_duration(for_, "--for")) if for_ else None
    s, keyring = run(lambda: _watch_settings(bus))
    exact_job = job if job is not None and JOB_ID_RE.fullmatch(job) else "+"
    level_node = node or "+"
    p = s.topics.prefix
    subscriptions = [(f"{p}/jobs/{exact_job}", 1), (f"{p}/nodes/{level_node}/status", 1)]
    if output:
        subscriptions.append((f"{p}/output/{level_node}/{exact_job}", 0))

    def show(seen: Seen) -> bool:
        lines = [json_line(seen)] if json_out else human_lines(seen, time.time(), full_ids, node)
        for line in lines:
            _print(line)
        return bool(lines)

    def pick(topic: str, payload: bytes) -> Seen | None:
        seen = read_message(s.topics, topic, payload, keyring)
        return seen if seen is not None and matches(seen, job, node) else None

    run(lambda: _watch(s, subscriptions, pick, show, retained, count, stop_after))


def _watch(
    s: Settings,
    subscriptions: list[tuple[str, int]],
    pick: Callable[[str, bytes], Seen | None],
    show: Callable[[Seen], bool],
    retained: bool,
    count: int | None,
    stop_after_s: int | None,
) -> None:
    import secrets

    from opsbay_mqtt.transport import CONNECTED, Connection

    conn = Connection(url=s.url, client_id=f"opsbay-watch-{secrets.token_hex(6)}", tls=s.tls)
    deadline = time.monotonic() + (stop_after_s if stop_after_s is not None else float("inf"))
    printed = 0
    with _interrupt_on_sigterm():
        try:
            conn.connect()
            conn.subscribe(subscriptions)
            topics = " ".join(t for t, _ in subscriptions)
            typer.echo(f"opsbay: watching {s.url} {topics}; Ctrl-C to stop", err=True)
            while count is None or printed < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    msg = conn.inbox.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if msg.topic == CONNECTED:
                    typer.echo("opsbay: reconnected; events in between were missed", err=True)
                    continue
                if msg.retain and not retained:
                    continue  # a current state, not an event
                seen = pick(msg.topic, msg.payload)
                if seen is not None and show(seen):
                    printed += 1
        except KeyboardInterrupt:
            pass
        finally:
            conn.close()


@contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (a service manager, Cronicle's Abort) stops us as Ctrl-C does."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------- cronicle

MAX_INPUT_BYTES = 16 * 1024 * 1024
MAX_PARTIAL_LINE = 64 * 1024  # a line longer than this is passed on in pieces
MAX_DESCRIPTION = 2000


class BadInput(OpsbayError):
    """What Cronicle sent is not a job (exit 2), or its params are not usable (code 2)."""


@dataclass(frozen=True)
class PluginParams:
    target: str
    where: dict[str, str]
    command: str
    timeout_s: int
    start_by_s: int
    batch: str | None
    max_failures: str | None


def read_job(line: bytes) -> dict[str, Any]:
    """The Cronicle job from its one line of JSON: an object with a `params` object."""
    if not line.strip():
        raise BadInput("no Cronicle job on stdin (expected one line of JSON)")
    try:
        job = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
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


def plugin_params(params: Mapping[str, Any]) -> PluginParams:
    """The Plugin params as a job: target and/or where, command, durations, rollout limits."""
    from opsbay_mqtt.errors import ConfigError
    from opsbay_mqtt.policy import parse_labels

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
        if value is not None and not re.fullmatch(r"[0-9]{1,6}%?", value):
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


class PluginOut:
    """Cronicle's STDOUT: one-line JSON objects, and job output as `[node] ` labelled lines."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.completed = False

    def _write(self, line: str) -> None:
        self.stream.write(line.encode("utf-8", "replace") + b"\n")
        self.stream.flush()

    def send(self, **fields: Any) -> None:
        assert not self.completed, "nothing may follow the complete line"
        self._write(json.dumps(fields, ensure_ascii=True, allow_nan=False))

    def labelled(self, node: str, lines: list[str]) -> None:
        for line in lines:
            self._write(f"[{node}] {line}")

    def complete(self, code: int, description: str, **extra: Any) -> None:
        self.send(complete=1, code=code, description=description, **extra)
        self.completed = True


@dataclass
class Follow:
    """Progress and live output while the job runs; the stored output of a node whose live
    output was incomplete (live output is QoS 0 and rate-limited) once it is done."""

    out: PluginOut
    err: Callable[[str], None]
    progress: float = 0.0
    reported: set[str] = field(default_factory=set)
    next_seq: dict[str, int] = field(default_factory=dict)
    gaps: set[str] = field(default_factory=set)
    live_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    partial: dict[tuple[str, str], str] = field(default_factory=dict)

    def update(self, job: Job) -> None:
        from opsbay_mqtt import states

        done = [ex for ex in job.executions if states.is_terminal(ex.state)]
        for ex in done:
            if ex.node not in self.reported:
                self.reported.add(ex.node)
                self.err(f"opsbay: {ex.node}: {_outcome(ex.state, ex.exit_code, ex.reason)}")
        if job.executions:
            self._progress(len(done) / len(job.executions))

    def _progress(self, value: float) -> None:
        if value > self.progress:
            self.progress = value
            self.out.send(progress=round(value, 4))

    def output(self, chunk: Output) -> None:
        if chunk.seq != self.next_seq.get(chunk.node, 0) or chunk.dropped:
            self.gaps.add(chunk.node)
        self.next_seq[chunk.node] = chunk.seq + 1
        key = (chunk.node, chunk.stream)
        self.live_bytes[key] = self.live_bytes.get(key, 0) + len(chunk.data.encode("utf-8"))
        *lines, rest = (self.partial.pop(key, "") + chunk.data).split("\n")
        if len(rest) > MAX_PARTIAL_LINE:
            lines.append(rest)
        elif rest:
            self.partial[key] = rest
        self.out.labelled(chunk.node, lines)

    def finish(self, job: Job) -> None:
        for (node, _), rest in sorted(self.partial.items()):
            self.out.labelled(node, [rest])
        self.partial.clear()
        for ex in job.executions:
            live = {s: self.live_bytes.get((ex.node, s), 0) for s in ("stdout", "stderr")}
            missed = live["stdout"] < ex.stdout_bytes or live["stderr"] < ex.stderr_bytes
            if ex.node in self.gaps or missed:
                self.err(f"opsbay: {ex.node}: live output was incomplete; the stored output:")
                self.out.labelled(ex.node, _lines(ex.stdout) + _lines(ex.stderr))
            if ex.truncated:
                self.err(
                    f"opsbay: {ex.node}: stored output truncated: {ex.stdout_bytes} bytes of "
                    f"stdout, {ex.stderr_bytes} of stderr (head and tail kept)"
                )
        self.update(job)
        self._progress(1.0)


def _outcome(state: str, exit_code: int | None, reason: str | None) -> str:
    code = f" (exit {exit_code})" if exit_code is not None else ""
    return f"{state}{code}" + (f": {reason}" if reason else "")


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
            f"opsbay job {job.job_id}: {ex.node}: {_outcome(ex.state, ex.exit_code, ex.reason)}"
        ]
    else:
        counts: dict[str, int] = {}
        for ex in job.executions:
            counts[ex.state] = counts.get(ex.state, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        lines = [f"opsbay job {job.job_id}: {job.state} on {len(job.executions)} nodes ({summary})"]
    if job.reason:
        lines.append(f"{job.reason_code}: {job.reason}")
    for ex in failed[:5]:
        if len(job.executions) > 1:
            lines.append(f"{ex.node}: {_outcome(ex.state, ex.exit_code, ex.reason)}")
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


@app.command()
@bus_options
def cronicle(bus: BusOptions, verbose: Verbose = False) -> None:
    """Run as a Cronicle Plugin: read the Cronicle job (one line of JSON) on stdin, submit
    its params as an opsbay job, and report to Cronicle on stdout.

    Register it in Cronicle (Admin > Plugins > Add Plugin): Executable
    `/opt/opsbay/.venv/bin/opsbay cronicle`, with these Plugin params (text fields; IDs as
    shown): `target` (nodes: a name, a,b or a glob), `where` (labels: k=v,k=v), `command`,
    `timeout` (run timeout, default 10m), `start_by` (default 10m), `batch` and `max_failures`
    (N or N%). Blank fields take the defaults; target, where or both must be given.

    Broker and key come from the environment, as for every opsbay command (Cronicle passes its
    own environment to Plugins): OPSBAY_BROKER, OPSBAY_SECRET_FILE (or OPSBAY_KEY_FILE), ...

    Stdout: job output as `[node] line`; `{"progress": done/total}` as nodes finish; last,
    `{"complete": 1, "code": N, "description": ...}` with N as `submit --wait` exits (0, the
    command's code, 124 timed out, 77 rejected, 68 expired, 70 lost, 80 cancelled, 69 broker
    unreachable, 78 bad setting, 2 bad params). Cronicle's Abort cancels the job. Exits 0,
    or 2 when stdin is not a Cronicle job.
    """
    from opsbay_mqtt import render

    setup_logging(logging.INFO if verbose else logging.WARNING)
    out = PluginOut(sys.stdout.buffer)
    try:
        job = read_job(sys.stdin.buffer.readline(MAX_INPUT_BYTES))
    except BadInput as e:
        out.complete(2, str(e))
        raise typer.Exit(2) from None
    with _interrupt_on_sigterm():
        try:
            code, description, extra = _plugin(bus, job, out)
        except KeyboardInterrupt:
            code, description, extra = render.EXIT_CANCELLED, "opsbay: aborted", {}
        except Exception as e:  # the top of the plugin: Cronicle must still get its complete line
            log.exception("opsbay cronicle: unexpected error")
            code, description, extra = 1, f"opsbay cronicle: unexpected error: {e}", {}
    out.complete(code, description, **extra)


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _plugin(
    bus: BusOptions, cronicle_job: dict[str, Any], out: PluginOut
) -> tuple[int, str, dict[str, Any]]:
    """Submit, follow and summarise; (code, description, extra keys of the complete line)."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import ClientConfig, QueryFailed
    from opsbay_mqtt.errors import BrokerError, ConfigError, Refused
    from opsbay_mqtt.settings import resolve

    try:
        params = plugin_params(cronicle_job["params"])
    except BadInput as e:
        return render.EXIT_USAGE, str(e), {}
    try:
        s = resolve(bus, "client")
        cfg = ClientConfig(url=s.url, topics=s.topics, keyring=s.keyring, tls=s.tls)
        return _submit(cfg, params, str(cronicle_job.get("id", "?")), out)
    except ConfigError as e:
        return render.EXIT_CONFIG, f"opsbay: {e}", {}
    except BrokerError as e:
        return render.EXIT_UNAVAILABLE, f"opsbay: {e}", {}
    except QueryFailed as e:
        code = render.EXIT_NOT_FOUND if e.code == "not_found" else render.EXIT_REJECTED
        return code, f"opsbay: {e}", {}
    except Refused as e:
        code = render.EXIT_USAGE if e.code.startswith("bad_") else render.EXIT_REJECTED
        return code, f"opsbay: {e}", {}


def _submit(
    cfg: ClientConfig, p: PluginParams, cronicle_id: str, out: PluginOut
) -> tuple[int, str, dict[str, Any]]:
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.protocol import Rejected
    from opsbay_mqtt.topics import new_job_id

    job_id = new_job_id()  # ours before submitting, so an abort at any point can cancel it
    follow = Follow(out, _err)
    with Client(cfg) as client:
        try:
            client.submit(
                target=p.target,
                where=p.where,
                command=p.command,
                timeout_s=p.timeout_s,
                start_by_s=p.start_by_s,
                batch=p.batch,
                max_failures=p.max_failures,
                job_id=job_id,
                follow=True,
            )
            _err(f"opsbay: Cronicle job {cronicle_id}: opsbay job {job_id} submitted")
            got = client.wait(job_id, None, on_update=follow.update, on_output=follow.output)
        except KeyboardInterrupt:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one abort is enough; finish it
            _err(f"opsbay: job {job_id}: aborted by Cronicle; cancelling it")
            try:
                client.cancel(job_id, timeout_s=5)
            except Exception as e:  # aborting: report and end, whatever went wrong
                _err(f"opsbay: job {job_id}: cancel not confirmed ({e})")
            return render.EXIT_CANCELLED, f"opsbay job {job_id}: aborted; cancel sent", {}
    if isinstance(got, Rejected):
        return render.EXIT_REJECTED, f"opsbay job {job_id} rejected: {got.code}: {got.reason}", {}
    follow.finish(got)
    return render.exit_code(got), describe(got), {"table": table(got)}
