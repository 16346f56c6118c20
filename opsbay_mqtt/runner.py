"""Run one shell command in its own process group, with a timeout and capped output."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import selectors
import signal
import subprocess
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

import psutil

from opsbay_mqtt.protocol import Outcome
from opsbay_mqtt.states import ExecState

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_CAP = 64 * 1024  # per stream: this much from the head and this much from the tail
DEFAULT_KILL_GRACE_S = 5.0
_READ_SIZE = 64 * 1024
_SETTLE_S = 0.2  # after the shell exits: for its output to end, before and after its group ends
_KILLED_EXIT_S = 10.0  # for a KILLed shell to exit (one in uninterruptible sleep may not)
_NAP_MIN_S, _NAP_MAX_S = 0.0005, 0.05  # polling for the exit where there is no pidfd
_SELECT_MAX_S = 3600.0  # epoll cannot wait for the longest timeouts in one call


class HeadTail:
    """Keeps the first `cap` and the last `cap` bytes written, and counts them all."""

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_len = 0
        self.total = 0

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= self.cap:
            self.tail_len -= len(self.tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + min(self.tail_len, self.cap)

    def text(self) -> str:
        tail = b"".join(self.tail)[-self.cap :] if self.tail else b""
        if not self.truncated:
            return (bytes(self.head) + tail).decode("utf-8", errors="replace")
        dropped = self.total - len(self.head) - len(tail)
        marker = f"\n[... opsbay: {dropped} bytes omitted ...]\n"
        return (
            bytes(self.head).decode("utf-8", errors="replace")
            + marker
            + tail.decode("utf-8", errors="replace")
        )


OutputSink = Callable[[str, bytes], None]


class _Watch:
    """The command's two pipes and its exit, watched by one selector in the calling thread: no
    thread per job. The exit is a pidfd, readable once the shell has exited; where there is none
    (no os.pidfd_open, or it failed) the shell is polled between short selects. The caller owns
    the pipes and closes them."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        streams: dict[str, HeadTail],
        sink: OutputSink | None,
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.sink = proc, sink
        self.pidfd = -1
        self.reading = 0
        self._nap = _NAP_MIN_S
        self.sel = selectors.DefaultSelector()
        try:
            pidfd_open = getattr(os, "pidfd_open", None)
            if pidfd_open is not None:
                with contextlib.suppress(OSError):
                    self.pidfd = pidfd_open(proc.pid)
            if self.pidfd >= 0:
                self.sel.register(self.pidfd, selectors.EVENT_READ, None)
            for name, f in (("stdout", proc.stdout), ("stderr", proc.stderr)):
                os.set_blocking(f.fileno(), False)
                self.sel.register(f, selectors.EVENT_READ, (name, streams[name]))
                self.reading += 1
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sel.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _step(self, timeout: float) -> None:
        """Wait up to `timeout` for output or the exit; read one chunk from each ready pipe, and
        reap the shell once it has exited."""
        polling = self.pidfd < 0
        for key, _ in self.sel.select(min(timeout, self._nap if polling else _SELECT_MAX_S)):
            if key.data is None:
                if self.proc.poll() is not None:  # None only while another thread polls it
                    self.sel.unregister(key.fd)
            else:
                self._read(key.fd, *key.data)
        if polling and self.proc.poll() is None:
            self._nap = min(2 * self._nap, _NAP_MAX_S)

    def _read(self, fd: int, name: str, buf: HeadTail) -> None:
        try:
            chunk = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            self.sel.unregister(fd)
            self.reading -= 1
            self._nap = _NAP_MIN_S  # the pipes end as the shell exits: look again soon
            return
        buf.write(chunk)
        if self.sink is not None:
            try:
                self.sink(name, chunk)
            except Exception:
                log.exception("the live output sink failed; the output is still captured")
                self.sink = None

    def _until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Read output until `done()` or `timeout` passes; whether it is done."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._step(left)
        return True

    def wait(self, timeout: float) -> bool:
        """Read output until the shell exits or `timeout` passes; whether it exited."""
        exited = self._until(lambda: self.proc.returncode is not None, timeout)
        return exited or self.proc.poll() is not None

    def drain(self, timeout: float) -> bool:
        """Read until both pipes are at their end or `timeout` passes; whether they are."""
        return self._until(lambda: not self.reading, timeout)

    def pause(self, seconds: float) -> None:
        """Wait `seconds`, reading what comes meanwhile."""
        self._until(lambda: False, seconds)


