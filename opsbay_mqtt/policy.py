"""Who may run what: command patterns and target patterns (pure)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from opsbay_mqtt.errors import ConfigError, Refused

# In a command pattern, `*` matches one run of characters that cannot change what the shell does:
# no spaces, quotes, `;`, `|`, `&`, `$`, backquotes, redirections or globs. `deploy-app *` allows
# `deploy-app v12` but never `deploy-app v12; rm -rf /`.
_SAFE = r"[A-Za-z0-9._/=:,@%+-]"


def _pattern_re(pattern: str) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(_SAFE + "*")
        elif ch == "?":
            parts.append(_SAFE)
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts))


def command_allowed(patterns: Iterable[str], command: str) -> bool:
    """Whether `command` is one of `patterns` (exact, or with `*`/`?` standing for safe text)."""
    return any(_pattern_re(p).fullmatch(command) for p in patterns)


def target_allowed(patterns: Iterable[str], node: str, labels: Mapping[str, str]) -> bool:
    """Whether `node` matches one of `patterns`: a name, a glob (`web-*`), a label (`role=web`)."""
    for p in patterns:
        key, sep, value = p.partition("=")
        if sep:
            if labels.get(key) == value:
                return True
        elif fnmatch.fnmatchcase(node, p):
            return True
    return False


@dataclass(frozen=True)
class ClientPolicy:
    """What one client identity may do; `None` means anything."""

    targets: tuple[str, ...] | None = None
    commands: tuple[str, ...] | None = None

    def check(self, who: str, node: str, labels: Mapping[str, str], command: str) -> None:
        if self.targets is not None and not target_allowed(self.targets, node, labels):
            raise Refused("target_not_allowed", f"client {who!r} may not target node {node!r}")
        if self.commands is not None and not command_allowed(self.commands, command):
            raise Refused("command_not_allowed", f"client {who!r} may not run this command")


@dataclass(frozen=True)
class WorkerPolicy:
    """What a worker agrees to run, and how."""

    allow: tuple[str, ...] = ()
    named: Mapping[str, str] = field(default_factory=dict)
    named_only: bool = False

    def resolve(self, command: str) -> str:
        """The command line to run for a job's command, or Refused."""
        if command.startswith("@"):
            name = command[1:]
            if name not in self.named:
                raise Refused("unknown_command", f"this node defines no command {name!r}")
            return self.named[name]
        if self.named_only:
            raise Refused("command_not_allowed", "this node runs only its named commands (@NAME)")
        if self.allow and not command_allowed(self.allow, command):
            raise Refused("command_not_allowed", "this node's allowlist does not match the command")
        return command


def parse_named(items: Iterable[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, command = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name) or not command.strip():
            raise ConfigError(f"--define: {item!r} is not NAME=COMMAND")
        named[name] = command
    return named


def parse_labels(items: list[str], option: str = "--label") -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9._/-]{1,64}", key.strip()):
            raise ConfigError(f"{option}: {item!r} is not key=value (key: A-Z a-z 0-9 . _ / -)")
        labels[key.strip()] = value.strip()
    return labels
