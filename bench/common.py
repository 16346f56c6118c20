"""What every figure shares: statistics, table rows, child processes that are always stopped,
one private bus (Mosquitto on a free loopback port, a topic prefix, a secret, directories)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics
from tests.harness import HOST as HOST
from tests.harness import start_broker, stop_process
from tests.harness import wait_until as wait_until

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OPSBAY = BIN / "opsbay"

T = TypeVar("T")


class BenchError(Exception):
    """A figure could not be measured (a process did not start, a deadline passed)."""


# -- statistics
@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p99: float
    lo: float
    hi: float
    q1: float
    q3: float


def summarize(samples: list[float]) -> Summary:
    if not samples:
        raise BenchError("no samples")
    xs = sorted(samples)
    if len(xs) == 1:
        x = xs[0]
        return Summary(1, x, x, x, x, x, x)
    cuts = statistics.quantiles(xs, n=100, method="inclusive")
    return Summary(len(xs), statistics.median(xs), cuts[98], xs[0], xs[-1], cuts[24], cuts[74])


def chunk_rates(times: list[float], start: float, chunks: int = 10) -> list[float]:
    """Completions per second in consecutive equal-count chunks of sorted completion times."""
    ts = sorted(times)
    if len(ts) < chunks * 2:
        chunks = max(1, len(ts) // 2)
    size = len(ts) // chunks
    rates, prev = [], start
    for i in range(chunks):
        end = ts[(i + 1) * size - 1]
        if end > prev:
            rates.append(size / (end - prev))
        prev = end
    return rates


# -- formatting
def ms(x_s: float) -> str:
    x = x_s * 1000
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"


def sec(x_s: float) -> str:
    return f"{x_s:.3f} s"


def per_s(x: float) -> str:
    return f"{x:,.0f}/s"


def mb(x_bytes: float) -> str:
    return f"{x_bytes / 1e6:.1f} MB"


def ratio(x: float, base: float) -> str:
    return f"{x / base:.2f}x" if base > 0 else "—"


def iqr(s: Summary, unit: Callable[[float], str]) -> str:
    return f"IQR {unit(s.q1)}-{unit(s.q3)}, max {unit(s.hi)}"


def tenths(rates: list[float]) -> str:
    s = summarize(rates)
    return f"per tenth: min {per_s(s.lo)}, median {per_s(s.p50)}, max {per_s(s.hi)}"


@dataclass(frozen=True)
class Row:
    """One line of the table. `met` is None where the figure has no target."""

    figure: str
    what: str
    value: str
    spread: str = ""
    baseline: str = "—"
    ratio: str = "—"
    target: str = "—"
    met: bool | None = None


# -- child processes, always stopped
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the suite dies, even by SIGKILL."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the suite already died between fork and prctl
        os._exit(1)


@dataclass
class Procs:
    """Children started by the suite, each in its own session, each told to die with the suite;
    `stop_all` (called on every exit path) stops them newest first."""

    logs: Path
    children: list[subprocess.Popen[Any]] = field(default_factory=list)
    profiled: set[int] = field(default_factory=set)  # py-spy: stopped with SIGINT

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        stdout_pipe: bool = False,
        cwd: Path | None = None,
    ) -> subprocess.Popen[Any]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            p = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log if stdout_pipe else subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only prctl, before exec
            )
        finally:
            log.close()
        self.children.append(p)
        return p

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        # py-spy writes its profile on SIGINT.
        sig = signal.SIGINT if proc.pid in self.profiled else signal.SIGTERM
        stop_process(proc, 15 if sig == signal.SIGINT else 5, sig)
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        while self.children:
            p = self.children[-1]
            with contextlib.suppress(Exception):
                self.stop(p)
            if p in self.children:
                self.children.remove(p)


# -- the suite
@dataclass
class Suite:
    quick: bool
    workdir: Path
    procs: Procs
    verbose: bool = True
    profile_dir: Path | None = None

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    def pick(self, full: T, quick: T) -> T:
        return quick if self.quick else full


def spawn_true(timeout: float | None = None) -> None:
    """Spawn `sh -c true` and reap it as the worker's runner does (pipes, a new session, no
    inherited descriptors), nothing more: the baseline of what running a job costs."""
    subprocess.Popen(
        ["/bin/sh", "-c", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    ).communicate(timeout=timeout)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def peak_rss(pid: int) -> int:
    """VmHWM: the largest resident set the process has had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return rss(pid)


