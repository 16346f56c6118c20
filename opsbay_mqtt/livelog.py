"""Live output of a running job: chunks with sequence numbers, rate-limited and bounded, so a
noisy command cannot flood the broker. Never relied on: the final result holds the output."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable

from opsbay_mqtt.protocol import Output

CHUNK_BYTES = 16 * 1024  # the most one message carries
RATE_BYTES_S = 64 * 1024  # sustained live output per job
BURST_BYTES = 256 * 1024
FLUSH_EVERY_S = 0.1


class LiveOutput:
    """Collects a job's output as the runner reads it and hands it on as `Output` messages:
    when a chunk is full, or when `flush` is called (the worker does so every 100 ms and at the
    end). Beyond the rate budget, bytes are dropped and counted in the next chunk."""

    def __init__(
        self,
        job_id: str,
        node: str,
        send: Callable[[Output], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.job_id, self.node, self._send, self._clock = job_id, node, send, clock
        self._lock = threading.Lock()
        self._seq = 0
        self._pending: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._decoders = {
            s: codecs.getincrementaldecoder("utf-8")("replace") for s in self._pending
        }
        self._dropped = 0
        self._budget = float(BURST_BYTES)
        self._refilled = clock()

    def write(self, stream: str, data: bytes) -> None:
        with self._lock:
            now = self._clock()
            self._budget = min(BURST_BYTES, self._budget + (now - self._refilled) * RATE_BYTES_S)
            self._refilled = now
            take = min(len(data), int(self._budget))
            self._budget -= take
            self._dropped += len(data) - take
            buf = self._pending[stream]
            buf += data[:take]
            while len(buf) >= CHUNK_BYTES:
                self._emit(stream, bytes(buf[:CHUNK_BYTES]), final=False)
                del buf[:CHUNK_BYTES]

    def flush(self, final: bool = False) -> None:
        with self._lock:
            for stream, buf in self._pending.items():
                if buf or (final and self._dropped):
                    self._emit(stream, bytes(buf), final=final)
                    buf.clear()

    def _emit(self, stream: str, raw: bytes, final: bool) -> None:
        text = self._decoders[stream].decode(raw, final=final)
        msg = Output(
            job_id=self.job_id,
            node=self.node,
            seq=self._seq,
            stream=stream,  # type: ignore[arg-type]
            data=text,
            dropped=self._dropped,
        )
        self._seq += 1
        self._dropped = 0
        self._send(msg)
