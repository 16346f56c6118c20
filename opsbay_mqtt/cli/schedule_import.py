"""`opsbay schedule import`: a crontab, one schedule per entry (`crontab` reads it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from opsbay_mqtt.cli.app import JsonOut, Verbose, bus_options, fail, run
from opsbay_mqtt.cli.jobs import Where, _client_config, _notice
from opsbay_mqtt.cli.schedule import (
    CatchUp,
    Overlap,
    StartBy,
    Timeout,
    _changed,
    _JobOptions,
    _name,
    _target,
    _when,
    schedule_app,
)
from opsbay_mqtt.cli.schedule_view import describe, public
from opsbay_mqtt.protocol import wire

if TYPE_CHECKING:
    from opsbay_mqtt.protocol import ScheduleSpec
    from opsbay_mqtt.settings import BusOptions


@schedule_app.command("import")
@bus_options
def import_(
    bus: BusOptions,
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="A user crontab (crontab -l > FILE), - for stdin."),
    ],
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            metavar="NODES",
            help="Where its entries run (the host whose crontab it was).",
        ),
    ] = "",
    where: Where = None,
    name_prefix: Annotated[
        str | None,
        typer.Option(
            "--name-prefix",
            metavar="PREFIX",
            help="Schedule names are PREFIX-LINE (default: the target when it is one node, "
            "else cron).",
        ),
    ] = None,
    tz: Annotated[
        str, typer.Option("--tz", metavar="ZONE", help="Zone of the entries (CRON_TZ= wins).")
    ] = "UTC",
    timeout: Timeout = "1h",
    start_by: StartBy = "10m",
    overlap: Overlap = "skip",
    catch_up: CatchUp = "none",
    jitter: Annotated[
        str,
        typer.Option(
            "--jitter",
            metavar="DURATION",
            help="Delay each run by a random time up to this (less than the shortest time "
            "between two due times of an entry), the same on every coordinator.",
        ),
    ] = "0",
    skip_refused: Annotated[
        bool,
        typer.Option(
            "--skip-refused",
            help="Import what can be imported and list the lines refused (default: refuse "
            "the whole file, exit 2, nothing added).",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the schedules it would add; add nothing.")
    ] = False,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Turn a crontab into schedules, one per entry: comments skipped; CRON_TZ= sets the zone
    of the entries after it; SHELL= runs them through that shell; MAILTO= ignored (the bus
    keeps the output); other NAME=value lines are exported to the entries after them;
    @reboot and entries with an unescaped % are refused, with their line numbers."""
    from opsbay_mqtt import crontab
    from opsbay_mqtt.cli import args as cliargs

    def parse() -> tuple[list[tuple[str, ScheduleSpec]], crontab.Crontab]:
        nodes, labels = _target(target, where)
        if tz != "UTC":
            _when("@daily", None, tz)
        options = _JobOptions(timeout, start_by, overlap, catch_up, jitter)
        text = _read(file)
        table = crontab.parse(text, tz)
        from opsbay_mqtt.topics import NODE_NAME_RE

        single = nodes if nodes and NODE_NAME_RE.fullmatch(nodes) else "cron"
        first = _name(name_prefix or single, "--name-prefix" if name_prefix else "--target")
        specs = [
            (
                _name(f"{first}-{e.line}"),
                options.spec(
                    cron=e.cron, every_s=None, tz=e.tz, target=nodes, where=labels,
                    cmd=cliargs.check_command(e.command, f"line {e.line}"),
                ),
            )
            for e in table.entries
        ]  # fmt: skip
        return specs, table

    specs, table = run(parse)
    for line, note in table.notes:
        typer.echo(f"line {line}: {note}", err=True)
    for line, why in table.refused:
        typer.echo(f"line {line}: refused: {why}", err=True)
    if table.refused and not skip_refused:
        fail(
            2, f"{len(table.refused)} line(s) refused, nothing added (--skip-refused adds the rest)"
        )
    if not specs:
        typer.echo(f"opsbay: {file}: no entries to import", err=True)
        if json_out:
            typer.echo("[]")
        return
    if dry_run:
        if json_out:
            typer.echo(json.dumps([{"name": n, **wire(s)} for n, s in specs], indent=2))
        for n, s in [] if json_out else specs:
            typer.echo(f"{n}: {describe(wire(s))}: {s.command}")
        return
    cfg = _client_config(bus, verbose)
    added: list[Any] = []

    def send() -> None:
        from opsbay_mqtt.client import Client

        with Client(cfg, notice=_notice) as c:
            todo = _not_there(specs, c.query("schedules"))
            for n, s in todo:
                added.append(_changed(c, "add", n, spec=s))
                if not json_out:
                    typer.echo(f"added {n}: {describe(added[-1])}: {s.command}")

    try:
        run(send)
    finally:
        if added and len(added) < len(specs):
            typer.echo(f"opsbay: {len(added)} of {len(specs)} schedule(s) were added", err=True)
    if json_out:
        typer.echo(json.dumps(public(added), indent=2))


def _not_there(
    specs: list[tuple[str, ScheduleSpec]], existing: list[dict[str, Any]]
) -> list[tuple[str, ScheduleSpec]]:
    """The entries to add: those not scheduled already. An entry whose schedule exists (the
    same when, target and command, under any name: a crontab imported again, perhaps edited)
    is left out with a note; a name taken by another schedule refuses the whole import, before
    anything is added."""
    from opsbay_mqtt.cli import args as cliargs

    def same(s: ScheduleSpec) -> str:
        return same_of(wire(s))

    by_content = {same_of(e): e["name"] for e in existing}
    by_name = {e["name"]: same_of(e) for e in existing}
    todo, taken = [], []
    for n, s in specs:
        there = by_content.get(same(s))
        if there is not None:
            typer.echo(f"{n}: already scheduled as {there}; left as it is", err=True)
        elif n in by_name:
            taken.append(n)
        else:
            todo.append((n, s))
    if taken:
        raise cliargs.UsageError(
            "--name-prefix",
            f"{', '.join(taken)}: taken by other schedules; nothing added (choose another "
            "--name-prefix, or remove those)",
        )
    return todo


def same_of(e: dict[str, Any]) -> str:
    """What makes two schedules the same: when, where and what (as one comparable text)."""
    keys = ("cron", "every_s", "tz", "target", "where", "command")
    return json.dumps([e.get(k) for k in keys], sort_keys=True)


def _read(file: Path) -> str:
    from opsbay_mqtt.cli import args as cliargs

    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as e:
        raise cliargs.UsageError("FILE", f"cannot read {file}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise cliargs.UsageError("FILE", f"{file}: not UTF-8 (at byte {e.start})") from None
