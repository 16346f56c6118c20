"""`opsbay schedule ...`: schedules kept by the bus itself, every run an ordinary job."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from opsbay_mqtt.cli.app import JsonOut, Verbose, app, bus_options, run
from opsbay_mqtt.cli.jobs import Where, _client_config, _command, _notice, _write
from opsbay_mqtt.cli.schedule_view import (
    describe,
    in_zone,
    outcome,
    problem,
    public,
    say,
    shown_target,
    utc,
    why_failed,
)

if TYPE_CHECKING:
    from opsbay_mqtt.client import ClientConfig
    from opsbay_mqtt.protocol import ScheduleSpec
    from opsbay_mqtt.settings import BusOptions

schedule_app = typer.Typer(
    help="Schedules kept by the bus: a cron for the fleet. Each run is an ordinary job "
    "(results, watch, exit codes); each due time runs once, whatever the number of "
    "coordinators. See docs/schedules.md.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(schedule_app, name="schedule")

CHECK_DETAILS = 20  # `schedule check`: failed runs whose nodes and exit codes it asks for
EXIT_ATTENTION = 1  # `schedule check`: a schedule's last run failed, was skipped, or is overdue

Name = Annotated[str, typer.Argument(metavar="NAME", help="The schedule's name.")]
Timeout = Annotated[
    str,
    typer.Option(
        "--timeout", metavar="DURATION", help="Run timeout of each run (as submit; at most 7d)."
    ),
]
StartBy = Annotated[
    str,
    typer.Option(
        "--start-by",
        metavar="DURATION",
        help="Each run must start within this long after its due time, or it is expired; a "
        "due time no coordinator reached within it is missed (see --catch-up).",
    ),
]
Overlap = Annotated[
    str,
    typer.Option(
        "--overlap",
        metavar="skip|allow",
        help="When the previous run is still pending or running at a due time: skip that due "
        "time (recorded, and reported by `schedule check`), or allow a second run beside it. "
        "Default skip: a run that outlasts its interval is usually stuck or slow, and piling "
        "copies onto the same nodes makes it worse.",
    ),
]
CatchUp = Annotated[
    str,
    typer.Option(
        "--catch-up",
        metavar="latest|none",
        help="Due times missed while no coordinator ran (past --start-by): run the latest of "
        "them once when one is back (latest, as systemd's Persistent=true), or only record "
        "them as missed (none). Never more than one run.",
    ),
]
Jitter = Annotated[
    str,
    typer.Option(
        "--jitter",
        metavar="DURATION",
        help="Delay each run by a random time up to this (0 to 1d; with --every, less than "
        "the interval), to spread many schedules due at once. The same on every coordinator.",
    ),
]


class _JobOptions:
    """The options every schedule's runs share (add and import), checked."""

    def __init__(
        self,
        timeout: str,
        start_by: str,
        overlap: str,
        catch_up: str,
        jitter: str,
        batch: str | None = None,
        max_failures: str | None = None,
    ) -> None:
        from opsbay_mqtt.cli import args as cliargs
        from opsbay_mqtt.protocol import MAX_JITTER_S

        self.timeout_s = cliargs.parse_timeout(timeout)
        self.start_within_s = cliargs.parse_duration(start_by, "--start-by", 7 * 86400)
        if overlap not in ("skip", "allow"):
            raise cliargs.UsageError("--overlap", f"{overlap!r}: give skip or allow")
        if catch_up not in ("latest", "none"):
            raise cliargs.UsageError("--catch-up", f"{catch_up!r}: give latest or none")
        self.overlap, self.catch_up = overlap, catch_up
        self.jitter_s = 0 if jitter in ("0", "0s") else cliargs.parse_duration(jitter, "--jitter")
        if self.jitter_s > MAX_JITTER_S:
            raise cliargs.UsageError("--jitter", f"{jitter!r}: at most 1d")
        self.batch = None if batch is None else cliargs.check_limit(batch, "--batch", True)
        self.max_failures = (
            None
            if max_failures is None
            else cliargs.check_limit(max_failures, "--max-failures", False)
        )

    def spec(
        self, *, cron: str | None, every_s: int | None, tz: str, target: str, where: Any, cmd: str
    ) -> ScheduleSpec:
        from opsbay_mqtt.cli import args as cliargs
        from opsbay_mqtt.protocol import ScheduleSpec

        if every_s is not None and self.jitter_s >= every_s:
            raise cliargs.UsageError("--jitter", "must be shorter than the --every interval")
        if cron is not None:
            from opsbay_mqtt import schedules

            try:
                schedules.check_jitter(cron, tz, self.jitter_s)
            except ValueError as e:
                raise cliargs.UsageError("--jitter", str(e)) from None
        return ScheduleSpec(
            cron=cron,
            every_s=every_s,
            tz=tz,
            target=target,
            where=where,
            command=cmd,
            timeout_s=self.timeout_s,
            start_within_s=self.start_within_s,
            batch=self.batch,
            max_failures=self.max_failures,
            overlap=self.overlap,  # type: ignore[arg-type]
            catch_up=self.catch_up,  # type: ignore[arg-type]
            jitter_s=self.jitter_s,
        )


