"""runner: exit codes, separate streams, timeouts that end the whole process group, output caps,
leftovers; HeadTail on its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from opsbay_mqtt import runner
from opsbay_mqtt.runner import HeadTail
from tests.helpers import wait_until


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


@pytest.fixture
def pidfile(tmp_path: Path) -> Path:
    return tmp_path / "pids"


@pytest.fixture(autouse=True)
def _no_strays(pidfile: Path) -> object:
    """Whatever a test recorded in the pid file is killed afterwards, even when it fails."""
    yield None
    if pidfile.exists():
        for pid in pids(pidfile):
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("command", "state", "code"),
    [
        ("true", "succeeded", 0),
        ("exit 0", "succeeded", 0),
        ("false", "failed", 1),
        ("exit 3", "failed", 3),
        ("exit 255", "failed", 255),
        ("sh -c 'exit 42'", "failed", 42),
        ("no-such-command-opsbay", "failed", 127),
    ],
)
def test_exit_code_passthrough(command: str, state: str, code: int) -> None:
    r = runner.run(command, timeout_s=30)
    assert (r.state, r.exit_code) == (state, code)
    assert r.reason is None


def test_stdout_and_stderr_are_separate() -> None:
    r = runner.run("echo out; echo err >&2; printf more", timeout_s=30)
    assert r.stdout == "out\nmore"
    assert r.stderr == "err\n"
    assert (r.stdout_bytes, r.stderr_bytes) == (8, 4)
    assert r.truncated is False
    assert r.state == "succeeded"


def test_killed_by_a_signal_reports_128_plus_the_signal() -> None:
    r = runner.run("echo before; kill -9 $$; echo after", timeout_s=30)
    assert r.state == "failed"
    assert r.exit_code == 137
    assert r.reason == "killed by signal 9"
    assert r.stdout == "before\n"


def test_environment_working_directory_and_clock(tmp_path: Path) -> None:
    r = runner.run(
        'printf "%s %s" "$OPSBAY_T" "$(pwd)"',
        timeout_s=30,
        env={"OPSBAY_T": "v a l", "PATH": os.environ["PATH"]},
        cwd=str(tmp_path),
        clock=lambda: 1234.5,
    )
    assert r.stdout == f"v a l {tmp_path}"
    assert (r.started_ms, r.finished_ms) == (1_234_500, 1_234_500)


def test_stdin_is_empty() -> None:
    r = runner.run("cat; echo done", timeout_s=30)
    assert r.stdout == "done\n"


def test_timeout_ends_the_whole_process_group(pidfile: Path) -> None:
    r = runner.run(
        f"echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; sleep 30 & echo $! >> {pidfile};"
        " wait",
        timeout_s=1,
        kill_grace_s=5,
    )
    assert r.state == "timed_out"
    assert r.exit_code == 128 + signal.SIGTERM
    assert r.reason is not None and "timed out" in r.reason
    recorded = pids(pidfile)
    assert len(recorded) == 3
    assert [p for p in recorded if alive(p)] == []
    assert group_members(recorded[0]) == []


def test_timeout_of_sleep_and_sleep(pidfile: Path) -> None:
    r = runner.run(f"echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; sleep 30", timeout_s=1)
    assert r.state == "timed_out"
    recorded = pids(pidfile)
    assert len(recorded) == 2
    assert [p for p in recorded if alive(p)] == []
    assert group_members(recorded[0]) == []


def test_a_term_ignoring_command_is_killed_after_the_grace(pidfile: Path) -> None:
    r = runner.run(
        f"trap '' TERM; echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; wait",
        timeout_s=1,
        kill_grace_s=0.3,
    )
    assert r.state == "timed_out"
    assert r.exit_code == 128 + signal.SIGKILL  # TERM was ignored: only KILL ended it
    recorded = pids(pidfile)
    assert len(recorded) == 2
    assert [p for p in recorded if alive(p)] == []
    assert group_members(recorded[0]) == []


def test_timeout_also_ends_a_child_that_left_the_group(pidfile: Path) -> None:
    r = runner.run(
        f"echo $$ > {pidfile}; setsid sleep 30 & echo $! >> {pidfile}; sleep 30",
        timeout_s=1,
        kill_grace_s=2,
    )
    assert r.state == "timed_out"
    recorded = pids(pidfile)
    assert len(recorded) == 2
    assert [p for p in recorded if alive(p)] == []


def test_a_background_process_is_ended_after_the_command_exits(pidfile: Path) -> None:
    r = runner.run(f"sleep 100 & echo $! > {pidfile}; echo bg", timeout_s=30, kill_grace_s=5)
    assert r.state == "succeeded"
    assert r.exit_code == 0
    assert r.stdout == "bg\n"
    [bg] = pids(pidfile)
    assert not alive(bg)


def test_a_term_ignoring_background_process_is_killed_after_the_command_exits(
    pidfile: Path,
) -> None:
    r = runner.run(
        f"echo $$ > {pidfile}; (trap '' TERM; sleep 100) & echo $! >> {pidfile}; echo bg",
        timeout_s=30,
        kill_grace_s=0.3,
    )
    assert (r.state, r.exit_code, r.stdout) == ("succeeded", 0, "bg\n")
    shell, bg = pids(pidfile)
    # run() returns right after the KILL: the group may still be on its way out
    wait_until(lambda: group_members(shell) == [], 5, f"process group {shell} to end")
    assert not alive(bg)


def test_a_background_process_that_left_the_group_is_ended_too(pidfile: Path) -> None:
    """`run` promises that a job never leaves processes running after its result."""
    r = runner.run(
        f"setsid sleep 100 & echo $! > {pidfile}; echo bg", timeout_s=30, kill_grace_s=0.3
    )
    assert r.state == "succeeded"
    [bg] = pids(pidfile)
    assert not alive(bg)


def test_output_cap_keeps_the_real_head_and_tail(tmp_path: Path) -> None:
    data = b"".join(b"%09d\n" % i for i in range(2_000_000))  # 20 MB, every line distinct
    assert len(data) == 20_000_000
    big = tmp_path / "big"
    big.write_bytes(data)
    cap = 64 * 1024
    r = runner.run(f"cat {big}; echo e1 >&2", timeout_s=60, output_cap=cap)
    assert r.state == "succeeded"
    assert r.stdout_bytes == len(data)
    assert r.truncated is True
    assert r.stdout.startswith(data[:cap].decode() + "\n[... opsbay: ")
    assert r.stdout.endswith(" bytes omitted ...]\n" + data[-cap:].decode())
    dropped = len(data) - 2 * cap
    assert r.stdout == data[:cap].decode() + f"\n[... opsbay: {dropped} bytes omitted ...]\n" + (
        data[-cap:].decode()
    )
    assert len(r.stdout.encode()) <= 2 * cap + 100
    assert (r.stderr, r.stderr_bytes) == ("e1\n", 3)


def test_output_within_twice_the_cap_is_kept_whole() -> None:
    r = runner.run("printf 0123456789; printf abcdefghij >&2", timeout_s=30, output_cap=5)
    assert (r.stdout, r.stderr) == ("0123456789", "abcdefghij")
    assert r.truncated is False


def test_truncation_of_stderr_alone_is_reported() -> None:
    r = runner.run("printf ok; printf 0123456789x >&2", timeout_s=30, output_cap=5)
    assert r.stdout == "ok"
    assert r.stderr == "01234\n[... opsbay: 1 bytes omitted ...]\n6789x"
    assert (r.stderr_bytes, r.truncated) == (11, True)


M = "\n[... opsbay: {} bytes omitted ...]\n"


@pytest.mark.parametrize(
    ("cap", "writes", "text", "truncated"),
    [
        (4, [], "", False),
        (4, [b""], "", False),
        (4, [b"ab"], "ab", False),
        (4, [b"abcd"], "abcd", False),
        (4, [b"abcde"], "abcde", False),
        (4, [b"abcdefgh"], "abcdefgh", False),
        (4, [b"abcd", b"efgh"], "abcdefgh", False),
        (4, [b"abcdefghi"], "abcd" + M.format(1) + "fghi", True),
        (4, [b"abc", b"defgh", b"ij"], "abcd" + M.format(2) + "ghij", True),
        (4, [bytes([c]) for c in b"abcdefghijkl"], "abcd" + M.format(4) + "ijkl", True),
        (4, [b"abcdefghijklmnop", b"q"], "abcd" + M.format(9) + "nopq", True),
        (4, [b"ab", b"cdefghijklmnop", b"", b"qr"], "abcd" + M.format(10) + "opqr", True),
        (4, [b"abcd", b"e", b"fghijklmnopqrstuvwxyz"], "abcd" + M.format(18) + "wxyz", True),
        (1, [b"abc"], "a" + M.format(1) + "c", True),
        (8, [b"abc"] * 3, "abcabcabc", False),
        (3, [b"\xc3\xa9\xc3\xa9"], "\u00e9\u00e9", False),  # split across head and tail
    ],
)
def test_head_tail(cap: int, writes: list[bytes], text: str, truncated: bool) -> None:
    buf = HeadTail(cap)
    for w in writes:
        buf.write(w)
    everything = b"".join(writes)
    assert buf.total == len(everything)
    assert buf.truncated is truncated
    assert buf.text() == text
    assert bytes(buf.head) == everything[:cap]
    assert b"".join(buf.tail)[-cap:] == (everything[cap:][-cap:] if len(everything) > cap else b"")


def test_head_tail_keeps_its_memory_bounded() -> None:
    buf = HeadTail(100)
    for _ in range(10_000):
        buf.write(b"x" * 37)
    assert buf.total == 370_000
    assert len(buf.head) == 100
    assert buf.tail_len < 100 + 37
    assert buf.text().startswith("x" * 100 + M.format(370_000 - 200))


def test_on_start_gets_the_shell_pid() -> None:
    seen: list[int] = []
    r = runner.run("echo $$", timeout_s=30, on_start=seen.append)
    assert seen == [int(r.stdout)]


# -- what a restarted worker does with the process group of a job it lost


@pytest.fixture
def groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def start_group(groups: list[subprocess.Popen[bytes]], command: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, start_new_session=True)
    groups.append(p)
    return p


def test_kill_leftover_group_of_our_process(groups: list[subprocess.Popen[bytes]]) -> None:
    p = start_group(groups, "sleep 30 & echo $!; sleep 30")
    assert p.stdout is not None
    bg = int(p.stdout.readline())
    assert runner.kill_leftover_group(p.pid, psutil.Process(p.pid).create_time()) is True
    assert p.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: not alive(bg), 5, f"background process {bg} to end")
    wait_until(lambda: group_members(p.pid) == [], 5, "the whole group to end")


def test_kill_leftover_group_spares_a_reused_pid(groups: list[subprocess.Popen[bytes]]) -> None:
    p = start_group(groups, "echo up; sleep 30")
    assert p.stdout is not None
    p.stdout.readline()
    started_at = psutil.Process(p.pid).create_time()
    assert runner.kill_leftover_group(p.pid, started_at - 60) is False
    assert runner.kill_leftover_group(p.pid, started_at + 60) is False
    assert alive(p.pid)
    assert p.poll() is None


def test_kill_leftover_group_whose_leader_is_gone(groups: list[subprocess.Popen[bytes]]) -> None:
    p = start_group(groups, "sleep 30 & echo $!")
    assert p.stdout is not None
    bg = int(p.stdout.readline())
    assert p.wait(timeout=10) == 0
    assert group_members(p.pid) == [bg]
    assert runner.kill_leftover_group(p.pid, 0.0) is True
    wait_until(lambda: not alive(bg), 5, f"background process {bg} to end")


def test_kill_leftover_group_with_nothing_left(groups: list[subprocess.Popen[bytes]]) -> None:
    p = start_group(groups, "true")
    assert p.wait(timeout=10) == 0
    assert runner.kill_leftover_group(p.pid, 0.0) is False
