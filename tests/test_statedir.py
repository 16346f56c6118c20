"""statedir: each node has its own default folder, and a folder has one worker at a time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from opsbay_mqtt import statedir
from opsbay_mqtt.errors import ConfigError

HOME = {"HOME": "/home/ops"}


@pytest.mark.parametrize(
    ("euid", "environ", "expected"),
    [
        (0, {}, "/var/lib/opsbay/web-01"),
        (0, {**HOME, "XDG_STATE_HOME": "/srv/state"}, "/var/lib/opsbay/web-01"),
        (1000, HOME, "/home/ops/.local/state/opsbay/web-01"),
        (1000, {**HOME, "XDG_STATE_HOME": "/srv/state"}, "/srv/state/opsbay/web-01"),
        (1000, {"XDG_STATE_HOME": "/srv/state"}, "/srv/state/opsbay/web-01"),
        # The XDG spec: an empty or relative XDG_STATE_HOME is ignored.
        (1000, {**HOME, "XDG_STATE_HOME": ""}, "/home/ops/.local/state/opsbay/web-01"),
        (1000, {**HOME, "XDG_STATE_HOME": "state"}, "/home/ops/.local/state/opsbay/web-01"),
    ],
)
def test_default_state_dir(euid: int, environ: dict[str, str], expected: str) -> None:
    assert statedir.default_state_dir("web-01", euid=euid, environ=environ) == Path(expected)


@pytest.mark.parametrize(
    "environ", [{}, {"HOME": ""}, {"HOME": "ops"}, {"HOME": "ops", "XDG_STATE_HOME": "s"}]
)
def test_no_default_without_an_absolute_home(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="--state-dir / OPSBAY_STATE_DIR: no default"):
        statedir.default_state_dir("web-01", euid=1000, environ=environ)


def test_each_node_has_its_own_default() -> None:
    a, b = (statedir.default_state_dir(n, euid=1000, environ=HOME) for n in ("a", "b"))
    assert a != b and a.parent == b.parent


def test_lock_creates_the_folder_for_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "x" / "state"
    with statedir.lock(path, node="a"):
        assert path.stat().st_mode & 0o777 == 0o700
        assert (path / "lock").read_text() == f"{os.getpid()} a\n"


def test_lock_leaves_an_existing_folder_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o750)
    path.chmod(0o750)
    with statedir.lock(path, node="a"):
        assert path.stat().st_mode & 0o777 == 0o750


def test_a_second_lock_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    path = tmp_path / "state"
    with statedir.lock(path, node="a"):
        with pytest.raises(ConfigError) as e:
            statedir.lock(path, node="b")
        assert str(e.value) == (
            f"state folder {path} is in use by another worker (pid {os.getpid()}, node a): "
            f"give each worker its own --state-dir (default: {statedir.DEFAULT_TEXT})"
        )
        assert (path / "lock").read_text() == f"{os.getpid()} a\n"  # the refused one wrote none
    with statedir.lock(path, node="b"):  # released on close
        assert (path / "lock").read_text() == f"{os.getpid()} b\n"


def test_a_stale_lock_file_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    (path / "lock").write_text("999999999 ghost\nleft over\n")
    with statedir.lock(path, node="a"):
        assert (path / "lock").read_text() == f"{os.getpid()} a\n"


HOLD = """
import sys
from pathlib import Path
from opsbay_mqtt import statedir
held = statedir.lock(Path(sys.argv[1]), node="other")
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_is_held_until_its_process_dies(tmp_path: Path) -> None:
    path = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=rf"in use by another worker \(pid {holder.pid}, "):
            statedir.lock(path, node="a")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)
    with statedir.lock(path, node="a"):  # its lock went with it; its pid is still in the file
        assert (path / "lock").read_text() == f"{os.getpid()} a\n"


def test_a_job_never_inherits_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "state"
    with statedir.lock(path, node="a"):
        out = subprocess.run(
            ["ls", "-l", "/proc/self/fd/"],
            close_fds=False,
            capture_output=True,
            text=True,
            check=True,
        )
    assert "pipe:" in out.stdout  # the listing shows what it inherited: its stdout, at least
    assert str(path / "lock") not in out.stdout


def test_a_folder_that_cannot_be_made_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--state-dir / OPSBAY_STATE_DIR: cannot create"):
        statedir.lock(blocker / "state", node="a")


def test_a_ledger_in_the_old_default_folder_is_not_silently_left_behind(tmp_path: Path) -> None:
    new = tmp_path / "state" / "n1"
    statedir.refuse_legacy(tmp_path, new)  # nothing there: fine
    (tmp_path / "opsbay-state").mkdir()
    (tmp_path / "opsbay-state" / "ledger.db").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"give --state-dir .*opsbay-state"):
        statedir.refuse_legacy(tmp_path, new)
    statedir.refuse_legacy(tmp_path, tmp_path / "opsbay-state")  # it is the one chosen: fine