def _when(cron: str | None, every: str | None, tz: str) -> tuple[str | None, int | None, str]:
    """(cron, every_s, zone) from --cron / --every / --tz, checked (UsageError)."""
    from opsbay_mqtt import schedules
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.protocol import MAX_EVERY_S, MIN_EVERY_S

    if (cron is None) == (every is None):
        raise cliargs.UsageError("--cron", "give --cron EXPR or --every DURATION, one of them")
    try:
        schedules.check_zone(tz)
    except ValueError as e:
        raise cliargs.UsageError("--tz", str(e)) from None
    if every is not None:
        if tz != "UTC":
            raise cliargs.UsageError("--tz", "applies to --cron only: --every counts real seconds")
        seconds = cliargs.parse_duration(every, "--every", MAX_EVERY_S)
        if seconds < MIN_EVERY_S:
            raise cliargs.UsageError(
                "--every", f"{every!r} is below the minimum interval, {MIN_EVERY_S}s"
            )
        return None, seconds, tz
    assert cron is not None
    try:
        return schedules.check_cron(" ".join(cron.split())), None, tz
    except ValueError as e:
        raise cliargs.UsageError("--cron", str(e)) from None


def _target(target: str, where: list[str] | None) -> tuple[str, dict[str, str]]:
    from opsbay_mqtt.cli import args as cliargs

    labels = cliargs.parse_labels(where or [], "--where")
    if target:
        cliargs.check_target(target)
    elif not labels:
        raise cliargs.UsageError("--target", "give a target (--target), labels (--where), or both")
    return target, labels


def _name(name: str, option: str = "NAME") -> str:
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.topics import NODE_NAME_RE

    if not NODE_NAME_RE.fullmatch(name):
        raise cliargs.UsageError(
            option,
            f"{name!r}: a schedule name is 1-63 of A-Z a-z 0-9 . _ - (a letter or digit first)",
        )
    return name


def _change(cfg: ClientConfig, op: str, name: str, **params: Any) -> Any:
    from opsbay_mqtt.client import Client

    with Client(cfg, notice=_notice) as c:
        return _changed(c, op, name, **params)


def _changed(c: Any, op: str, name: str, **params: Any) -> Any:
    """`c.change_schedule(...)`, saying when no answer came that the change may still be made
    (a coordinator that reads the request later, within the freshness window, makes it)."""
    from opsbay_mqtt.errors import BrokerError, BrokerRefused

    try:
        return c.change_schedule(op, name, **params)
    except BrokerRefused:
        raise
    except BrokerError as e:
        raise BrokerError(
            f"{e} The {op} of schedule {name} may still be made by a coordinator that reads it "
            f"later: see `opsbay schedule show {name}` before trying again."
        ) from e


