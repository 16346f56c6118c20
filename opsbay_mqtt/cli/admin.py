"""`opsbay coordinator`, `worker`, `stack` and `keys`: running and setting up the bus."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from opsbay_mqtt import statedir
from opsbay_mqtt.cli.app import (
    Quiet,
    app,
    bus_options,
    given_in_environment,
    run,
    settings,
    setup_logging,
    usage_or_setting,
)

if TYPE_CHECKING:
    from opsbay_mqtt.settings import BusOptions


def _int_option(name: str, env: str, text: str) -> typer.models.OptionInfo:
    option: typer.models.OptionInfo = typer.Option(name, metavar="N", envvar=env, min=1, help=text)
    return option


@app.command()
@bus_options
def coordinator(
    bus: BusOptions,
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data-dir",
            metavar="DIR",
            envvar="OPSBAY_DATA_DIR",
            help="Where the SQLite record lives.",
        ),
    ] = Path("opsbay-data"),
    store: Annotated[
        str,
        typer.Option(
            "--store",
            metavar="URL",
            envvar="OPSBAY_STORE",
            help="The record: postgresql://[user@]host[:port]/dbname for PostgreSQL (several "
            "coordinators may share one; needs pip install 'opsbay-mqtt[postgresql]'), or "
            "nothing for SQLite, opsbay.db under --data-dir (the default). Give the password "
            "by PGPASSWORD or ~/.pgpass (PGPASSFILE) rather than in the URL; it is never "
            "shown. See docs/postgresql.md.",
        ),
    ] = "",
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
            help="Freshness window for signed requests: older or replayed ones are refused.",
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
        int, _int_option("--keep-days", "OPSBAY_KEEP_DAYS", "Delete finished jobs older than this.")
    ] = 30,
    keep_jobs: Annotated[
        int,
        _int_option("--keep-jobs", "OPSBAY_KEEP_JOBS", "Keep at most this many finished jobs."),
    ] = 100_000,
    max_open: Annotated[
        int,
        _int_option(
            "--max-open-per-node",
            "OPSBAY_MAX_OPEN_PER_NODE",
            "Refuse (queue_full) a job for a node that has this many pending or running.",
        ),
    ] = 1000,
    name: Annotated[
        str,
        typer.Option(
            "--name",
            metavar="NAME",
            envvar="OPSBAY_COORDINATOR_NAME",
            help="This coordinator's name, when several share one record (PostgreSQL): each "
            "needs its own, stable across restarts (its broker session is kept under it). "
            "Letters, digits, . _ -. Default: none (one coordinator).",
        ),
    ] = "",
    share: Annotated[
        str,
        typer.Option(
            "--share",
            metavar="GROUP",
            envvar="OPSBAY_COORDINATOR_SHARE",
            help="Split requests and results with the other coordinators of GROUP through MQTT "
            "5 shared subscriptions (each message to one of them) instead of each handling "
            "every message. Needs MQTT 5; see docs/scaling.md for what a broker does with the "
            "share of a coordinator that died.",
        ),
    ] = "",
    quiet: Quiet = False,
) -> None:
    """Run the coordinator: validate, record and dispatch jobs; answer queries."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.daemons import run_coordinator

    setup_logging(logging.WARNING if quiet else logging.INFO)
    allowed = None
    if allow_node:
        names = [n.strip() for item in allow_node for n in item.split(",") if n.strip()]
        usage_or_setting(
            ("--allow-node",),
            "OPSBAY_ALLOW_NODES",
            lambda: [cliargs.check_node(n, "--allow-node") for n in names],
        )
        allowed = frozenset(names)
    if name:
        usage_or_setting(
            ("--name",), "OPSBAY_COORDINATOR_NAME", lambda: cliargs.check_node(name, "--name")
        )
    if share:
        usage_or_setting(
            ("--share",), "OPSBAY_COORDINATOR_SHARE", lambda: cliargs.check_node(share, "--share")
        )
    s = settings(bus, "coordinator")
    limits = {
        "window_s": window,
        "lost_grace_s": lost_grace,
        "keep_days": keep_days,
        "keep_jobs": keep_jobs,
        "max_open_per_node": max_open,
    }
    run(
        lambda: run_coordinator(
            s,
            data_dir=data_dir,
            allow_nodes=allowed,
            limits=limits,
            name=name,
            store_url=store,
            share=share,
        )
    )


