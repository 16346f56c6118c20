"""What the tests and the benchmarks (`bench/`) share: bounded waits, free loopback ports, a
private Mosquitto, stopping what was started, and a coordinator stepped in process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from opsbay_mqtt.cli.stack import broker_config, find_mosquitto, wait_for_port

if TYPE_CHECKING:
    from opsbay_mqtt.coordinator import Coordinator
    from opsbay_mqtt.signing import Keyring
    from opsbay_mqtt.topics import Topics

T = TypeVar("T")
HOST = "127.0.0.1"  # loopback only: every connection of the tests and benchmarks goes here


class WaitTimeout(AssertionError):
    """A bounded wait ran out (an AssertionError, so a test that hits it fails plainly)."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, every: float = 0.02) -> T:
    """Return the predicate's first truthy value; fail, saying what was awaited, at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)  # wait_until's poll interval, inside its deadline
    raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}; last saw {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop_process(p: subprocess.Popen[Any], grace: float = 10, sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM), then SIGKILL after `grace` seconds; to the whole process group when the
    child leads one (started with `start_new_session`), so that its own children stop too."""
    if p.poll() is not None:
        return  # reaped: its pid, and so its group id, may already be someone else's
    group = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(p.pid) == p.pid
    kill = (lambda s: os.killpg(p.pid, s)) if group else p.send_signal
    for s in (sig, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(s)
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
    p.wait(grace)


@dataclass
class Broker:
    port: int
    process: subprocess.Popen[bytes]
    conf: Path
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://{HOST}:{self.port}"


def start_broker(
    directory: Path,
    port: int | None = None,
    popen: Callable[[list[str], Path], subprocess.Popen[bytes]] | None = None,
) -> Broker:
    """Mosquitto with the shipped config on a free loopback port (or `port`), its data and log
    in `directory`; `popen(argv, log)` starts it when the caller keeps its own children."""
    binary = find_mosquitto()
    data = directory / "broker-data"
    data.mkdir(parents=True, exist_ok=True)
    conf, log = directory / "mosquitto.conf", directory / "mosquitto.log"
    for _attempt in range(3):  # a free port can be taken between the probe and the bind
        chosen = port or free_port()
        conf.write_text(broker_config(chosen, data.resolve()))
        if popen is not None:
            proc = popen([binary, "-c", str(conf)], log)
        else:
            with open(log, "ab") as out:
                proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
        try:
            wait_for_port(chosen, 10, proc)
            return Broker(port=chosen, process=proc, conf=conf, log=log)
        except Exception:
            stop_process(proc)
            if port is not None:
                raise
    raise RuntimeError(f"mosquitto did not start; see {log}")


class Clock:
    """A clock a test moves by hand (`clock.now = ...`): what a stepped coordinator is given."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def stepped_coordinator(
    db: Path,
    topics: Topics,
    keyring: Keyring,
    clock: Callable[[], float] | None = None,
    **settings: Any,
) -> Coordinator:
    """A coordinator without MQTT: `handle(Inbound)` in, `outbox` and its store out, its time
    from `clock` (the real clock by default)."""
    from opsbay_mqtt.coordinator import Coordinator, CoordinatorConfig
    from opsbay_mqtt.store import Store

    cfg = CoordinatorConfig(topics=topics, keyring=keyring, **settings)
    if clock is None:
        return Coordinator(cfg, Store(db))
    return Coordinator(cfg, Store(db), clock=clock)
