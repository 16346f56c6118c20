"""runner: exit codes, separate streams, timeouts that end the whole process group, output caps,
leftovers, cancels; one thread and no leaked descriptors per job, with or without a pidfd;
HeadTail on its own."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
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


TIMED_OUT = "timed out after 1.5 s; process group killed"


@pytest.mark.parametrize(
    ("returncode", "timed_out_after", "cancelled", "expected"),
    [
        (0, None, None, ("succeeded", 0, None)),
        (3, None, None, ("failed", 3, None)),
        (-9, None, None, ("failed", 137, "killed by signal 9")),
        (-15, 1.5, None, ("timed_out", 143, TIMED_OUT)),
        (0, 1.5, None, ("timed_out", 0, TIMED_OUT)),  # it ended on the TERM with 0: too late
        (None, 1.5, None, ("timed_out", None, TIMED_OUT)),  # not even KILL ended the shell
        (-15, None, "cancelled by alice", ("cancelled", 143, "cancelled by alice")),
        (0, None, "cancelled by alice", ("succeeded", 0, None)),  # finished as the cancel came
        (1, None, "cancelled by alice", ("cancelled", 1, "cancelled by alice")),
        (-15, 1.5, "cancelled by alice", ("timed_out", 143, TIMED_OUT)),  # the timeout first
    ],
)
def test_outcome(
    returncode: int | None,
    timed_out_after: float | None,
    cancelled: str | None,
    expected: tuple[str, int | None, str | None],
) -> None:
    got = runner.outcome(returncode, timed_out_after=timed_out_after, cancelled=cancelled)
    assert got == expected


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


def test_what_a_background_process_writes_as_it_is_ended_is_kept() -> None:
    r = runner.run(
        "(trap 'echo bye; exit 0' TERM; sleep 100 & wait) & echo bg", timeout_s=30, kill_grace_s=5
    )
    assert (r.state, r.exit_code, r.stdout) == ("succeeded", 0, "bg\nbye\n")


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


def test_on_output_sees_each_chunk_as_it_is_read() -> None:
    seen: list[tuple[str, bytes]] = []
    r = runner.run(
        "printf a; printf b >&2; printf c", timeout_s=30, on_output=lambda n, c: seen.append((n, c))
    )
    assert b"".join(c for n, c in seen if n == "stdout") == b"ac"
    assert b"".join(c for n, c in seen if n == "stderr") == b"b"
    assert (r.stdout, r.stderr) == ("ac", "b")


def test_a_failing_output_sink_does_not_stop_the_job(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def sink(name: str, chunk: bytes) -> None:
        calls.append(name)
        raise RuntimeError("sink broke")

    with caplog.at_level(logging.ERROR, logger="opsbay_mqtt.runner"):
        r = runner.run("echo one; echo two >&2; echo three", timeout_s=30, on_output=sink)
    assert (r.state, r.stdout, r.stderr) == ("succeeded", "one\nthree\n", "two\n")
    assert len(calls) == 1  # not called again once it failed
    assert "live output sink failed" in caplog.text


# -- one thread, one selector: no thread of its own, no descriptor left open, with or without pidfd


def test_a_job_runs_in_the_calling_thread_and_starts_no_thread() -> None:
    before = set(threading.enumerate())
    me = threading.current_thread()
    during: list[tuple[threading.Thread, set[threading.Thread]]] = []

    def look(*_: object) -> None:
        during.append((threading.current_thread(), set(threading.enumerate())))

    r = runner.run("echo out; echo err >&2", timeout_s=30, on_start=look, on_output=look)
    assert (r.stdout, r.stderr) == ("out\n", "err\n")
    assert len(during) == 3  # on_start, then a chunk of each stream
    for thread, threads in during:
        assert thread is me
        assert threads <= before
    assert set(threading.enumerate()) <= before


def test_a_quick_job_does_not_look_for_leftovers_process_by_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The common case, a group already gone, costs one killpg(pgid, 0), not a process scan."""

    def scan(*_: object, **__: object) -> list[psutil.Process]:
        raise AssertionError("psutil.process_iter called")

    monkeypatch.setattr(runner.psutil, "process_iter", scan)
    for command in ("true", "echo out; echo err >&2; exit 3"):
        r = runner.run(command, timeout_s=30)
        assert r.state in ("succeeded", "failed")


def open_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def test_no_descriptor_is_left_open_after_many_runs(pidfile: Path) -> None:
    runner.run("true", timeout_s=30)  # anything opened once for good (imports) is opened now
    before = open_fds()
    for i in range(50):
        command = ["true", "echo out; echo err >&2", "exit 3", "kill -9 $$", "sleep 30 & echo $!"]
        r = runner.run(command[i % len(command)], timeout_s=30, kill_grace_s=5)
        assert r.state in ("succeeded", "failed")
    r = runner.run(f"echo $$ > {pidfile}; sleep 30", timeout_s=0.2, kill_grace_s=5)
    assert r.state == "timed_out"
    assert open_fds() == before


def test_a_failing_on_start_ends_the_command_and_closes_everything(pidfile: Path) -> None:
    runner.run("true", timeout_s=30)
    before = open_fds()

    def on_start(pid: int) -> None:
        wait_until(lambda: pidfile.exists() and pids(pidfile), 10, "the background pid")
        raise RuntimeError("could not record the pid")

    with pytest.raises(RuntimeError, match="could not record the pid"):
        runner.run(f"sleep 30 & echo $! > {pidfile}; wait", timeout_s=30, on_start=on_start)
    [bg] = pids(pidfile)
    wait_until(lambda: not alive(bg), 5, f"background process {bg} to end")
    assert open_fds() == before


