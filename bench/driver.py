"""The suite's own submitter for many jobs at once: signed submissions published without
waiting, and one subscription to every job's events.

The package's `Client` subscribes to each job's topic and waits for each PUBACK before it
returns: right for one CLI call, a bottleneck of its own for thousands of jobs. This driver
speaks the same protocol (a `Submit` signed with `signing.sign`, the coordinator's signed
`job` events verified with the bus's key) without those waits.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from typing import Any

from bench.common import HOST, BenchError, Bus, new_paho
from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import Submit, encode
from opsbay_mqtt.topics import new_job_id


class Driver:
    def __init__(self, bus: Bus, name: str = "driver", *, follow: bool = True) -> None:
        """`follow=False`: only publish (no subscription to job events)."""
        self.topics = bus.topics
        self.keyring = bus.keyring
        self.inbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
        self.client = new_paho(f"bench-{name}-{secrets.token_hex(4)}")
        self.client.on_message = lambda c, u, m: self.inbox.put(
            (time.perf_counter(), bytes(m.payload))
        )
        subscribed = threading.Event()
        subs = [(f"{self.topics.prefix}/jobs/+", 1), (self.topics.rejected, 1)]
        if follow:
            self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(subs)
            self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        else:
            self.client.on_connect = lambda c, u, f, rc, p: subscribed.set()
        self.client.connect(HOST, bus.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            self.close()
            raise BenchError("driver: no CONNACK or SUBACK")
        self.rejected: list[str] = []

    def sign(
        self, target: str, command: str = "true", timeout_s: int = 60, start_by_s: int = 600
    ) -> tuple[str, bytes]:
        """A fresh job id and its signed submission (valid for the coordinator's 300 s window)."""
        job_id = new_job_id()
        now = time.time()
        msg = Submit(
            job_id=job_id,
            target=target,
            command=command,
            timeout_s=timeout_s,
            start_by_ms=int(now * 1000) + start_by_s * 1000,
        )
        return job_id, encode(msg, self.keyring, int(now))

    def publish(self, payload: bytes) -> None:
        self.client.publish(self.topics.submit, payload, qos=1)

    def poll(self, timeout_s: float) -> list[tuple[float, str, str]]:
        """(arrival time, job id, state) of the job events received, waiting up to `timeout_s`
        for the first. A refusal is recorded in `rejected` and reported as state `rejected`."""
        out: list[tuple[float, str, str]] = []
        try:
            item = self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return out
        while True:
            got = self._decode(item[1])
            if got is not None:
                out.append((item[0], *got))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return out

    def _decode(self, payload: bytes) -> tuple[str, str] | None:
        try:
            obj = signing.parse(payload)
            signing.verify(obj, self.keyring)
        except Refused as e:
            self.rejected.append(f"unverifiable event: {e}")
            return None
        if obj.get("type") == "job":
            job: dict[str, Any] = obj["job"]
            return str(job["job_id"]), str(job["state"])
        if obj.get("type") == "rejected":
            self.rejected.append(f"{obj.get('code')}: {obj.get('reason')}")
            job_id = obj.get("job_id")
            return (str(job_id), "rejected") if job_id else None
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
