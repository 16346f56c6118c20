"""`opsbay watch` (the bus as it happens, one line per event) and `opsbay cronicle` (a Cronicle
Plugin that runs one opsbay job per Cronicle job): the commands and their I/O (connection, loop,
signals, streams). What they show and write is worked out in `watchlog` and `cronicle` (and
`waiting`), imported when a command runs (the package note says why).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from opsbay_mqtt.cli.app import Verbose, app, bus_options, fail, parse_duration, run, setup_logging

if TYPE_CHECKING:
    from opsbay_mqtt.cli.cronicle import PluginOut, PluginParams
    from opsbay_mqtt.cli.watchlog import Seen
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.settings import BusOptions
    from opsbay_mqtt.signing import Keyring
    from opsbay_mqtt.topics import Topics
    from opsbay_mqtt.transport import Brokers, TlsFiles

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- watch


def _watch_settings(bus: BusOptions) -> tuple[Brokers, Topics, TlsFiles, Keyring | None]:
    """Where to watch, and the keyring to verify with; a watcher with no key still watches."""
    from opsbay_mqtt.settings import connection, has_key, resolve

    if not has_key(bus):
        return (*connection(bus), None)
    # The coordinator's role takes every key it is given: a watcher signs nothing, it
    # verifies with whatever it holds.
    s = resolve(bus, "coordinator")
    return s.brokers, s.topics, s.tls, s.keyring


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
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.cli.watchlog import (
        JOB_PREFIX_RE,
        human_lines,
        json_line,
        matches,
        read_message,
        subscriptions,
    )

    setup_logging(logging.INFO if verbose else logging.WARNING)
    if job is not None and not JOB_PREFIX_RE.fullmatch(job):
        fail(
            render.EXIT_USAGE,
            f"--job: {job!r} is not a job id or the start of one: 1-36 of 0-9 a-f and -",
        )
    if node is not None:
        name = node
        run(lambda: cliargs.check_node(name, "--node"))
    stop_after = run(lambda: parse_duration(for_, "--for")) if for_ else None
    url, topics, tls, keyring = run(lambda: _watch_settings(bus))
    subs = subscriptions(topics, job, node, output)

    def show(seen: Seen) -> bool:
        lines = [json_line(seen)] if json_out else human_lines(seen, time.time(), full_ids, node)
        for line in lines:
            _print(line)
        return bool(lines)

    def pick(topic: str, payload: bytes) -> Seen | None:
        seen = read_message(topics, topic, payload, keyring)
        return seen if seen is not None and matches(seen, job, node) else None

    run(lambda: _watch(url, tls, subs, pick, show, retained, count, stop_after))


def _watch(
    url: Brokers,
    tls: TlsFiles,
    subscriptions: list[tuple[str, int]],
    pick: Callable[[str, bytes], Seen | None],
    show: Callable[[Seen], bool],
    retained: bool,
    count: int | None,
    stop_after_s: int | None,
) -> None:
    import secrets

    from opsbay_mqtt.transport import CONNECTED, Connection

    conn = Connection(url=url, client_id=f"opsbay-watch-{secrets.token_hex(6)}", tls=tls)
    deadline = time.monotonic() + (stop_after_s if stop_after_s is not None else float("inf"))
    printed = 0
    with _interrupt_on_sigterm():
        try:
            conn.connect()
            if not conn.url.mqtt5:  # as `Client._qos` says why: QoS 0 on MQTT 3.1.1 brokers
                subscriptions = [(t, 0) for t, _ in subscriptions]
            conn.subscribe(subscriptions)
            topics = " ".join(t for t, _ in subscriptions)
            typer.echo(f"opsbay: watching {conn.url} {topics}; Ctrl-C to stop", err=True)
            while count is None or printed < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                got = conn.receive(min(left, 1.0), 1)
                if not got:
                    continue
                msg = got[0]
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

    Stdout: job output as `[node] line`, and the plugin's own notes as `opsbay: ...` lines in
    order with it; `{"progress": x}` as nodes start (a tenth of a node's share) and finish; last,
    `{"complete": 1, "code": N, "description": ...}` with N as `submit --wait` exits (0, the
    command's code, 124 timed out, 77 rejected, 68 expired, 70 lost, 80 cancelled, 69 broker
    unreachable, 78 bad setting, 2 bad params). Cronicle's Abort cancels the job. Exits 0,
    or 2 when stdin is not a Cronicle job.
    """
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.cli.cronicle import MAX_INPUT_BYTES, BadInput, PluginOut, read_job

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


