"""Test helpers: waiting on conditions, running the CLI and the daemons as real processes."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from opsbay_mqtt.protocol import Execution, Job
from tests.harness import Broker, stop_process, wait_until

__all__ = ["Broker", "Bus", "Watcher", "sample_job", "stop_process", "wait_until"]


SAMPLE_JOB_ID = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"


def sample_job(*executions: Execution, **fields: Any) -> Job:
    """A job for tests that only read one: `echo hi` on `n*`, succeeded, submitted with the
    shared key at 1,700,000,000,000 ms; `fields` override any of it."""
    base: dict[str, Any] = {
        "job_id": SAMPLE_JOB_ID,
        "state": "succeeded",
        "target": "n*",
        "command": "echo hi",
        "timeout_s": 60,
        "start_by_ms": 1_700_000_000_000,
        "submitted_ms": 1_700_000_000_000,
        "submitted_by": "default",
        "executions": list(executions),
    }
    return Job(**{**base, **fields})


class Watcher:
    """A plain MQTT subscriber (no opsbay code): what any MQTT client would see."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.seen: list[tuple[str, bytes, bool]] = []
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex}"
        )
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload, m.retain))
        subscribed = threading.Event()
        # Subscribe on every (re)connection: this client has no persistent session.
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), f"no SUBACK for {topic}"

    def _drain(self) -> None:
        while True:
            try:
                self.seen.append(self.messages.get_nowait())
            except queue.Empty:
                return

    def find(self, pred: Callable[[str, dict[str, Any], bool], bool]) -> list[dict[str, Any]]:
        self._drain()
        out = []
        for topic, payload, retain in self.seen:
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            if isinstance(body, dict) and pred(topic, body, retain):
                out.append(body)
        return out

    def wait_for(
        self, pred: Callable[[str, dict[str, Any], bool], bool], what: str, timeout: float = 10
    ) -> dict[str, Any]:
        return wait_until(lambda: self.find(pred), timeout, what)[-1]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes the socket pair that wakes its loop thread only when the client is
        # collected; in a reference cycle (the callbacks hold this watcher) that may come after
        # the sockets' own finalizers, which then warn. Close them now.
        for name in ("_sockpairR", "_sockpairW"):
            pair_end = getattr(self.client, name, None)
            if pair_end is not None:
                pair_end.close()


@dataclass
class Bus:
    """One isolated bus on the shared test broker: its own topic prefix, secret and dirs."""

    broker: Broker
    tmp: Path
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    secret: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    watchers: list[Watcher] = field(default_factory=list)
    log_start: dict[str, int] = field(default_factory=dict)
    broker_url: str = ""  # what OPSBAY_BROKER says, when not `broker.url` (a cluster's list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPSBAY_")}
        env.update(
            OPSBAY_BROKER=self.broker_url or self.broker.url,
            OPSBAY_SECRET=self.secret,
            OPSBAY_PREFIX=self.prefix,
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        path = self.tmp / f"{name}.log"
        self.log_start[name] = path.stat().st_size if path.exists() else 0
        log = open(path, "ab")  # noqa: SIM115 - owned by the child
        p = subprocess.Popen(
            [sys.executable, "-m", "opsbay_mqtt", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(**env),
            start_new_session=True,
        )
        log.close()
        self.procs.append(p)
        return p

    def coordinator(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        p = self.start(
            "coordinator", "coordinator", "--data-dir", str(self.tmp / "data"), *args, **env
        )
        self.wait_log("coordinator", "coordinator: ready")
        return p

    def worker(self, node: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        state = self.tmp / f"state-{node}"
        p = self.start(
            f"worker-{node}", "worker", "--node", node, "--state-dir", str(state), *args, **env
        )
        self.wait_log(f"worker-{node}", f"worker {node}: ready")
        return p

    def wait_log(self, name: str, text: str, timeout: float = 15) -> None:
        """Wait for `text` in what the latest process of that name has logged."""
        wait_until(lambda: text in self.log(name), timeout, f"{text!r} in {name}.log")

    def log(self, name: str) -> str:
        """What the latest process of that name has logged so far."""
        path = self.tmp / f"{name}.log"
        if not path.exists():
            return ""
        with open(path, "rb") as f:
            f.seek(self.log_start.get(name, 0))
            return f.read().decode(errors="replace")

    def cli(self, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "opsbay_mqtt", *args],
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def cli_json(self, *args: str, **env: str) -> Any:
        out = self.cli(*args, "--json", **env)
        assert out.stdout, f"no output from opsbay {args}: exit {out.returncode}, {out.stderr}"
        return json.loads(out.stdout)

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish raw bytes at QoS 1 with mosquitto_pub, as any MQTT client could."""
        subprocess.run(
            ["mosquitto_pub", "-p", str(self.broker.port), "-q", "1", "-t", topic, "-s"],
            input=payload,
            check=True,
            timeout=10,
        )

    def watch(self, topic: str = "#") -> Watcher:
        w = Watcher(self.broker.port, f"{self.prefix}/{topic}")
        self.watchers.append(w)
        return w

    def stop(self) -> None:
        for w in self.watchers:
            w.close()
        for p in reversed(self.procs):
            stop_process(p)