@app.command()
@bus_options
def worker(
    bus: BusOptions,
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
        typer.Option("--label", metavar="KEY=VALUE", help="A label for this node (repeatable)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            metavar="DIR",
            envvar="OPSBAY_STATE_DIR",
            help="Where the worker keeps its ledger of jobs; a second worker on the same folder "
            f"refuses to start (default: {statedir.DEFAULT_TEXT}).",
        ),
    ] = None,
    max_parallel: Annotated[
        int, typer.Option("--max-parallel", metavar="N", min=1, max=256, help="Jobs run at once.")
    ] = 8,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="PATTERN",
            help="Run only commands matching a pattern (repeatable): exact text, where * and ? "
            "stand for text without spaces or shell metacharacters ('systemctl restart *').",
        ),
    ] = None,
    define: Annotated[
        list[str] | None,
        typer.Option(
            "--define",
            metavar="NAME=COMMAND",
            help="A named command, run by submitting @NAME (repeatable); always allowed.",
        ),
    ] = None,
    named_only: Annotated[
        bool, typer.Option("--named-only", help="Run only named commands (@NAME).")
    ] = False,
    run_as: Annotated[
        str | None,
        typer.Option(
            "--run-as", metavar="USER", help="Run jobs as this user (the worker must be root)."
        ),
    ] = None,
    clean_env: Annotated[
        bool,
        typer.Option(
            "--clean-env",
            help="Run jobs with a minimal environment (PATH, HOME, USER, LANG) instead of the "
            "worker's (which never includes OPSBAY_* settings).",
        ),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run the worker agent for one node: receive its jobs, run them, report back."""
    from opsbay_mqtt import agent
    from opsbay_mqtt.daemons import check_run_as, default_node_name, run_worker
    from opsbay_mqtt.policy import WorkerPolicy

    level = logging.WARNING if quiet else logging.INFO
    setup_logging(level)
    name = run(lambda: default_node_name(_node_name(node)))
    labels, named = run(lambda: _worker_args(label or [], define or [], allow or []))
    s = settings(bus, "node", name)
    policy = WorkerPolicy(allow=tuple(allow or ()), named=named, named_only=named_only)
    run(lambda: check_run_as(run_as))
    if state_dir is None:
        state_dir = run(
            lambda: statedir.default_state_dir(name, euid=os.geteuid(), environ=os.environ)
        )
        run(lambda: statedir.refuse_legacy(Path.cwd(), state_dir))
    options = {
        "node": name,
        "labels": labels,
        "state_dir": state_dir,
        "max_parallel": max_parallel,
        "policy": policy,
        "run_as": run_as,
        "clean_env": clean_env,
    }
    agent.become(bus, level, options)  # from here on, without this parser (returns if it can't)
    run(lambda: run_worker(s, **options))


def _node_name(node: str | None) -> str | None:
    """The node's name as given, checked (None: the host's name). Empty is an error, not the
    host's name: 2 from --node, 78 from OPSBAY_NODE (which may come from a unit file)."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.errors import ConfigError

    if node is None and os.environ.get("OPSBAY_NODE") == "":
        raise ConfigError("OPSBAY_NODE is set but empty: give this node's name, or unset it")
    if node is None:
        return None
    env = given_in_environment(("--node",), "OPSBAY_NODE")
    try:
        return cliargs.check_node(node, "--node")
    except cliargs.UsageError as e:
        if env:
            raise ConfigError(f"OPSBAY_NODE: {str(e).removeprefix('--node: ')}") from e
        raise


