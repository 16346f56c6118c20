"""`opsbay submit`, `result`, `results` and `nodes`: the commands scripts and people run."""

from __future__ import annotations

import io
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO, cast

import typer

from opsbay_mqtt.cli.app import (
    JsonOut,
    Verbose,
    app,
    bus_options,
    fail,
    parse_duration,
    run,
    settings,
    setup_logging,
    usage_or_setting,
)

if TYPE_CHECKING:
    from opsbay_mqtt.cli.waiting import Follower
    from opsbay_mqtt.client import Client, ClientConfig, SubmitArgs
    from opsbay_mqtt.protocol import Job, Rejected
    from opsbay_mqtt.settings import BusOptions


def _notice(text: str) -> None:
    typer.echo(f"opsbay: {text}", err=True)


def _client_config(bus: BusOptions, verbose: bool) -> ClientConfig:
    import logging

    from opsbay_mqtt.client import ClientConfig

    setup_logging(logging.INFO if verbose else logging.WARNING)
    s = settings(bus, "client")
    return ClientConfig.of(s)


Where = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        metavar="KEY=VALUE",
        help="Only nodes with this label (repeatable: all must match).",
    ),
]


@app.command()
@bus_options
def submit(
    bus: BusOptions,
    command: Annotated[
        str | None,
        typer.Option(
            "--command",
            "-c",
            metavar="COMMAND",
            help="Shell command (run by /bin/sh -c), or @NAME for a command the node defines; "
            "- reads it from stdin. 1 to 65536 bytes of UTF-8.",
        ),
    ] = None,
    command_file: Annotated[
        Path | None,
        typer.Option(
            "--command-file",
            metavar="FILE",
            help="Read the command from this file (- for stdin): for a command longer than a "
            "command line may be. Give --command or --command-file, not both.",
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            metavar="NODES",
            help="A node, a comma-separated list, or a glob (web-*). With --where only, every "
            "known node with those labels.",
        ),
    ] = "",
    where: Where = None,
    timeout: Annotated[
        str,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            help="Run timeout (30, 90s, 15m, 2h; at most 7d): the process group is killed "
            "when it is hit.",
        ),
    ] = "10m",
    start_by: Annotated[
        str,
        typer.Option(
            "--start-by",
            "--expires",
            metavar="DURATION",
            help="Start-by deadline: a job not started within this (from when it is sent to "
            "its node) is expired, never run late.",
        ),
    ] = "10m",
    batch: Annotated[
        str | None,
        typer.Option(
            "--batch",
            metavar="N|N%",
            help="Run at most this many nodes (or share) at once (at least 1).",
        ),
    ] = None,
    max_failures: Annotated[
        str | None,
        typer.Option(
            "--max-failures",
            metavar="N|N%",
            help="Stop starting nodes once more than this many (or share) have not succeeded; "
            "the rest end cancelled.",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Wait for the outcome; exit with the command's code."),
    ] = False,
    wait_timeout: Annotated[
        str | None,
        typer.Option(
            "--wait-timeout",
            metavar="DURATION",
            help="Stop waiting after this long (exit 75); the job goes on.",
        ),
    ] = None,
    ack_timeout: Annotated[
        str,
        typer.Option(
            "--ack-timeout",
            metavar="DURATION",
            envvar="OPSBAY_ACK_TIMEOUT",
            help="How long to keep sending the submission until a coordinator acknowledges it "
            "(after 10 s without one, say so on stderr). Then exit 69: the job will never run, "
            "since a coordinator refuses a submission that arrives later.",
        ),
    ] = "60s",
    follow: Annotated[
        bool | None,
        typer.Option(
            "--follow/--no-follow",
            help="With --wait, show output live as the command writes it (default: on a terminal).",
        ),
    ] = None,
    cancel_on_interrupt: Annotated[
        bool,
        typer.Option(
            "--cancel-on-interrupt",
            help="Ctrl-C during --wait cancels the job (otherwise it asks, on a terminal).",
        ),
    ] = False,
    job_id: Annotated[
        str | None,
        typer.Option(
            "--job-id",
            metavar="UUID",
            help="Choose the job id (a UUID): a retry with the same id never makes a second job.",
        ),
    ] = None,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Submit a job for one node or many.

    Prints the job id once the coordinator has accepted it. With --wait, prints the output and
    exits 0 if every node succeeded. A job on one node that failed exits with the command's
    exit code; a job on several nodes whose worst outcome is a failure exits 1 (never one
    node's code). Otherwise, by the worst outcome: 124 timed out, 77 rejected, 68 expired (not
    started by its start-by deadline), 70 lost, 80 cancelled; 75 gave up waiting (the job goes
    on), 69 broker unreachable or no coordinator acknowledged the job within --ack-timeout (it
    never runs). Before anything is sent: 2 an invalid option value, 78 a bad setting.
    """
    args, job_id = run(
        lambda: _submit_args(
            command, command_file, target, where, timeout, start_by, batch, max_failures, job_id
        )
    )
    wait_s = run(lambda: parse_duration(wait_timeout, "--wait-timeout")) if wait_timeout else None
    ack_s = usage_or_setting(
        ("--ack-timeout",),
        "OPSBAY_ACK_TIMEOUT",
        lambda: parse_duration(ack_timeout, "--ack-timeout"),
    )
    cfg = _client_config(bus, verbose)
    if follow is None:
        follow = wait and not json_out and sys.stdout.isatty()
    run(
        lambda: _submit(
            cfg, args, job_id, wait, wait_s, ack_s, bool(follow), cancel_on_interrupt, json_out
        )
    )


def _submit_args(
    command: str | None,
    command_file: Path | None,
    target: str,
    where: list[str] | None,
    timeout: str,
    start_by: str,
    batch: str | None,
    max_failures: str | None,
    job_id: str | None,
) -> tuple[SubmitArgs, str | None]:
    """What was typed, checked as the coordinator would check it (UsageError otherwise)."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.client import SubmitArgs

    labels = cliargs.parse_labels(where or [], "--where")
    if target:
        cliargs.check_target(target)
    elif not labels:
        raise cliargs.UsageError("--target", "give a target (--target), labels (--where), or both")
    args = SubmitArgs(
        target=target,
        where=labels,
        command=_command(command, command_file),
        timeout_s=cliargs.parse_timeout(timeout),
        start_by_s=cliargs.parse_duration(start_by, "--start-by"),
        batch=None if batch is None else cliargs.check_limit(batch, "--batch", at_least_one=True),
        max_failures=(
            None
            if max_failures is None
            else cliargs.check_limit(max_failures, "--max-failures", at_least_one=False)
        ),
    )
    return args, None if job_id is None else cliargs.check_job_id(job_id, "--job-id")


def _command(command: str | None, command_file: Path | None) -> str:
    """The command: given, or read from a file or stdin (`-`), at most 64 KiB of UTF-8."""
    from opsbay_mqtt.cli import args as cliargs

    if (command is None) == (command_file is None):
        raise cliargs.UsageError(
            "--command",
            "give the command to run with --command (- reads it from stdin) or --command-file, "
            "one of them",
        )
    if command is not None and command != "-":
        return cliargs.check_command(command)
    option = "--command -" if command is not None else "--command-file"
    path = None if command is not None or str(command_file) == "-" else command_file
    try:
        if path is None:
            data = sys.stdin.buffer.read(cliargs.MAX_COMMAND_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(cliargs.MAX_COMMAND_BYTES + 1)
    except OSError as e:
        raise cliargs.UsageError(option, f"cannot read {path or 'stdin'}: {e.strerror}") from e
    return cliargs.decode_command(data, option)


class _Visible(io.TextIOBase):
    """A terminal's stream that shows control characters escaped (newlines and tabs kept):
    a job's output must not drive the operator's terminal. On stderr, `TerminalView`'s own
    progress line (a carriage return, then digits and words) and its erasure pass through."""

    _OWN = re.compile(r"\r\x1b\[K|\r[0-9]+/[0-9]+ done, [0-9]+ running, [0-9]+ not succeeded")

    def __init__(self, stream: TextIO, progress: bool) -> None:
        self.stream, self.progress = stream, progress

    def write(self, text: str) -> int:
        from opsbay_mqtt.cli import render

        if not (self.progress and self._OWN.fullmatch(text)):
            text = render.visible(text, keep_newlines=True)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


def _for_terminal(stream: TextIO, progress: bool = False) -> TextIO:
    return cast(TextIO, _Visible(stream, progress)) if stream.isatty() else stream


def _write(text: str) -> None:
    """To stdout as it is, byte for byte (typer.echo would strip escape sequences when stdout
    is not a terminal), or escaped on a terminal; a final newline added if missing."""
    from opsbay_mqtt.cli import render

    if sys.stdout.isatty():
        text = render.visible(text, keep_newlines=True)
    if not text.endswith("\n"):
        text += "\n"
    sys.stdout.flush()
    sys.stdout.buffer.write(text.encode("utf-8", "replace"))
    sys.stdout.buffer.flush()


def _submit(
    cfg: ClientConfig,
    args: SubmitArgs,
    job_id: str | None,
    wait: bool,
    wait_s: int | None,
    ack_s: int,
    follow: bool,
    cancel_on_interrupt: bool,
    json_out: bool,
) -> None:
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.cli.waiting import Follower, TerminalView
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.protocol import Rejected

    with Client(cfg, notice=_notice) as client:
        jid = client.submit(
            **args._asdict(),
            job_id=job_id,
            follow=follow and wait,
            accept_s=ack_s,
        )
        if not wait:
            got = client.wait(jid, None, until=lambda j: True)
            if isinstance(got, Rejected):
                _rejected(got)
            typer.echo(json.dumps(render.public_job(got), indent=2) if json_out else jid)
            return
        labelled = (
            "," in args.target or "*" in args.target or "?" in args.target or bool(args.where)
        )
        out, err = _for_terminal(sys.stdout), _for_terminal(sys.stderr, True)
        follower = Follower(TerminalView(out, err, labelled=labelled))
        # SIGTERM (a CI step's timeout, a service manager) ends the wait as Ctrl-C does: with
        # a word about the job, never silently.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            got = client.wait(
                jid,
                wait_s,
                on_update=None if json_out else follower.update,
                on_output=follower.output if follow else None,
            )
        except KeyboardInterrupt:
            got = _interrupted(client, jid, cancel_on_interrupt)
    finish_wait(got, follower, json_out)


def finish_wait(got: Job | Rejected, follower: Follower, json_out: bool) -> NoReturn:
    """The end of a wait on a job (`submit --wait`, `schedule run --wait`): its outcome shown
    (JSON, or the follower's last lines and why it was rejected), and the exit code it means."""
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.protocol import Rejected

    if isinstance(got, Rejected):
        _rejected(got)
    if json_out:
        typer.echo(json.dumps(render.public_job(got), indent=2))
    else:
        follower.finish(got)
        if got.state == "rejected" and got.reason_code:
            why = f"opsbay: job {got.job_id} rejected: {got.reason_code}: {got.reason}"
            typer.echo(render.visible(why) if sys.stderr.isatty() else why, err=True)
    raise typer.Exit(render.exit_code(got))


def _interrupted(client: Client, job_id: str, cancel: bool) -> Job | Rejected:
    """Ctrl-C while waiting: cancel the job (asked, on a terminal) or leave it running."""
    from opsbay_mqtt.cli import render

    if not cancel and sys.stdin.isatty() and sys.stderr.isatty():
        try:
            cancel = typer.confirm(f"\nCancel job {job_id}?", default=False, err=True)
        except (KeyboardInterrupt, typer.Abort):
            cancel = False
    if not cancel:
        if client.acknowledged(job_id):
            fail(130, f"job {job_id} goes on; see `opsbay result {job_id}`")
        fail(
            130,
            f"job {job_id}: no coordinator has acknowledged it yet: one that reads it within "
            "--ack-timeout of its sending still runs it, later ones refuse it; see "
            f"`opsbay result {job_id}` (66 while no coordinator has it)",
        )
    typer.echo(f"opsbay: cancelling job {job_id}", err=True)
    client.cancel(job_id)
    try:
        return client.wait(job_id, 60)
    except KeyboardInterrupt:
        fail(render.EXIT_CANCELLED, f"job {job_id}: cancel sent; see `opsbay result {job_id}`")


def _rejected(r: Rejected) -> NoReturn:
    from opsbay_mqtt.cli import render

    fail(render.EXIT_REJECTED, f"job {r.job_id or '?'} rejected: {r.code}: {r.reason}")


@app.command()
@bus_options
def cancel(
    bus: BusOptions,
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", "-w", help="Wait until every node has answered; exit as `result` would."
        ),
    ] = False,
    wait_timeout: Annotated[
        str | None,
        typer.Option("--wait-timeout", metavar="DURATION", help="Stop waiting after this long."),
    ] = None,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Cancel a job: executions not yet started never start; running ones are killed (their
    whole process group, TERM then KILL); a node that is offline gets the cancel before the
    job when it returns. Prints the job as it stands once the coordinator has taken the
    cancel (exit 0); with --wait, once every node has answered."""
    from opsbay_mqtt import states
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.errors import QueryFailed, WaitTimeout
    from opsbay_mqtt.protocol import Rejected

    run(lambda: cliargs.check_job_id(job_id))
    wait_s = run(lambda: parse_duration(wait_timeout, "--wait-timeout")) if wait_timeout else None
    cfg = _client_config(bus, verbose)

    def do() -> Job:
        with Client(cfg, notice=_notice) as c:
            got = c.cancel(job_id)
            if isinstance(got, Rejected) and got.code == "not_found":
                raise QueryFailed(got.code, got.reason)  # as `result` says it: exit 66
            if isinstance(got, Rejected):
                _rejected(got)
            if not wait:
                return c.result(job_id)
            try:
                done = c.wait(job_id, wait_s, until=lambda j: states.is_terminal(j.state))
            except WaitTimeout:
                fail(render.EXIT_WAIT_GAVE_UP, f"job {job_id}: cancel sent; not all nodes answered")
            if isinstance(done, Rejected):
                _rejected(done)
            return done

    job = run(do)
    if json_out:
        typer.echo(json.dumps(render.public_job(job), indent=2))
    else:
        _write(render.job_summary(job))
    if wait:
        raise typer.Exit(render.exit_code(job))


@app.command()
@bus_options
def result(
    bus: BusOptions,
    job_id: Annotated[str, typer.Argument(help="The job id printed by `opsbay submit`.")],
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Show a job's stored outcome. Exits as `submit --wait` would (75 while still running)."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.client import Client

    run(lambda: cliargs.check_job_id(job_id))
    cfg = _client_config(bus, verbose)

    def fetch() -> Job:
        with Client(cfg, notice=_notice) as c:
            return c.result(job_id)

    job = run(fetch)
    if json_out:
        typer.echo(json.dumps(render.public_job(job), indent=2))
    else:
        # The output as the command wrote it (escaped on a terminal: see _write).
        _write(render.job_summary(job))
        for ex in job.executions:
            for name, text in (("stdout", ex.stdout), ("stderr", ex.stderr)):
                if text:
                    _write(f"--- {name} ({ex.node})\n{text}")
    raise typer.Exit(render.exit_code(job))


@app.command()
@bus_options
def results(
    bus: BusOptions,
    node: Annotated[
        str | None, typer.Option("--node", metavar="NODE", help="Only jobs that ran on this node.")
    ] = None,
    state: Annotated[
        str | None, typer.Option("--state", metavar="STATE", help="Only jobs in this state.")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, max=1000, help="At most this many.")
    ] = 20,
    schedule: Annotated[
        str | None,
        typer.Option("--schedule", metavar="NAME", help="Only the runs of this schedule."),
    ] = None,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """List recent jobs, newest first (output cut to its last 200 characters: see `result`)."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.states import JOB_STATES

    if node is not None:
        run(lambda: cliargs.check_node(node, "--node"))
    if schedule is not None:
        run(lambda: cliargs.check_node(schedule, "--schedule"))
    if state is not None and state not in JOB_STATES:
        fail(render.EXIT_USAGE, f"--state: {state!r} is not one of {', '.join(JOB_STATES)}")
    cfg = _client_config(bus, verbose)

    def fetch() -> list[Job]:
        with Client(cfg, notice=_notice) as c:
            return c.results(node=node, state=state, schedule=schedule, limit=limit)

    jobs = run(fetch)
    if json_out:
        typer.echo(json.dumps([render.public_job(j) for j in jobs], indent=2))
    else:
        _write(render.jobs_table(jobs))


@app.command()
@bus_options
def nodes(
    bus: BusOptions,
    where: Where = None,
    state: Annotated[
        str | None,
        typer.Option("--state", metavar="STATE", help="online, offline or unknown."),
    ] = None,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """List known nodes: online/offline, last seen, and the facts they report (OS, arch,
    kernel, uptime, load, CPUs, memory, disk, labels)."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.client import Client

    if state is not None and state not in ("online", "offline", "unknown"):
        fail(render.EXIT_USAGE, f"--state: {state!r} is not online, offline or unknown")
    labels = run(lambda: cliargs.parse_labels(where or [], "--where"))
    cfg = _client_config(bus, verbose)

    def fetch() -> list[dict[str, Any]]:
        with Client(cfg, notice=_notice) as c:
            return c.nodes(where=labels, node_state=state)

    found = run(fetch)
    now_ms = int(time.time() * 1000)
    if json_out:
        typer.echo(json.dumps([render.public_node(n, now_ms) for n in found], indent=2))
    else:
        _write(render.nodes_table(found, now_ms))
