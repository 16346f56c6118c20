"""The `opsbay` command: the app, the options every bus command shares, and error handling.

The commands live in `cli.jobs` (submit, result, results, nodes) and `cli.admin` (coordinator,
worker, stack, keys). Each imports what it needs only when it runs, so start-up stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from opsbay_mqtt.errors import exit_for as exit_for  # the one mapping, for every command
from opsbay_mqtt.logs import setup_logging as setup_logging

if typing.TYPE_CHECKING:
    from opsbay_mqtt.settings import BusOptions

app = typer.Typer(
    help="opsbay: an MQTT job bus. Submit shell jobs to nodes, wait for them, query results.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

# The options every command that talks to the bus takes, with their environment fallbacks.
_BUS_OPTIONS: dict[str, tuple[Any, Any]] = {
    "broker": (
        Annotated[
            str,
            typer.Option(
                "--broker",
                metavar="URL",
                envvar="OPSBAY_BROKER",
                help="Broker URL: mqtt://[user:pass@]host[:port], or mqtts://... for TLS; "
                "add ?version=3.1.1 for an MQTT 3.1.1 broker. Percent-encode a user or password "
                "holding @ : / ? # % or spaces (# as %23, / as %2F, @ as %40). Several brokers "
                "(the servers of a cluster): whole URLs separated by commas, all of one MQTT "
                "version and scheme; the first that answers is used, and a lost connection "
                "moves on to the next. A bad URL exits 78 (a setting); the password is never "
                "shown.",
            ),
        ],
        DEFAULT_BROKER,
    ),
    "secret": (
        Annotated[
            str | None,
            typer.Option(
                "--secret",
                metavar="SECRET",
                envvar="OPSBAY_SECRET",
                show_envvar=True,
                help="Shared HMAC secret. Prefer OPSBAY_SECRET or --secret-file: a command line "
                "is visible to every user of the host.",
            ),
        ],
        None,
    ),
    "secret_file": (
        Annotated[
            Path | None,
            typer.Option(
                "--secret-file",
                metavar="FILE",
                envvar="OPSBAY_SECRET_FILE",
                help="File holding the shared secret.",
            ),
        ],
        None,
    ),
    "key_file": (
        Annotated[
            Path | None,
            typer.Option(
                "--key-file",
                metavar="FILE",
                envvar="OPSBAY_KEY_FILE",
                help="Per-identity keys (TOML, see `opsbay keys --help`), instead of or beside "
                "the shared secret.",
            ),
        ],
        None,
    ),
    "prefix": (
        Annotated[
            str,
            typer.Option(
                "--prefix",
                metavar="PREFIX",
                envvar="OPSBAY_PREFIX",
                help="Topic prefix of this bus.",
            ),
        ],
        "opsbay",
    ),
    "ca_file": (
        Annotated[
            Path | None,
            typer.Option(
                "--ca-file",
                metavar="FILE",
                envvar="OPSBAY_CA_FILE",
                help="CA bundle for mqtts:// (default: the system's).",
            ),
        ],
        None,
    ),
    "client_cert": (
        Annotated[
            Path | None,
            typer.Option(
                "--client-cert",
                metavar="FILE",
                envvar="OPSBAY_CLIENT_CERT",
                help="Client certificate for mqtts:// brokers that ask for one.",
            ),
        ],
        None,
    ),
    "client_key": (
        Annotated[
            Path | None,
            typer.Option(
                "--client-key",
                metavar="FILE",
                envvar="OPSBAY_CLIENT_KEY",
                help="Private key of --client-cert.",
            ),
        ],
        None,
    ),
}

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# Commands whose options are not worked out yet: `finish_commands` does it for the commands
# typer is about to build (evaluating every command's option annotations took 4 ms per call).
_UNFINISHED: dict[Callable[..., Any], Callable[[], None]] = {}


def bus_options(fn: F) -> F:
    """Give a command the shared bus options, passed to it as one `bus: BusOptions` argument.

    Why signatures are rewritten here: typer has no shared options other than the app's
    callback, whose options go before the command (`opsbay --broker URL submit ...`), which
    would break every script and cron line that puts them after it; and typer reads each
    command's options from its signature. So the eight shared options are added to each
    command's signature, and only for the command about to run (`finish_commands`)."""

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> Any:
        from opsbay_mqtt.settings import BusOptions

        given = {name: kwargs.pop(name) for name in _BUS_OPTIONS}
        if given["secret"] is not None:
            run(lambda: _utf8_setting(given["secret"], "--secret / OPSBAY_SECRET"))
        return fn(bus=BusOptions(**given), **kwargs)

    def finish() -> None:
        # BusOptions is only imported for type checking (importing it here would pull in paho).
        hints = typing.get_type_hints(fn, localns={"BusOptions": object}, include_extras=True)
        sig = inspect.signature(fn)
        own = [
            p.replace(annotation=hints[p.name]) for p in sig.parameters.values() if p.name != "bus"
        ]
        shared = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind
            )
            for name, (kind, default) in _BUS_OPTIONS.items()
        ]
        wrapper.__signature__ = sig.replace(parameters=own + shared)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {
            **{k: v for k, v in hints.items() if k not in ("bus", "return")},
            **{name: kind for name, (kind, _) in _BUS_OPTIONS.items()},
        }

    _UNFINISHED[wrapper] = finish
    return typing.cast(F, wrapper)


