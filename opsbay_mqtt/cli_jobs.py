"""`opsbay submit`, `result`, `results` and `nodes`: the commands scripts and people run."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from opsbay_mqtt.cli import (
    JsonOut,
    Verbose,
    app,
    bus_options,
    fail,
    parse_duration,
    run,
    settings,
    setup_logging,
)

if TYPE_CHECKING:
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.protocol import Job, Rejected
    from opsbay_mqtt.settings import BusOptions

ACK_TIMEOUT_S = 10.0


def _client_config(bus: BusOptions, verbose: bool) -> ClientConfig:
    import logging

    from opsbay_mqtt.client import ClientConfig

    setup_logging(logging.INFO if verbose else logging.WARNING)
    s = settings(bus, "client")
    return ClientConfig(url=s.url, topics=s.topics, keyring=s.keyring, tls=s.tls)


@app.command()
@bus_options
def submit(
    bus: BusOptions,
    target: Annotated[
        str, typer.Option("--target", "-t", metavar="NODE", help="Node to run the job on.")
    ],
    command: Annotated[
        str,
        typer.Option(
            "--command",
            "-c",
            metavar="COMMAND",
            help="Shell command (run by /bin/sh -c), or @NAME for a command the node defines.",
        ),
    ],
    timeout: Annotated[
        str,
        typer.Option(
            "--timeout",
            metavar="DURATION",
            help="Run timeout (30, 90s, 15m, 2h): the process group is killed when it is hit.",
        ),
    ] = "10m",
    start_by: Annotated[
        str,
        typer.Option(
            "--start-by",
            "--expires",
            metavar="DURATION",
            help="Start-by deadline: a job not started within this is expired, never run late.",
        ),
    ] = "10m",
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
    """Submit a job for one node.

    Prints the job id once the coordinator has accepted it. With --wait, prints the command's
    output and exits with the command's exit code, or: 124 timed out, 77 rejected, 68 expired
    (not started by its start-by deadline), 70 lost, 80 cancelled, 75 gave up waiting (the job
    goes on), 69 broker or coordinator unreachable, 78 bad setting, 2 bad usage.
    """
    cfg = _client_config(bus, verbose)
    timeout_s = run(lambda: parse_duration(timeout, "--timeout"))
    start_by_s = run(lambda: parse_duration(start_by, "--start-by"))
    wait_s = run(lambda: parse_duration(wait_timeout, "--wait-timeout")) if wait_timeout else None
    run(
        lambda: _submit(cfg, target, command, timeout_s, start_by_s, wait, wait_s, job_id, json_out)
    )


def _submit(
    cfg: ClientConfig,
    target: str,
    command: str,
    timeout_s: int,
    start_by_s: int,
    wait: bool,
    wait_s: int | None,
    job_id: str | None,
    json_out: bool,
) -> None:
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client, WaitTimeout
    from opsbay_mqtt.protocol import Rejected

    with Client(cfg) as client:
        jid = client.submit(
            target=target,
            command=command,
            timeout_s=timeout_s,
            start_by_s=start_by_s,
            job_id=job_id,
        )
        if not wait:
            try:
                got = client.wait(jid, ACK_TIMEOUT_S, until=lambda j: True)
            except WaitTimeout:
                typer.echo(jid)
                fail(
                    render.EXIT_WAIT_GAVE_UP,
                    f"job {jid}: published, but the coordinator has not acknowledged it within "
                    f"{ACK_TIMEOUT_S:g} s; it will be processed when the coordinator reads it",
                )
            if isinstance(got, Rejected):
                _rejected(got)
            typer.echo(json.dumps(render.public_job(got), indent=2) if json_out else jid)
            return
        got = client.wait(jid, wait_s)
    if isinstance(got, Rejected):
        _rejected(got)
    _show_outcome(got, json_out)


def _rejected(r: Rejected) -> NoReturn:
    from opsbay_mqtt import render

    fail(render.EXIT_REJECTED, f"job {r.job_id or '?'} rejected: {r.code}: {r.reason}")


def _show_outcome(job: Job, json_out: bool) -> NoReturn:
    from opsbay_mqtt import render

    if json_out:
        typer.echo(json.dumps(render.public_job(job), indent=2))
    else:
        for ex in job.executions:
            sys.stdout.write(ex.stdout)
            sys.stdout.flush()
            sys.stderr.write(ex.stderr)
            if ex.state != "succeeded":
                why = f": {ex.reason}" if ex.reason else ""
                code = f" (exit {ex.exit_code})" if ex.exit_code is not None else ""
                typer.echo(
                    f"opsbay: job {job.job_id} on {ex.node}: {ex.state}{code}{why}", err=True
                )
            if ex.truncated:
                typer.echo(
                    f"opsbay: output truncated: {ex.stdout_bytes} bytes of stdout, "
                    f"{ex.stderr_bytes} of stderr (head and tail kept)",
                    err=True,
                )
        if job.state == "rejected" and job.reason_code:
            typer.echo(
                f"opsbay: job {job.job_id} rejected: {job.reason_code}: {job.reason}", err=True
            )
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
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client

    cfg = _client_config(bus, verbose)

    def fetch() -> Job:
        with Client(cfg) as c:
            return c.result(job_id)

    job = run(fetch)
    if json_out:
        typer.echo(json.dumps(render.public_job(job), indent=2))
    else:
        typer.echo(render.job_summary(job))
        for ex in job.executions:
            for name, text in (("stdout", ex.stdout), ("stderr", ex.stderr)):
                if text:
                    typer.echo(f"--- {name} ({ex.node})\n{text}", nl=not text.endswith("\n"))
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
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """List recent jobs, newest first (output cut to its last 200 characters: see `result`)."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.states import JOB_STATES

    if state is not None and state not in JOB_STATES:
        fail(render.EXIT_USAGE, f"--state: {state!r} is not one of {', '.join(JOB_STATES)}")
    cfg = _client_config(bus, verbose)

    def fetch() -> list[Job]:
        with Client(cfg) as c:
            return c.results(node=node, state=state, limit=limit)

    jobs = run(fetch)
    if json_out:
        typer.echo(json.dumps([render.public_job(j) for j in jobs], indent=2))
    else:
        typer.echo(render.jobs_table(jobs))


@app.command()
@bus_options
def nodes(bus: BusOptions, json_out: JsonOut = False, verbose: Verbose = False) -> None:
    """List known nodes: online/offline, last seen, and the facts they report."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client

    cfg = _client_config(bus, verbose)

    def fetch() -> list[dict[str, Any]]:
        with Client(cfg) as c:
            return c.nodes()

    found = run(fetch)
    now_ms = int(time.time() * 1000)
    if json_out:
        typer.echo(json.dumps([render.public_node(n, now_ms) for n in found], indent=2))
    else:
        typer.echo(render.nodes_table(found, now_ms))