class CpuMeter:
    """CPU seconds used by some processes between `start()` and `stop()` (user + system; with
    the children they reaped, e.g. a worker's `sh`)."""

    def __init__(self, procs: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in procs.items()}
        self.before: dict[str, tuple[float, float]] = {}
        self.used: dict[str, tuple[float, float]] = {}

    @staticmethod
    def _read(p: psutil.Process) -> tuple[float, float]:
        t = p.cpu_times()
        return t.user + t.system, t.children_user + t.children_system

    def start(self) -> None:
        self.before = {n: self._read(p) for n, p in self.procs.items()}
        self.before["bench"] = (time.process_time(), 0.0)

    def stop(self) -> None:
        now = {n: self._read(p) for n, p in self.procs.items()}
        now["bench"] = (time.process_time(), 0.0)
        self.used = {
            n: (now[n][0] - b[0], now[n][1] - b[1]) for n, b in self.before.items() if n in now
        }


def paho_thread(
    name: str,
    port: int,
    subscribe: list[tuple[str, int]],
    inbox: queue.Queue[Any] | None = None,
    v311: bool = False,
) -> mqtt.Client:
    """A paho client (MQTT 5, or 3.1.1 with `v311`; TCP_NODELAY as the package's transport sets
    it) with its network thread, once subscribed (or connected); messages go to `inbox` as
    (arrival time, payload)."""
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-{name}-{secrets.token_hex(4)}",
        protocol=MQTTProtocolVersion.MQTTv311 if v311 else MQTTProtocolVersion.MQTTv5,
    )
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.on_socket_open = lambda cl, u, sock: sock.setsockopt(*nodelay)  # type: ignore[attr-defined]
    ready = threading.Event()
    if inbox is not None:
        c.on_message = lambda cl, u, m: inbox.put((time.perf_counter(), bytes(m.payload)))
    if subscribe:
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(subscribe)
        c.on_subscribe = lambda cl, u, mid, rcs, p: ready.set()
    else:
        c.on_connect = lambda cl, u, f, rc, p: ready.set()
    c.connect(HOST, port)
    c.loop_start()
    if not ready.wait(10):
        c.loop_stop()
        raise BenchError(f"{name}: no CONNACK or SUBACK")
    return c


def close_paho(c: mqtt.Client) -> None:
    c.disconnect()
    c.loop_stop()


# -- one private bus
@dataclass
class Bus:
    suite: Suite
    name: str
    directory: Path
    port: int
    broker: subprocess.Popen[Any]
    prefix: str = field(default_factory=lambda: f"b{secrets.token_hex(4)}")
    secret: str = field(default_factory=lambda: secrets.token_hex(32))
    started: list[subprocess.Popen[Any]] = field(default_factory=list)
    # A NATS cluster's MQTT ports (MQTT 3.1.1), when the bus is one; `port` is the first.
    ports: list[int] = field(default_factory=list)

    @property
    def v311(self) -> bool:
        return bool(self.ports)

    @property
    def url(self) -> str:
        if self.ports:
            return ",".join(f"mqtt://{HOST}:{p}?version=3.1.1" for p in self.ports)
        return f"mqtt://{HOST}:{self.port}"

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def keyring(self) -> Keyring:
        return Keyring.shared(self.secret)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSBAY_")}
        env.update(
            OPSBAY_BROKER=self.url,
            OPSBAY_SECRET=self.secret,
            OPSBAY_PREFIX=self.prefix,
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(
        self, name: str, argv: list[str], *, piped: bool = False, **env: str
    ) -> subprocess.Popen[Any]:
        """A child with the bus's environment (plus `env`), stopped with the bus. `piped`: its
        standard input and output are pipes (read them with `Lines`)."""
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        full = {**self.env(), "PYTHONPATH": os.pathsep.join([*path, str(REPO)]), **env}
        p = self.suite.procs.start(f"{self.name}-{name}", argv, full, stdout_pipe=piped)
        self.started.append(p)
        return p

    def _wait_log(self, name: str, proc: subprocess.Popen[Any], text: str) -> None:
        path = self.suite.procs.logs / f"{self.name}-{name}.log"

        def ready() -> bool:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}; see {path}")
            return path.exists() and text in path.read_text(errors="replace")

        wait_until(ready, 30, f"{text!r} in {path}", every=0.02)

    def daemon(self, name: str, argv: list[str], ready: str) -> subprocess.Popen[Any]:
        """Start an opsbay daemon and wait for its ready line; with --profile, py-spy then
        samples it until it stops."""
        p = self.start(name, argv)
        self._wait_log(name, p, ready)
        prof = self.suite.profile_dir
        if prof is not None:
            from bench.profiling import attach

            spy = self.start(f"{name}-py-spy", attach(p.pid, prof / f"{self.name}-{name}.raw"))
            self.suite.procs.profiled.add(spy.pid)
        return p

    def coordinator(self, *args: str) -> subprocess.Popen[Any]:
        data = self.directory / "coordinator"
        argv = [str(OPSBAY), "coordinator", "--data-dir", str(data), *args]
        return self.daemon("coordinator", argv, "coordinator: ready")

    def worker(self, node: str, *args: str) -> subprocess.Popen[Any]:
        state = self.directory / f"worker-{node}"
        argv = [str(OPSBAY), "worker", "--node", node, "--state-dir", str(state), *args]
        return self.daemon(f"worker-{node}", argv, f"worker {node}: ready")

    def client_config(self) -> Any:
        from opsbay_mqtt.client import ClientConfig
        from opsbay_mqtt.transport import BrokerURL

        brokers = BrokerURL.parse_list(self.url)
        return ClientConfig(url=brokers, topics=self.topics, keyring=self.keyring)