def _utf8_setting(value: str, setting: str) -> None:
    """A setting must be text: bytes that are not UTF-8 arrive as lone surrogates."""
    from opsbay_mqtt.errors import ConfigError

    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{setting}: not valid UTF-8") from None


def finish_commands() -> None:
    """Work out the options of the commands registered now (before typer builds them)."""
    groups = [
        g.typer_instance.registered_commands for g in app.registered_groups if g.typer_instance
    ]
    for command in [c for commands in [app.registered_commands, *groups] for c in commands]:
        finish = _UNFINISHED.pop(command.callback, None) if command.callback else None
        if finish is not None:
            finish()


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens to stderr.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(code: int, text: str) -> NoReturn:
    typer.echo(f"opsbay: {text}", err=True)
    raise typer.Exit(code)


def run(fn: Callable[[], Any]) -> Any:
    """Call `fn`, turning this package's errors into a message and an exit code."""
    from opsbay_mqtt.errors import OpsbayError

    try:
        return fn()
    except OpsbayError as e:
        mapped = exit_for(e)
        if mapped is None:
            raise
        fail(*mapped)


def settings(bus: BusOptions, role: str, name: str | None = None) -> Any:
    from opsbay_mqtt.settings import resolve

    return run(lambda: resolve(bus, role, name))


def parse_duration(text: str, option: str) -> int:
    """'90', '90s', '15m', '2h', '1d' -> seconds (1 s to 3650 days), or UsageError (a
    ConfigError) naming `option`; the run timeout (`option` --timeout or the Cronicle param
    'timeout') at most 7 days."""
    from opsbay_mqtt.cli import args as cliargs

    if option in ("--timeout", "param 'timeout'"):
        return cliargs.parse_timeout(text, option)
    return cliargs.parse_duration(text, option)


def given_in_environment(flags: tuple[str, ...], envvar: str) -> bool:
    """Whether an option came from its environment variable (set, not empty, and none of its
    flags on the command line): a bad value is then a setting (exit 78), not bad usage (2)."""
    typed = any(a in flags or a.split("=", 1)[0] in flags for a in sys.argv[1:])
    return not typed and bool(os.environ.get(envvar))


def usage_or_setting(flags: tuple[str, ...], envvar: str, fn: Callable[[], T]) -> T:
    """`run(fn)`, where a UsageError about an option that came from its environment variable
    is a setting (78) rather than bad usage (2)."""
    from opsbay_mqtt.errors import ConfigError, UsageError

    def checked() -> T:
        try:
            return fn()
        except UsageError as e:
            if given_in_environment(flags, envvar):
                said = str(e).removeprefix(f"{e.option}: ")
                raise ConfigError(f"{e.option} (from {envvar}): {said}") from e
            raise

    return typing.cast(T, run(checked))


# Which module defines each command: a call imports (and typer builds) only the one it needs.
COMMAND_MODULES = {
    "submit": "jobs",
    "cancel": "jobs",
    "result": "jobs",
    "results": "jobs",
    "nodes": "jobs",
    "coordinator": "admin",
    "worker": "admin",
    "stack": "admin",
    "keys": "admin",
    "store": "admin",
    "watch": "fleet",
    "cronicle": "fleet",
    "schedule": "schedule",
}


@app.callback()
def _group() -> None:
    """opsbay: an MQTT job bus. Submit shell jobs to nodes, wait for them, query results."""


def main() -> None:
    import importlib

    from opsbay_mqtt.lazymodules import defer_urllib_request

    defer_urllib_request()  # before any command imports paho

    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    wanted = COMMAND_MODULES.get(words[0]) if words else None
    for module in [wanted] if wanted else sorted(set(COMMAND_MODULES.values())):
        importlib.import_module(f"opsbay_mqtt.cli.{module}")  # registers its commands
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    everything = app.registered_commands
    first = words[0] if words else ""
    grouped = {id(g): g.typer_instance.registered_commands for g in _groups(first)}
    if wanted:  # typer builds every registered command's options; build the one that runs
        app.registered_commands = [
            c for c in everything if (c.name or getattr(c.callback, "__name__", "")) == words[0]
        ]
        for g in _groups(first):  # a group's (`schedule add`): only the one that runs
            chosen = [c for c in grouped[id(g)] if words[1:] and c.name == words[1]]
            if chosen:
                g.typer_instance.registered_commands = chosen
    finish_commands()
    try:
        app()
    finally:
        app.registered_commands = everything
        for g in _groups(first):
            g.typer_instance.registered_commands = grouped[id(g)]


def _groups(name: str) -> list[Any]:
    return [g for g in app.registered_groups if g.name == name and g.typer_instance]
