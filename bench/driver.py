"""The suite's submitter for many jobs at once: signed submissions published without waiting,
one subscription to every job's events (the package's `Client` subscribes to each job's topic
and waits for each PUBACK: right for one CLI call, a bottleneck of its own for thousands)."""

from __future__ import annotations

import queue
import time
from typing import Any

from bench.common import BenchError, Bus, close_paho, paho_thread
from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import Submit, encode
from opsbay_mqtt.states import TERMINAL
from opsbay_mqtt.topics import new_job_id


class Driver:
    def __init__(self, bus: Bus, *, follow: bool = True) -> None:
        """`follow=False`: only publish (no subscription to job events)."""
        self.topics, self.keyring = bus.topics, bus.keyring
        self.inbox: queue.Queue[tuple[float, bytes]] = queue.Queue()
        qos = 0 if bus.v311 else 1  # as the CLI subscribes (`Client._qos`)
        subs = (
            [(f"{self.topics.prefix}/jobs/+", qos), (self.topics.rejected, qos)] if follow else []
        )
        self.client = paho_thread("driver", bus.port, subs, self.inbox, v311=bus.v311)
        self.rejected: list[str] = []

    def sign(self, target: str, command: str = "true") -> tuple[str, bytes]:
        """A fresh job id and its signed submission (valid for the coordinator's 300 s window)."""
        job_id, now = new_job_id(), time.time()
        msg = Submit(
            job_id=job_id,
            target=target,
            command=command,
            timeout_s=60,
            start_by_ms=int(now * 1000) + 600_000,
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
        # Verified, not validated: a job event is the coordinator's, and reading it as a model
        # would put the driver's CPU in the figures.
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
            return (str(obj["job_id"]), "rejected") if obj.get("job_id") else None
        return None

    def run(
        self, signed: list[tuple[str, bytes]], timeout_s: float, window: int = 0
    ) -> tuple[float, dict[str, float]]:
        """Publish the submissions (all at once, or keeping at most `window` in flight) until
        every job has succeeded: (time of the first publish, end time of each job)."""
        in_flight: set[str] = set()
        done: dict[str, float] = {}
        nxt, started = 0, time.perf_counter()
        while len(done) < len(signed):
            while nxt < len(signed) and (not window or len(in_flight) < window):
                in_flight.add(signed[nxt][0])
                self.publish(signed[nxt][1])
                nxt += 1
            if time.perf_counter() > started + timeout_s:
                raise BenchError(f"{len(done)} of {len(signed)} jobs ended in {timeout_s:g} s")
            for t, job_id, state in self.poll(0.5):
                if job_id in in_flight and state in TERMINAL:
                    if state != "succeeded":
                        raise BenchError(f"job {job_id} ended {state}: {self.rejected[:3]}")
                    in_flight.discard(job_id)
                    done[job_id] = t
        return started, done

    def close(self) -> None:
        close_paho(self.client)