@schedule_app.command("add")
@bus_options
def add(
    bus: BusOptions,
    name: Name,
    cron: Annotated[
        str | None,
        typer.Option(
            "--cron",
            metavar="EXPR",
            help="Five fields (minute hour day-of-month month day-of-week, as crontab(5)) or "
            "@hourly, @daily (@midnight), @weekly, @monthly, @yearly (@annually); in --tz. "
            "Quote it.",
        ),
    ] = None,
    tz: Annotated[
        str,
        typer.Option(
            "--tz", metavar="ZONE", help="Time zone of --cron (IANA name: Europe/Berlin)."
        ),
    ] = "UTC",
    every: Annotated[
        str | None,
        typer.Option(
            "--every",
            metavar="DURATION",
            help="Instead of --cron: every this long (10s at least; 30s, 5m, 1h, 1d), at "
            "multiples of it since the epoch (1h: the top of each UTC hour).",
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option("--target", "-t", metavar="NODES", help="As submit: a node, a list, a glob."),
    ] = "",
    where: Where = None,
    command: Annotated[
        str | None,
        typer.Option("--command", "-c", metavar="COMMAND", help="As submit (- reads stdin)."),
    ] = None,
    command_file: Annotated[
        Path | None,
        typer.Option("--command-file", metavar="FILE", help="Read the command from a file."),
    ] = None,
    timeout: Timeout = "10m",
    start_by: StartBy = "10m",
    batch: Annotated[str | None, typer.Option("--batch", metavar="N|N%", help="As submit.")] = None,
    max_failures: Annotated[
        str | None, typer.Option("--max-failures", metavar="N|N%", help="As submit.")
    ] = None,
    overlap: Overlap = "skip",
    catch_up: CatchUp = "latest",
    jitter: Jitter = "0",
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Add a schedule: run a job on its target at every due time. The client policy of your
    key applies when it is added and again at every run. Exits 2 for an invalid expression,
    zone or interval, or a name already taken."""

    def spec() -> ScheduleSpec:
        _name(name)
        when = _when(cron, every, tz)
        nodes, labels = _target(target, where)
        options = _JobOptions(timeout, start_by, overlap, catch_up, jitter, batch, max_failures)
        cmd = _command(command, command_file)
        return options.spec(
            cron=when[0], every_s=when[1], tz=when[2], target=nodes, where=labels, cmd=cmd
        )

    s = run(spec)
    cfg = _client_config(bus, verbose)
    data = run(lambda: _change(cfg, "add", name, spec=s))
    say(data, json_out, f"schedule {name} added")


@schedule_app.command("list")
@bus_options
def list_(bus: BusOptions, json_out: JsonOut = False, verbose: Verbose = False) -> None:
    """List schedules: when they run, the next run (UTC), the last run and its outcome."""
    from opsbay_mqtt.client import Client

    cfg = _client_config(bus, verbose)

    def fetch() -> Any:
        with Client(cfg, notice=_notice) as c:
            return c.query("schedules")

    found = run(fetch)
    if json_out:
        typer.echo(json.dumps(public(found), indent=2))
        return
    if not found:
        _write("no schedules\n")
        return
    from opsbay_mqtt.cli import render

    rows = []
    for s in found:
        nxt = "paused" if s["paused"] else utc(s["next_fire_ms"])
        rows.append([s["name"], describe(s), shown_target(s), nxt, outcome(s["last_run"])])
    _write(render.table(["NAME", "WHEN", "TARGET", "NEXT RUN (UTC)", "LAST RUN"], rows))


@schedule_app.command("show")
@bus_options
def show(
    bus: BusOptions,
    name: Name,
    runs: Annotated[
        int, typer.Option("--runs", metavar="N", min=1, max=100, help="Show this many runs.")
    ] = 10,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """A schedule: its definition, its next five due times (in its zone and in UTC), and its
    last runs with their outcomes (skips included, with why). Exits 66 if there is none."""
    from opsbay_mqtt.client import Client

    run(lambda: _name(name))
    cfg = _client_config(bus, verbose)

    def fetch() -> Any:
        with Client(cfg, notice=_notice) as c:
            return c.query("schedule", schedule=name, limit=runs)

    s = run(fetch)
    if json_out:
        typer.echo(json.dumps(public(s), indent=2))
        return
    lines = [
        f"schedule  {s['name']}{'  (paused)' if s['paused'] else ''}",
        f"when      {describe(s)}",
        f"target    {shown_target(s)}",
        f"command   {s['command']}",
        f"timeout   {s['timeout_s']}s; start within {s['start_within_s']}s of the due time",
        f"policy    overlap {s['overlap']}, catch-up {s['catch_up']}, jitter {s['jitter_s']}s",
        f"rollout   batch {s['batch'] or 'all'}, max failures {s['max_failures'] or 'any'}",
        f"owner     {s['owner']}",
        "next due  " + ("(paused)" if s["paused"] else ""),
    ]
    if not s["paused"]:
        lines += [f"  {in_zone(ms, s['tz'])}   {utc(ms)}" for ms in s["upcoming_ms"]]
    lines.append("last runs" + ("" if s["runs"] else "  (none yet)"))
    for r in s["runs"]:
        lines.append(f"  {utc(r['due_ms'])}  {outcome(r)}")
    _write("\n".join(lines) + "\n")


def _simple(op: str, done: str, help_text: str) -> None:
    @schedule_app.command(op, help=help_text)
    @bus_options
    def command(
        bus: BusOptions,
        names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Schedule names.")],
        json_out: JsonOut = False,
        verbose: Verbose = False,
    ) -> None:
        from opsbay_mqtt.client import Client

        for name in names:
            run(lambda name=name: _name(name))  # type: ignore[misc]
        cfg = _client_config(bus, verbose)
        answers: list[Any] = []

        def change_each() -> None:
            with Client(cfg, notice=_notice) as c:
                for name in names:
                    answers.append(_changed(c, op, name))
                    if not json_out:
                        say(answers[-1], False, f"schedule {name} {done}")

        run(change_each)
        if json_out:
            typer.echo(json.dumps(public(answers if len(names) > 1 else answers[0]), indent=2))


_simple("pause", "paused", "Pause a schedule: no runs until resumed (due times meanwhile are "
        "neither run nor reported missed).")  # fmt: skip
_simple("resume", "resumed", "Resume a paused schedule, from its next due time on.")
_simple("remove", "removed", "Remove a schedule (its past runs stay in `results --schedule`).")


@schedule_app.command("run")
@bus_options
def run_now(
    bus: BusOptions,
    name: Name,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Wait for the outcome, as submit --wait.")
    ] = False,
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Run a schedule once, now (its policy checked as for any run); print the job id. With
    --wait, exit as `submit --wait` does."""
    from opsbay_mqtt.cli.jobs import _for_terminal, finish_wait
    from opsbay_mqtt.cli.waiting import Follower, TerminalView
    from opsbay_mqtt.client import Client
    from opsbay_mqtt.topics import new_job_id

    run(lambda: _name(name))
    cfg = _client_config(bus, verbose)
    job_id = new_job_id()
    view = TerminalView(_for_terminal(sys.stdout), _for_terminal(sys.stderr, True), labelled=True)
    follower = Follower(view)

    def go() -> Any:
        with Client(cfg, notice=_notice) as c:
            if wait:
                c.expect_job(job_id)
            _changed(c, "run", name, job_id=job_id)
            if not wait:
                return None
            return c.wait(job_id, None, on_update=None if json_out else follower.update)

    got = run(go)
    if got is None:
        typer.echo(json.dumps({"job_id": job_id}) if json_out else job_id)
        return
    finish_wait(got, follower, json_out)


@schedule_app.command("check")
@bus_options
def check(
    bus: BusOptions,
    names: Annotated[
        list[str] | None,
        typer.Argument(metavar="[NAME]...", help="Only these schedules (default: all)."),
    ] = None,
    grace: Annotated[
        str,
        typer.Option(
            "--grace",
            metavar="DURATION",
            help="How long after its due time (and jitter) a run may be late before it is overdue.",
        ),
    ] = "1m",
    json_out: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """For monitoring: exit 0 when every schedule is fine; exit 1, naming each, when a
    schedule's last due time failed (or was skipped, refused or missed), or a run is overdue
    (a due time passed and no coordinator ran it: all of them down?). Only the last due time
    counts: a failure followed by a success is fine. Paused schedules are not checked. 69
    when no coordinator answers, 66 for an unknown NAME; 77 when there are too many schedules
    for one answer (about 4,000): name them."""
    from opsbay_mqtt.cli import args as cliargs
    from opsbay_mqtt.client import Client

    grace_s = run(lambda: cliargs.parse_duration(grace, "--grace"))
    for n in names or []:
        run(lambda n=n: _name(n))  # type: ignore[misc]
    cfg = _client_config(bus, verbose)

    def fetch() -> list[dict[str, Any]]:
        with Client(cfg, notice=_notice) as c:
            # Named ones one by one (however many schedules the bus keeps), else all at once.
            if names:
                found = [c.query("schedule", schedule=n, limit=1) for n in dict.fromkeys(names)]
            else:
                found = c.query("schedules")
            # Overdue by the coordinator's clock, not this host's (a monitoring host's clock
            # may be off): each answer carries the coordinator's time.
            now_ms = found[0]["now_ms"] if found else int(time.time() * 1000)
            report = [{"name": s["name"], "problem": problem(s, now_ms, grace_s)} for s in found]
            ended = ("succeeded", "pending", "running", None)
            failed = [(r, s["last_run"]["job_id"]) for r, s in zip(report, found, strict=True)
                      if r["problem"] and s["last_run"] and s["last_run"]["job_id"]
                      and s["last_run"].get("state") not in ended]  # fmt: skip
            for r, job_id in failed[:CHECK_DETAILS]:  # what went wrong, as `result` says it
                r["problem"] += why_failed(c.result(job_id))
            return report

    report = run(fetch)
    bad = [r for r in report if r["problem"]]
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    elif bad:
        for r in bad:
            typer.echo(f"{r['name']}: {r['problem']}")
    else:
        typer.echo(f"ok: {len(report)} schedule(s)")
    if bad:
        raise typer.Exit(EXIT_ATTENTION)


# The `import` command lives beside this module; importing it registers it on `schedule_app`.
from opsbay_mqtt.cli import schedule_import as _schedule_import  # noqa: E402, F401