def _worker_args(
    label: list[str], define: list[str], allow: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """--label, --define and --allow as typed: labels and named commands, or UsageError."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.errors import ConfigError
    from opsbay_mqtt.policy import parse_named

    labels = cliargs.parse_labels(label, "--label")
    for item in define:
        cliargs.utf8(item, "--define")
    for pattern in allow:
        cliargs.utf8(pattern, "--allow")
    try:
        named = parse_named(define)
    except ConfigError as e:
        said = str(e).removeprefix("--define: ")
        raise cliargs.UsageError(
            "--define", f"{said}: NAME is 1-64 of A-Z a-z 0-9 . _ -, COMMAND not empty"
        ) from e
    return labels, named


@app.command()
def stack(
    port: Annotated[
        int,
        typer.Option("--port", metavar="PORT", help="Port for the local Mosquitto (127.0.0.1)."),
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
    from opsbay_mqtt.cli.stack import run_stack
    from opsbay_mqtt.daemons import default_node_name

    setup_logging(logging.INFO)
    name = run(lambda: default_node_name(node))
    raise typer.Exit(run(lambda: run_stack(port=port, directory=directory, node=name, once=once)))


@app.command()
def keys(
    kind: Annotated[
        str,
        typer.Argument(
            metavar="client|node|coordinator|watcher",
            help="Whose: a client or a node (a key and a broker login), the coordinator or a "
            "watcher (a broker login only).",
        ),
    ],
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="[NAME]",
            help="The client's, node's or watcher's name (the coordinator's: coordinator).",
        ),
    ] = None,
    append: Annotated[
        list[Path] | None,
        typer.Option(
            "--append",
            metavar="FILE",
            help="Also append the key to this key file (created with mode 600; repeatable).",
        ),
    ] = None,
    passwd_file: Annotated[
        Path | None,
        typer.Option(
            "--passwd-file",
            metavar="FILE",
            help="The broker's password file, for the printed mosquitto_passwd steps (default: "
            "/etc/mosquitto/opsbay/passwd-daemons for the coordinator and nodes, "
            "passwd-clients for clients and watchers, as in mosquitto/production.conf).",
        ),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", metavar="PREFIX", envvar="OPSBAY_PREFIX")
    ] = "opsbay",
) -> None:
    """Make a new key for a client or a node, or a broker login for the coordinator or a
    watcher, and print what to add on each side: the coordinator's key file, the party's own key
    file, the broker's password file and ACL, and the party's environment. Add a second key to
    an identity to rotate (see docs/security.md)."""
    from opsbay_mqtt.errors import ConfigError
    from opsbay_mqtt.keys import new_key_instructions

    appended = tuple(append or ())
    if appended and kind not in ("client", "node"):
        run(
            functools.partial(_refuse, ConfigError(f"--append: a {kind} gets no key, only a login"))
        )
    text, entry = run(
        lambda: new_key_instructions(kind, name, prefix, appended=appended, passwd_file=passwd_file)
    )
    for path in appended:
        run(functools.partial(_append_key, path, entry))
    typer.echo(text)


def _refuse(error: Exception) -> None:
    raise error


def _append_key(path: Path, entry: str) -> None:
    import os

    from opsbay_mqtt.errors import ConfigError

    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o077:  # never write a secret into a file others may read
            os.close(fd)
            raise ConfigError(
                f"--append: {path} has mode {mode:04o}, which lets other users read or write it: "
                f"chmod 600 {path} first (opsbay refuses such key files anyway)"
            )
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write("\n" + entry)
    except OSError as e:
        raise ConfigError(f"--append: cannot write {path}: {e.strerror}") from e


store_app = typer.Typer(
    help="The coordinator's record: move it from SQLite to PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(store_app, name="store")


@store_app.command("copy")
def store_copy(
    source: Annotated[
        Path,
        typer.Option(
            "--from",
            metavar="PATH",
            help="The SQLite record: its opsbay.db, or the coordinator's --data-dir.",
        ),
    ],
    target: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="URL",
            envvar="OPSBAY_STORE",
            help="The PostgreSQL record, postgresql://[user@]host[:port]/dbname, as the "
            "coordinator's --store (password by PGPASSWORD or ~/.pgpass); its tables are "
            "created if missing, and must be empty.",
        ),
    ],
) -> None:
    """Copy a SQLite record into an empty PostgreSQL one: every job, execution, node,
    remembered nonce, schedule and schedule run, in one transaction (all or nothing); print
    how many of each. Stop the coordinator first and keep it stopped until the copy is done:
    nothing may write the SQLite record meanwhile. Then start the coordinator(s) with --store
    URL. See docs/postgresql.md."""
    from opsbay_mqtt.errors import ConfigError, UsageError

    def copy() -> dict[str, int]:
        if "://" in str(source):
            raise UsageError("--from", "give the SQLite record's path (opsbay.db or its folder)")
        if target.partition("://")[0].lower() not in ("postgresql", "postgres"):
            raise UsageError("--to", "give a postgresql://... URL")
        try:
            from opsbay_mqtt import pgstore
        except ImportError as e:
            if (e.name or "").partition(".")[0] != "psycopg":
                raise
            raise ConfigError(
                "--to: needs psycopg: pip install 'opsbay-mqtt[postgresql]'"
            ) from None
        path = source / "opsbay.db" if source.is_dir() else source
        return pgstore.copy_record(path, target)  # StoreUnavailable: exit 69 (`exit_for`)

    setup_logging(logging.WARNING)
    copied = run(copy)
    from opsbay_mqtt.pgstore import shown

    typer.echo(
        f"copied {copied['jobs']} jobs, {copied['executions']} executions, "
        f"{copied['nodes']} nodes, {copied['nonces']} nonces, {copied['schedules']} schedules "
        f"and {copied['schedule_runs']} schedule runs to {shown(target)}"
    )