@pytest.fixture(params=["missing", "failing"])
def no_pidfd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.pidfd_open missing (before Python 3.9) or failing (before Linux 5.3, or seccomp): the
    runner polls for the exit instead. Returns the pids it was asked for."""
    asked: list[int] = []
    if request.param == "missing":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    else:

        def fail(pid: int, flags: int = 0) -> int:
            asked.append(pid)
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", fail, raising=False)
    return asked


def test_without_a_pidfd_results_are_the_same(no_pidfd: list[int]) -> None:
    before = set(threading.enumerate())
    for command, state, code in [("true", "succeeded", 0), ("exit 3", "failed", 3)]:
        r = runner.run(command, timeout_s=30)
        assert (r.state, r.exit_code, r.reason) == (state, code, None)
    r = runner.run("echo out; echo err >&2; printf more", timeout_s=30)
    assert (r.stdout, r.stderr, r.stdout_bytes, r.stderr_bytes) == ("out\nmore", "err\n", 8, 4)
    r = runner.run("echo before; kill -9 $$; echo after", timeout_s=30)
    assert (r.exit_code, r.reason, r.stdout) == (137, "killed by signal 9", "before\n")
    r = runner.run("head -c 1000000 /dev/zero; printf e >&2", timeout_s=30, output_cap=10)
    assert (r.stdout_bytes, r.truncated, r.stderr) == (1_000_000, True, "e")
    assert set(threading.enumerate()) <= before
    assert len(no_pidfd) == (5 if hasattr(os, "pidfd_open") else 0)  # "failing": tried each time


def test_without_a_pidfd_a_timeout_ends_the_process_group(
    no_pidfd: list[int], pidfile: Path
) -> None:
    r = runner.run(
        f"echo $$ > {pidfile}; echo started; sleep 30 & echo $! >> {pidfile}; wait",
        timeout_s=1,
        kill_grace_s=5,
    )
    assert (r.state, r.exit_code, r.stdout) == ("timed_out", 128 + signal.SIGTERM, "started\n")
    assert r.reason == "timed out after 1 s; process group killed"
    shell, bg = pids(pidfile)
    assert not alive(bg)
    assert group_members(shell) == []


def test_without_a_pidfd_no_descriptor_is_left_open(no_pidfd: list[int]) -> None:
    runner.run("true", timeout_s=30)
    before = open_fds()
    for _ in range(20):
        runner.run("echo out; echo err >&2", timeout_s=30)
    assert open_fds() == before


# -- cancel from another thread


def cancel_on(control: runner.RunControl, marker: bytes, why: str) -> Callable[[str, bytes], None]:
    """An output sink that has another thread cancel the run once `marker` shows in its output."""

    def sink(name: str, chunk: bytes) -> None:
        if marker in chunk:
            threading.Thread(target=control.cancel, args=(why,)).start()

    return sink


@pytest.mark.parametrize("pidfd", ["pidfd", "no pidfd"])
def test_a_cancel_from_another_thread_ends_the_job(
    pidfd: str, pidfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pidfd == "no pidfd":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    control = runner.RunControl()
    r = runner.run(
        f"echo $$ > {pidfile}; sleep 30 & echo $! >> {pidfile}; echo ready; wait",
        timeout_s=60,
        control=control,
        on_output=cancel_on(control, b"ready", "cancelled by the test"),
    )
    assert (r.state, r.reason) == ("cancelled", "cancelled by the test")
    assert r.exit_code == 128 + signal.SIGTERM
    shell, bg = pids(pidfile)
    assert not alive(bg)
    assert group_members(shell) == []


def test_a_cancel_of_a_term_ignoring_command_kills_it_after_the_grace(pidfile: Path) -> None:
    control = runner.RunControl()
    r = runner.run(
        f"trap '' TERM; echo $$ > {pidfile}; echo ready; sleep 30",
        timeout_s=60,
        kill_grace_s=0.3,
        control=control,
        on_output=cancel_on(control, b"ready", "stop"),
    )
    assert (r.state, r.reason, r.exit_code) == ("cancelled", "stop", 128 + signal.SIGKILL)
    [shell] = pids(pidfile)
    wait_until(lambda: group_members(shell) == [], 5, f"process group {shell} to end")


def test_a_cancel_before_the_start_ends_the_job_when_it_starts() -> None:
    control = runner.RunControl()
    control.cancel("too late")
    r = runner.run("sleep 30", timeout_s=60, control=control)
    assert (r.state, r.reason, r.exit_code) == ("cancelled", "too late", 128 + signal.SIGTERM)


def test_a_cancel_does_not_undo_a_success() -> None:
    control = runner.RunControl()
    r = runner.run(
        "trap 'echo bye; exit 0' TERM; sleep 30 & echo ready; wait",
        timeout_s=60,
        control=control,
        on_output=cancel_on(control, b"ready", "stop"),
    )
    assert (r.state, r.exit_code, r.reason, r.stdout) == ("succeeded", 0, None, "ready\nbye\n")
    assert control.cancelled == "stop"


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
