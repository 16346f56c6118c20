"""The `opsbay` command. Each subcommand imports only what it needs, so start-up stays fast."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.protocol import Job, Rejected
    from opsbay_mqtt.signing import Keyring
    from opsbay_mqtt.topics import Topics
    from opsbay_mqtt.transport import BrokerURL

app = typer.Typer(
    help="opsbay: an MQTT job bus. Submit shell jobs to nodes, wait for them, query results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# -- options shared by every subcommand
Broker = Annotated[
    str,
    typer.Option(
        "--broker",
        metavar="URL",
        envvar="OPSBAY_BROKER",
        help="Broker URL: mqtt://[user:pass@]host[:port], or mqtts://... for TLS.",
    ),
]
Secret = Annotated[
    str | None,
    typer.Option(
        "--secret",
        metavar="SECRET",
        envvar="OPSBAY_SECRET",
        show_envvar=True,
        help="Shared HMAC secret. Prefer OPSBAY_SECRET or --secret-file: a command line is "
        "visible to every user of the host.",
    ),
]
SecretFile = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        metavar="FILE",
        envvar="OPSBAY_SECRET_FILE",
        help="File holding the secret.",
    ),
]
Prefix = Annotated[
    str,
    typer.Option(
        "--prefix", metavar="PREFIX", envvar="OPSBAY_PREFIX", help="Topic prefix of this bus."
    ),
]
CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca-file", metavar="FILE", envvar="OPSBAY_CA_FILE", help="CA bundle for mqtts:// brokers."
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def _fail(code: int, text: str) -> NoReturn:
    typer.echo(f"opsbay: {text}", err=True)
    raise typer.Exit(code)


def _logging(verbose: bool, default: int = logging.WARNING) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else default,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _keyring(secret: str | None, secret_file: Path | None) -> Keyring:
    from opsbay_mqtt.errors import ConfigError
    from opsbay_mqtt.signing import Keyring

    if secret_file is not None:
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"--secret-file / OPSBAY_SECRET_FILE: cannot read {e}") from e
    if not secret:
        raise ConfigError(
            "no secret: set OPSBAY_SECRET, or pass --secret-file (or --secret) with the bus's "
            "shared secret"
        )
    return Keyring.shared(secret)


def _common(
    broker: str, secret: str | None, secret_file: Path | None, prefix: str, ca_file: Path | None
) -> tuple[BrokerURL, Keyring, Topics, str | None]:
    from opsbay_mqtt.errors import ConfigError, Refused
    from opsbay_mqtt.topics import Topics
    from opsbay_mqtt.transport import BrokerURL

    url = BrokerURL.parse(broker)
    try:
        topics = Topics(prefix)
    except Refused as e:
        raise ConfigError(f"--prefix / OPSBAY_PREFIX: {e.text}") from e
    return url, _keyring(secret, secret_file), topics, str(ca_file) if ca_file else None


def _client_config(
    broker: str, secret: str | None, secret_file: Path | None, prefix: str, ca_file: Path | None
) -> ClientConfig:
    from opsbay_mqtt.client import ClientConfig

    url, keyring, topics, ca = _common(broker, secret, secret_file, prefix, ca_file)
    return ClientConfig(url=url, topics=topics, keyring=keyring, ca_file=ca)


def _run(fn: Any) -> Any:
    """Turn this package's errors into a message and an exit code."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import QueryFailed, WaitTimeout
    from opsbay_mqtt.errors import BrokerError, ConfigError, Refused

    try:
        return fn()
    except ConfigError as e:
        _fail(render.EXIT_CONFIG, str(e))
    except BrokerError as e:
        _fail(render.EXIT_UNAVAILABLE, str(e))
    except WaitTimeout as e:
        _fail(render.EXIT_WAIT_GAVE_UP, f"{e}; the job goes on (see `opsbay result`)")
    except QueryFailed as e:
        code = render.EXIT_NOT_FOUND if e.code == "not_found" else render.EXIT_REJECTED
        _fail(code, str(e))
    except Refused as e:
        _fail(render.EXIT_USAGE if e.code.startswith("bad_") else render.EXIT_REJECTED, e.text)


def _parse_duration(text: str, option: str) -> int:
    """'90', '90s', '15m', '2h', '1d' -> seconds."""
    from opsbay_mqtt.errors import ConfigError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    mult = units.get(t[-1:], 0)
    number = t[:-1] if mult else t
    if not number.isdigit() or int(number) <= 0:
        raise ConfigError(f"{option}: {text!r} is not a duration like 30, 90s, 15m, 2h or 1d")
    return int(number) * (mult or 1)