@contextlib.contextmanager
def private_bus(suite: Suite, name: str) -> Iterator[Bus]:
    """A fresh Mosquitto (the shipped config, a free port, this figure's directory); on the way
    out every process started for it is stopped, the broker last."""
    directory = suite.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    started = start_broker(directory, popen=lambda argv, log: suite.procs.start(name, argv))
    broker = started.process
    bus = Bus(suite=suite, name=name, directory=directory, port=started.port, broker=broker)
    try:
        yield bus
    finally:
        for p in reversed(bus.started):
            suite.procs.stop(p)
        suite.procs.stop(broker)
        if suite.profile_dir is not None:
            from bench.profiling import summarize_raw

            for raw in sorted(suite.profile_dir.glob(f"{name}-*.raw")):
                raw.with_suffix(".txt").write_text(summarize_raw(raw))
                suite.say(f"profile: {raw.with_suffix('.txt')}")


@contextlib.contextmanager
def nats_bus(suite: Suite, name: str) -> Iterator[Bus]:
    """A fresh 3-server NATS cluster (JetStream, the MQTT gateway; tests/nats.py), as a bus whose
    processes get the list of its servers; stopped, with everything started for it, on the
    way out."""
    from tests.nats import start_nats_cluster

    directory = suite.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    cluster = start_nats_cluster(directory / "nats")
    first = cluster.servers[0]
    assert first.process is not None
    ports = [s.mqtt_port for s in cluster.servers]
    bus = Bus(
        suite=suite, name=name, directory=directory, port=ports[0], broker=first.process,
        ports=ports,
    )  # fmt: skip
    try:
        yield bus
    finally:
        for p in reversed(bus.started):
            suite.procs.stop(p)
        cluster.stop()


class Lines:
    """The lines a child prints on its standard output, read by a thread, awaited with a bound."""

    def __init__(self, proc: subprocess.Popen[Any]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("")  # end of output

    def expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no {prefix!r} line within {timeout_s:g} s") from None
            if line.startswith(prefix):
                return line
            if line == "" and self.proc.poll() is not None:
                raise BenchError(f"child exited ({self.proc.returncode}) before {prefix!r}")


def timed(argv: list[str], env: dict[str, str] | None = None, timeout_s: float = 60) -> float:
    """Wall time of one run of `argv`, which must exit 0. A run killed by a signal is run again
    (twice at most): nothing here signals it, so another process on this busy machine did (pids
    are reused quickly with pid_max 32768)."""
    for _attempt in range(3):
        t0 = time.perf_counter()
        done = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s
        )
        elapsed = time.perf_counter() - t0
        if done.returncode >= 0:
            break
        print(f"bench: {argv[0]} killed by signal {-done.returncode}; again", file=sys.stderr)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-500:]
        raise BenchError(f"{' '.join(argv[:3])}... exited {done.returncode}: {err}")
    return elapsed


def interleaved(
    commands: dict[str, list[str]], rounds: int, warm: int, env: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Run every command once per round, rotating the order; drop the warm-up rounds."""
    names = list(commands)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warm + rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t = timed(commands[name], env)
            if i >= warm:
                samples[name].append(t)
    return samples


def baseline(bus: Bus, role: str, *args: str, ready: bool = True) -> Lines:
    """A `bench.baseline` process on the bus (stopped with it), once it is subscribed."""
    argv = [sys.executable, "-m", "bench.baseline", role, str(bus.port), *args]
    lines = Lines(bus.start(f"{role}-{secrets.token_hex(2)}", argv, piped=True))
    if ready:
        lines.expect("ready", 15)
    return lines


def close_input(*lines: Lines) -> None:
    """End of input: each long-lived baseline process disconnects and exits."""
    for x in lines:
        if x.proc.stdin is not None:
            x.proc.stdin.close()
    for x in lines:
        with contextlib.suppress(subprocess.TimeoutExpired):  # else stopped with the bus
            x.proc.wait(5)
