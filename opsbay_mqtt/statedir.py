"""A worker's state folder (its ledger of jobs): where it is by default, and the lock that
gives one folder to one worker at a time."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from opsbay_mqtt.errors import ConfigError

SETTING = "--state-dir / OPSBAY_STATE_DIR"
SYSTEM_BASE = Path("/var/lib/opsbay")
DEFAULT_TEXT = (
    "one per node: /var/lib/opsbay/NODE as root, otherwise $XDG_STATE_HOME/opsbay/NODE "
    "(~/.local/state/opsbay/NODE)"
)
LOCK_FILE = "lock"


def default_state_dir(node: str, *, euid: int, environ: Mapping[str, str]) -> Path:
    """The state folder of the worker for `node` (a valid node name) when none is given: the
    system's as root, the user's XDG state directory otherwise."""
    if euid == 0:
        return SYSTEM_BASE / node
    return _xdg_state_home(environ) / "opsbay" / node


def _xdg_state_home(environ: Mapping[str, str]) -> Path:
    # The XDG Base Directory spec: an empty or relative XDG_STATE_HOME is ignored.
    given = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(given):
        return Path(given)
    home = environ.get("HOME", "")
    if not os.path.isabs(home):
        raise ConfigError(
            f"{SETTING}: no default state folder without HOME or XDG_STATE_HOME (absolute "
            "paths); set one of them, or give --state-dir"
        )
    return Path(home) / ".local" / "state"


LEGACY_DIR = "opsbay-state"  # the default before 0.2, relative to the working directory


def refuse_legacy(cwd: Path, chosen: Path) -> None:
    """A worker about to use its new default folder while the working directory holds a ledger
    in the old default (./opsbay-state) would forget every job that ledger knows, and could run
    one again: refuse, and say how to keep it or move it."""
    old = cwd / LEGACY_DIR / "ledger.db"
    if old.is_file() and old.resolve() != (chosen / "ledger.db").resolve():
        raise ConfigError(
            f"{SETTING}: {old.parent} holds a worker's ledger (the default state folder before "
            f"0.2); the default is now {chosen}. To keep it, give --state-dir {old.parent}; or "
            f"move it there (mv {old.parent}/* {chosen}/) with no worker running. Starting with "
            "an empty ledger could run a job it knows a second time"
        )


class StateLock:
    """A worker's hold on its state folder, until `close()` or the end of its process."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def __enter__(self) -> StateLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def lock(path: Path, *, node: str) -> StateLock:
    """Create `path` if needed (mode 0700) and take it for this process, writing this pid and
    `node` into `path/lock`; ConfigError, naming the holder, if another worker has it."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{SETTING}: cannot create {path}: {e}") from e
    busy = (
        f"state folder {path} is in use by another worker ({{holder}}): give each worker its "
        f"own --state-dir (default: {DEFAULT_TEXT})"
    )
    return hold(path / LOCK_FILE, node, setting=SETTING, busy=busy, label="node ")


def hold(file: Path, name: str, *, setting: str, busy: str, label: str = "") -> StateLock:
    """Take `file` (a lock file, created if needed) for this process, writing this pid and
    `name` into it; ConfigError `busy` (its `{holder}` filled in: the pid, and `label` + the
    holder's name) if another process has it."""
    try:
        # Python opens it non-inheritable: a job never holds its worker's folder.
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot open {file}: {e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd, label)
        os.close(fd)
        raise ConfigError(busy.format(holder=holder)) from None
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"{setting}: cannot lock {file}: {e}") from e
    # A process that died left its pid here, but its flock went with it: only now overwrite.
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {name}\n".encode(), 0)
    return StateLock(file.parent, fd)


def _holder(fd: int, label: str) -> str:
    """'pid 1234, node a' (or 'pid 1234, coordinator'), as the holder of the lock wrote it."""
    try:
        words = os.pread(fd, 256, 0).decode(errors="replace").split()
    except OSError:
        words = []
    if not words or not words[0].isdigit():
        return "pid not known yet"
    return f"pid {words[0]}" + (f", {label}{words[1]}" if len(words) > 1 else "")