# -- submit, result, results, nodes
@app.command()
def submit(
    target: Annotated[
        str, typer.Option("--target", "-t", metavar="NODE", help="Node to run the job on.")
    ],
    command: Annotated[
        str,
        typer.Option(
            "--command", "-c", metavar="COMMAND", help="Shell command (run by /bin/sh -c)."
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
        typer.Option(
            "--wait", "-w", help="Wait for the outcome; exit with the command's exit code."
        ),
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
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    verbose: Verbose = False,
) -> None:
    """Submit a job for one node.

    Prints the job id once the coordinator has accepted it. With --wait, prints the command's
    output and exits with the command's exit code, or: 124 timed out, 77 rejected, 68 expired
    (not started by its start-by deadline), 70 lost, 80 cancelled, 75 gave up waiting (the job
    goes on), 69 broker or coordinator unreachable, 78 bad setting, 2 bad usage.
    """
    _logging(verbose)
    cfg = _run(lambda: _client_config(broker, secret, secret_file, prefix, ca_file))
    timeout_s = _run(lambda: _parse_duration(timeout, "--timeout"))
    start_by_s = _run(lambda: _parse_duration(start_by, "--start-by"))
    wait_s = _run(lambda: _parse_duration(wait_timeout, "--wait-timeout")) if wait_timeout else None
    _run(
        lambda: _submit(cfg, target, command, timeout_s, start_by_s, wait, wait_s, job_id, json_out)
    )


ACK_TIMEOUT_S = 10.0


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
                _fail(
                    render.EXIT_WAIT_GAVE_UP,
                    f"job {jid}: published, but the coordinator has not acknowledged it within "
                    f"{ACK_TIMEOUT_S:g} s; it will be processed when the coordinator reads it",
                )
            if isinstance(got, Rejected):
                _rejected(got)
            if json_out:
                typer.echo(json.dumps(render.public_job(got), indent=2))
            else:
                typer.echo(jid)
            return
        got = client.wait(jid, wait_s)
    if isinstance(got, Rejected):
        _rejected(got)
    _show_outcome(got, json_out)


def _rejected(r: Rejected) -> NoReturn:
    from opsbay_mqtt import render

    _fail(render.EXIT_REJECTED, f"job {r.job_id or '?'} rejected: {r.code}: {r.reason}")


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
        if job.state == "rejected":
            typer.echo(
                f"opsbay: job {job.job_id} rejected: {job.reason_code}: {job.reason}", err=True
            )
    raise typer.Exit(render.exit_code(job))


@app.command()
def result(
    job_id: Annotated[str, typer.Argument(help="The job id printed by `opsbay submit`.")],
    json_out: JsonOut = False,
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    verbose: Verbose = False,
) -> None:
    """Show a job's stored outcome. Exits as `submit --wait` would (75 while still running)."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client

    _logging(verbose)
    cfg = _run(lambda: _client_config(broker, secret, secret_file, prefix, ca_file))

    def fetch() -> Job:
        with Client(cfg) as c:
            return c.result(job_id)

    job = _run(fetch)
    if json_out:
        typer.echo(json.dumps(render.public_job(job), indent=2))
    else:
        typer.echo(render.job_summary(job))
        for ex in job.executions:
            if ex.stdout:
                typer.echo(f"--- stdout ({ex.node})\n{ex.stdout}", nl=not ex.stdout.endswith("\n"))
            if ex.stderr:
                typer.echo(f"--- stderr ({ex.node})\n{ex.stderr}", nl=not ex.stderr.endswith("\n"))
    raise typer.Exit(render.exit_code(job))


@app.command()
def results(
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
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    verbose: Verbose = False,
) -> None:
    """List recent jobs, newest first."""
    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.states import JOB_STATES

    _logging(verbose)
    if state is not None and state not in JOB_STATES:
        _fail(render.EXIT_USAGE, f"--state: {state!r} is not one of {', '.join(JOB_STATES)}")
    cfg = _run(lambda: _client_config(broker, secret, secret_file, prefix, ca_file))

    def fetch() -> list[Job]:
        with Client(cfg) as c:
            return c.results(node=node, state=state, limit=limit)

    jobs = _run(fetch)
    if json_out:
        typer.echo(json.dumps([render.public_job(j) for j in jobs], indent=2))
    else:
        typer.echo(render.jobs_table(jobs))


@app.command()
def nodes(
    json_out: JsonOut = False,
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    verbose: Verbose = False,
) -> None:
    """List known nodes: online/offline, last seen, and the facts they report."""
    import time

    from opsbay_mqtt import render
    from opsbay_mqtt.client import Client

    _logging(verbose)
    cfg = _run(lambda: _client_config(broker, secret, secret_file, prefix, ca_file))

    def fetch() -> list[dict[str, Any]]:
        with Client(cfg) as c:
            return c.nodes()

    found = _run(fetch)
    now_ms = int(time.time() * 1000)
    if json_out:
        typer.echo(json.dumps([render.public_node(n, now_ms) for n in found], indent=2))
    else:
        typer.echo(render.nodes_table(found, now_ms))


# -- the daemons
@app.command()
def coordinator(
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            envvar="OPSBAY_DATA_DIR",
            help="Where the SQLite record lives.",
        ),
    ] = Path("opsbay-data"),
    allow_node: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-node",
            metavar="NODE",
            envvar="OPSBAY_ALLOW_NODES",
            help="Only these nodes may be targeted (repeatable; the variable: comma-separated).",
        ),
    ] = None,
    window: Annotated[
        int,
        typer.Option(
            "--window",
            metavar="SECONDS",
            min=10,
            help="Freshness window for signed requests, in seconds.",
        ),
    ] = 300,
    lost_grace: Annotated[
        int,
        typer.Option(
            "--lost-grace",
            metavar="SECONDS",
            envvar="OPSBAY_LOST_GRACE",
            min=1,
            help="Grace after deadlines: a running job with no result by start + timeout + "
            "grace is lost; a pending one not started by start-by + grace is expired.",
        ),
    ] = 30,
    keep_days: Annotated[
        int,
        typer.Option(
            "--keep-days",
            metavar="DAYS",
            envvar="OPSBAY_KEEP_DAYS",
            min=1,
            help="Delete finished jobs older than this.",
        ),
    ] = 30,
    keep_jobs: Annotated[
        int,
        typer.Option(
            "--keep-jobs",
            metavar="N",
            envvar="OPSBAY_KEEP_JOBS",
            min=1,
            help="Keep at most this many finished jobs (the newest).",
        ),
    ] = 100_000,
    max_open: Annotated[
        int,
        typer.Option(
            "--max-open-per-node",
            metavar="N",
            envvar="OPSBAY_MAX_OPEN_PER_NODE",
            min=1,
            help="Refuse (queue_full) a job for a node that already has this many pending or "
            "running.",
        ),
    ] = 1000,
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    quiet: Quiet = False,
) -> None:
    """Run the coordinator: validate, record and dispatch jobs; answer queries."""
    from opsbay_mqtt.daemons import run_coordinator

    _logging(False, logging.WARNING if quiet else logging.INFO)
    common = _run(lambda: _common(broker, secret, secret_file, prefix, ca_file))
    allowed = None
    if allow_node:
        allowed = frozenset(n.strip() for item in allow_node for n in item.split(",") if n.strip())
    limits = {
        "window_s": window,
        "lost_grace_s": lost_grace,
        "keep_days": keep_days,
        "keep_jobs": keep_jobs,
        "max_open_per_node": max_open,
    }
    _run(lambda: run_coordinator(*common, data_dir=data_dir, allow_nodes=allowed, limits=limits))


@app.command()
def worker(
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            metavar="NODE",
            envvar="OPSBAY_NODE",
            help="This node's name (default: the short host name).",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", metavar="KEY=VALUE", help="key=value label for this node (repeatable)."
        ),
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir",
            metavar="DIR",
            envvar="OPSBAY_STATE_DIR",
            help="Where the worker keeps its ledger of jobs.",
        ),
    ] = Path("opsbay-state"),
    max_parallel: Annotated[
        int, typer.Option("--max-parallel", metavar="N", min=1, max=256, help="Jobs run at once.")
    ] = 8,
    broker: Broker = DEFAULT_BROKER,
    secret: Secret = None,
    secret_file: SecretFile = None,
    prefix: Prefix = "opsbay",
    ca_file: CaFile = None,
    quiet: Quiet = False,
) -> None:
    """Run the worker agent for one node: receive its jobs, run them, report back."""
    from opsbay_mqtt.daemons import default_node_name, parse_labels, run_worker

    _logging(False, logging.WARNING if quiet else logging.INFO)
    common = _run(lambda: _common(broker, secret, secret_file, prefix, ca_file))
    labels = _run(lambda: parse_labels(label or []))
    name = _run(lambda: default_node_name(node))
    _run(
        lambda: run_worker(
            *common, node=name, labels=labels, state_dir=state_dir, max_parallel=max_parallel
        )
    )


@app.command()
def stack(
    port: Annotated[
        int,
        typer.Option(
            "--port", metavar="PORT", help="Port for the local Mosquitto (127.0.0.1 only)."
        ),
    ] = 1884,
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Where the stack keeps its broker data, record, ledger, logs and secret.",
        ),
    ] = Path(".opsbay-stack"),
    node: Annotated[
        str | None, typer.Option("--node", metavar="NODE", help="Name of the local worker's node.")
    ] = None,
    once: Annotated[
        bool,
        typer.Option(
            "--once", help="Run the demo job, then stop everything and exit with its code."
        ),
    ] = False,
) -> None:
    """Bring up a whole bus on this machine (Mosquitto, coordinator, one worker), run a demo job,
    and keep it up until Ctrl-C."""
    from opsbay_mqtt.daemons import default_node_name
    from opsbay_mqtt.stack import run_stack

    _logging(False, logging.INFO)
    name = _run(lambda: default_node_name(node))
    raise typer.Exit(_run(lambda: run_stack(port=port, directory=directory, node=name, once=once)))


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