class RunControl:
    """Lets another thread cancel a running command: TERM to its process group, KILL after the
    grace. A cancel that arrives before the command starts takes effect when it does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: set[psutil.Process] = set()
        self._grace_s = DEFAULT_KILL_GRACE_S
        self.cancelled: str | None = None  # why, once cancelled

    def attach(
        self, proc: subprocess.Popen[bytes], known: set[psutil.Process], grace_s: float
    ) -> None:
        with self._lock:
            self._proc, self._known, self._grace_s = proc, known, grace_s
            if self.cancelled is not None:
                self._terminate()

    def cancel(self, why: str) -> None:
        with self._lock:
            if self.cancelled is None:
                self.cancelled = why
                if self._proc is not None:
                    self._terminate()

    def _terminate(self) -> None:
        proc, known = self._proc, self._known
        assert proc is not None
        _kill_tree(proc, signal.SIGTERM, known)

        def kill() -> None:
            if proc.poll() is None:
                _kill_tree(proc, signal.SIGKILL, known)

        timer = threading.Timer(self._grace_s, kill)
        timer.daemon = True
        timer.start()


def _holding_run_id(run_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries this run's id: descendants that left the
    process group (setsid) but still hold the job's pipes."""
    marker = {"OPSBAY_RUN_ID": run_id}
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            if env.get("OPSBAY_RUN_ID") == marker["OPSBAY_RUN_ID"]:
                found.append(p)
    return found


def _kill_tree(proc: subprocess.Popen[bytes], sig: int, known: set[psutil.Process]) -> None:
    """Signal the command's process group, and every descendant seen while the shell was alive
    (some may have left the group with setsid)."""
    if proc.poll() is None:  # only while alive: a reaped pid may already belong to someone else
        with contextlib.suppress(psutil.Error):
            known.update(psutil.Process(proc.pid).children(recursive=True))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    for p in list(known):
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.send_signal(sig)


def _group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in the group."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


def _alive(p: psutil.Process) -> bool:
    """Whether `p` still runs: a zombie does not, nor a new process that got its pid."""
    try:
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _wait_gone(
    procs: set[psutil.Process], deadline: float, pause: Callable[[float], object]
) -> bool:
    """Wait until none of `procs` runs, or until `deadline`; whether none does. They may close
    the job's pipes a moment before they are gone, and are not our children: this polls."""
    while any(_alive(p) for p in procs):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pause(min(0.005, left))
    return True


def kill_leftover_group(pgid: int, started_at: float) -> bool:
    """Kill what is left of a job's process group after the worker that ran it died.

    The group is only touched when its leader is the very process we started (same pid and
    start time), or when the leader is gone but the group lives on (a pid cannot become a new
    group id while the old group still exists). Returns whether anything was signalled."""
    try:
        leader = psutil.Process(pgid)
        if abs(leader.create_time() - started_at) > 1.0:
            return False  # the pid was reused by an unrelated process
    except psutil.NoSuchProcess:
        pass
    except psutil.Error:
        return False
    if not _group_alive(pgid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def _end_leftovers(
    proc: subprocess.Popen[bytes],
    known: set[psutil.Process],
    grace_s: float,
    pause: Callable[[float], object] = time.sleep,
) -> None:
    """TERM what the command left running in its group, and the descendants seen that left it;
    KILL them after `grace_s`. `pause` waits between looks (run() keeps reading the pipes)."""
    if not _group_alive(proc.pid) and not any(p.is_running() for p in known):
        return
    _kill_tree(proc, signal.SIGTERM, known)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (  # a group has no wait primitive
        _group_alive(proc.pid) or any(_alive(p) for p in known)
    ):
        pause(max(0.0, min(0.02, deadline - time.monotonic())))
    _kill_tree(proc, signal.SIGKILL, known)


def run(
    command: str,
    *,
    timeout_s: float,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    kill_grace_s: float = DEFAULT_KILL_GRACE_S,
    clock: Callable[[], float] = time.time,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    on_start: Callable[[int], None] | None = None,
    user: str | None = None,
    control: RunControl | None = None,
    on_output: OutputSink | None = None,
) -> Outcome:
    """Run `command` with /bin/sh in a new session; on timeout TERM, then KILL, the whole tree.

    When the shell exits, anything it left behind in its process group is terminated too, so a
    job never leaves processes running on the node after its result is reported; so is anything
    that left the group (setsid) but still holds the job's output pipes, found by the
    OPSBAY_RUN_ID in its environment. A command that detaches completely on purpose (its own
    session and its output redirected, as a daemon does) is left alone.

    Output is read in the calling thread, which calls `on_output` with each chunk as it is read;
    a sink that raises is logged and not called again, and the output is still captured.
    """
    out, err = HeadTail(output_cap), HeadTail(output_cap)
    run_id = uuid.uuid4().hex
    env = {**(os.environ if env is None else env), "OPSBAY_RUN_ID": run_id}
    started = clock()
    t0 = time.monotonic()
    proc = _spawn(command, env, cwd, user)
    known: set[psutil.Process] = set()  # its descendants, seen while the shell was alive
    watch: _Watch | None = None
    try:
        watch = _Watch(proc, {"stdout": out, "stderr": err}, on_output)
        if on_start is not None:
            on_start(proc.pid)
        if control is not None:
            control.attach(proc, known, kill_grace_s)
        in_time = _wait_or_kill(proc, watch, known, timeout_s, kill_grace_s)
        finished = clock()
        duration_ms = int((time.monotonic() - t0) * 1000)
        _reap_leftovers(proc, watch, known, run_id, kill_grace_s)
    except BaseException:
        _kill_unaccounted(proc, known)
        raise
    finally:
        if watch is not None:
            watch.close()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    state, code, reason = outcome(
        proc.returncode,
        timed_out_after=None if in_time else timeout_s,
        cancelled=None if control is None else control.cancelled,
    )
    return Outcome(
        state=state,
        exit_code=code,
        stdout=out.text(),
        stderr=err.text(),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        truncated=out.truncated or err.truncated,
        started_ms=int(started * 1000),
        finished_ms=int(finished * 1000),
        duration_ms=duration_ms,
        reason=reason,
    )


def _spawn(
    command: str, env: dict[str, str], cwd: str | None, user: str | None
) -> subprocess.Popen[bytes]:
    """The shell, in a new session (so a process group of its own), reading nothing, writing to
    two pipes; as `user`, with that user's group and no others, when given."""
    return subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env=env,
        cwd=cwd,
        user=user,
        group=pwd.getpwnam(user).pw_gid if user else None,
        extra_groups=[] if user else None,
    )


