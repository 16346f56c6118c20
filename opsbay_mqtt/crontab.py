"""A user crontab (`crontab -l`) read as schedules for `opsbay schedule import` (pure).

What each kind of line becomes:
- an entry (`m h dom mon dow command`, or `@daily command`): a schedule; its expression is
  checked by `schedules.check_cron` on the way in;
- blank lines and `#` comments: nothing;
- `CRON_TZ=zone`: the zone of the entries after it (as cronie has it);
- `SHELL=/bin/bash` (any shell but /bin/sh): the entries after it run through that shell
  (`exec /bin/bash -c '...'`), as cron would run them; the worker runs commands with /bin/sh;
- `MAILTO=`, `MAILFROM=`: nothing (the bus keeps every run's output; `opsbay schedule check`
  says when one failed);
- any other `NAME=value` (PATH, TZ, ...): exported for the entries after it, written at the
  front of their commands (`export PATH='/usr/bin:/bin'; ...`);
- `@reboot`: refused: it has no due time on the bus (keep it on the node);
- an entry with an unescaped `%`: refused: cron sends what follows it to the command's stdin,
  the bus does not (write `\\%` for a literal one, or use printf and a pipe).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from opsbay_mqtt import schedules

_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")
_IGNORED = ("MAILTO", "MAILFROM")


@dataclass(frozen=True)
class Entry:
    line: int
    cron: str
    tz: str
    command: str


@dataclass
class Crontab:
    entries: list[Entry] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    notes: list[tuple[int, str]] = field(default_factory=list)  # (line, what was done)


def parse(text: str, tz: str = "UTC") -> Crontab:
    """The entries of a crontab, and the lines refused, with their line numbers."""
    out = Crontab()
    env: dict[str, str] = {}
    shell = "/bin/sh"
    bad_zone: int | None = None  # the line of a refused CRON_TZ: its entries are refused too
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assign = _ASSIGN.fullmatch(line)
        if assign and not line.startswith("@"):
            name, value = assign.group(1), _unquote(assign.group(2))
            if name == "CRON_TZ":
                try:
                    tz, bad_zone = schedules.check_zone(value), None
                except ValueError as e:
                    out.refused.append((number, f"CRON_TZ: {e}"))
                    bad_zone = number
            elif name == "SHELL":
                shell = value or "/bin/sh"
                if shell != "/bin/sh":
                    out.notes.append((number, f"the entries after it run through {shell} -c"))
            elif name in _IGNORED:
                out.notes.append((number, f"{name} ignored: the bus keeps every run's output"))
            else:
                env[name] = value
            continue
        entry = _entry(number, line, tz, env, shell)
        if bad_zone is not None and not isinstance(entry, str):
            entry = f"its zone, CRON_TZ on line {bad_zone}, was refused"
        if isinstance(entry, str):
            out.refused.append((number, entry))
        else:
            out.entries.append(entry)
    return out


def _entry(number: int, line: str, tz: str, env: dict[str, str], shell: str) -> Entry | str:
    if line.startswith("@"):
        expr, _, command = line.partition(" ")
        if expr.lower() == "@reboot":
            return (
                "@reboot has no due time on the bus: keep it on the node (its own crontab, "
                "or a systemd unit)"
            )
    else:
        fields = line.split(None, 5)
        if len(fields) < 6:
            return "not an entry: five time fields and a command expected"
        expr, command = " ".join(fields[:5]), fields[5]
    command = command.strip()
    if not command:
        return "no command"
    if command.split()[0] == "root":
        return (
            "looks like a system crontab line (a user field, root, before the command): remove "
            "the user field; commands run as the worker's user"
        )
    try:
        schedules.check_cron(expr)
    except ValueError as e:
        return str(e)
    if re.search(r"(?<!\\)%", command):
        return (
            "holds an unescaped %: cron sends what follows it to the command's stdin, the bus "
            "does not; write \\% for a literal %, or use printf and a pipe"
        )
    command = command.replace("\\%", "%")
    if shell != "/bin/sh":
        command = f"exec {shlex.quote(shell)} -c {shlex.quote(command)}"
    if env:
        exports = "; ".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
        command = f"{exports}; {command}"
    return Entry(number, expr, tz, command)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