def _plugin(
    bus: BusOptions, cronicle_job: dict[str, Any], out: PluginOut
) -> tuple[int, str, dict[str, Any]]:
    """Submit, follow and summarise; (code, description, extra keys of the complete line)."""
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.cli.app import exit_for
    from opsbay_mqtt.cli.cronicle import BadInput, plugin_params
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.errors import OpsbayError
    from opsbay_mqtt.settings import resolve

    try:
        params = plugin_params(cronicle_job["params"], parse_duration)
    except BadInput as e:
        return render.EXIT_USAGE, str(e), {}
    try:
        s = resolve(bus, "client")
        cfg = ClientConfig.of(s)
        return _submit(cfg, params, str(cronicle_job.get("id", "?")), out)
    except OpsbayError as e:
        mapped = exit_for(e)
        if mapped is None:
            raise
        return mapped[0], f"opsbay: {mapped[1]}", {}


def _ack_timeout_from_environment() -> float:
    """The plugin has no options: OPSBAY_ACK_TIMEOUT, as for `opsbay submit` (default 60 s)."""
    import os

    from opsbay_mqtt.client import ACK_TIMEOUT_S
    from opsbay_mqtt.errors import ConfigError

    given = os.environ.get("OPSBAY_ACK_TIMEOUT")
    if not given:
        return ACK_TIMEOUT_S
    try:
        return parse_duration(given, "OPSBAY_ACK_TIMEOUT")
    except ConfigError as e:  # from the environment: a setting (78), not a usage error
        raise ConfigError(str(e)) from None


def _submit(
    cfg: ClientConfig, p: PluginParams, cronicle_id: str, out: PluginOut
) -> tuple[int, str, dict[str, Any]]:
    from opsbay_mqtt.cli import render
    from opsbay_mqtt.cli.cronicle import PluginView, describe, table
    from opsbay_mqtt.cli.waiting import Follower
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.protocol import Rejected
    from opsbay_mqtt.topics import new_job_id

    job_id = new_job_id()  # ours before submitting, so an abort at any point can cancel it
    # The plugin's notes go to stdout with the output, so Cronicle's log keeps them in order.
    follow = Follower(PluginView(out))
    with Client(cfg, notice=lambda text: out.note(f"opsbay: {text}")) as client:
        try:
            client.submit(
                **p._asdict(),
                job_id=job_id,
                follow=True,
                accept_s=_ack_timeout_from_environment(),
            )
            out.note(f"opsbay: Cronicle job {cronicle_id}: opsbay job {job_id} sent")
            got = client.wait(job_id, None, on_update=follow.update, on_output=follow.output)
        except KeyboardInterrupt:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one abort is enough; finish it
            out.note(f"opsbay: job {job_id}: aborted by Cronicle; cancelling it")
            try:
                client.cancel(job_id, timeout_s=5)
            except Exception as e:  # aborting: report and end, whatever went wrong
                out.note(f"opsbay: job {job_id}: cancel not confirmed ({e})")
            return render.EXIT_CANCELLED, f"opsbay job {job_id}: aborted; cancel sent", {}
    if isinstance(got, Rejected):
        return render.EXIT_REJECTED, f"opsbay job {job_id} rejected: {got.code}: {got.reason}", {}
    follow.finish(got)
    return render.exit_code(got), describe(got), {"table": table(got)}