def _wait_or_kill(
    proc: subprocess.Popen[bytes],
    watch: _Watch,
    known: set[psutil.Process],
    timeout_s: float,
    grace_s: float,
) -> bool:
    """Read output until the shell exits or `timeout_s` passes; then TERM the whole tree, and
    KILL it after `grace_s`. Whether the shell exited in time."""
    if watch.wait(timeout_s):
        return True
    _kill_tree(proc, signal.SIGTERM, known)
    if not watch.wait(grace_s):
        _kill_tree(proc, signal.SIGKILL, known)
        watch.wait(_KILLED_EXIT_S)
    return False


def _reap_leftovers(
    proc: subprocess.Popen[bytes],
    watch: _Watch,
    known: set[psutil.Process],
    run_id: str,
    grace_s: float,
) -> None:
    """End what the shell left behind, reading the pipes meanwhile: leftovers (background jobs)
    would hold the pipes open or outlive the job. First its process group and the descendants
    seen; then, if the pipes are still held open, whatever left the group with setsid."""
    watch.drain(_SETTLE_S)
    _end_leftovers(proc, known, grace_s, watch.pause)
    if not watch.drain(_SETTLE_S):
        _end_escaped(run_id, watch, grace_s)


def _end_escaped(run_id: str, watch: _Watch, grace_s: float) -> None:
    """TERM, then KILL, the processes holding the pipes that left the group: found by the run id
    in their environment."""
    escaped = set(_holding_run_id(run_id))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in escaped:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        deadline = time.monotonic() + grace_s
        if watch.drain(grace_s) and _wait_gone(escaped, deadline, watch.pause):
            break


def _kill_unaccounted(proc: subprocess.Popen[bytes], known: set[psutil.Process]) -> None:
    """run() failed, so no result will account for the command: KILL it if it still runs."""
    if proc.poll() is None:
        _kill_tree(proc, signal.SIGKILL, known)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_SETTLE_S)


def outcome(
    returncode: int | None, *, timed_out_after: float | None, cancelled: str | None
) -> tuple[ExecState, int | None, str | None]:
    """What became of the command, as (state, exit code, reason), from its shell's return code
    (negative: killed by that signal), the timeout it was killed after (None: it exited in
    time) and why it was cancelled, if it was (pure).

    A signal's death is reported as a shell would, 128 + its number. A cancel that came as the
    command finished on its own does not undo a success."""
    code, reason = returncode, None
    state: ExecState | None = None
    if timed_out_after is not None:
        state = "timed_out"
        reason = f"timed out after {timed_out_after:g} s; process group killed"
    if code is not None and code < 0:
        reason = reason or f"killed by signal {-code}"
        code = 128 - code
    if state is None and cancelled is not None and code != 0:
        state, reason = "cancelled", cancelled
    if state is None:
        state = "succeeded" if code == 0 else "failed"
    return state, code, reason
