"""Hostile messages on every topic the coordinator and a worker read: each is refused with a
reason, nothing is stored or run, and both keep serving. The payloads are seeded; the seed is
printed so a failure can be replayed (OPSBAY_HOSTILE_SEED)."""

from __future__ import annotations

import json
import os
import random
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from opsbay_mqtt.signing import Keyring, sign
from tests.helpers import Bus, wait_until


def nasty_payloads(rng: random.Random, keys: Keyring) -> list[bytes]:
    now = int(time.time())
    job_id = str(uuid.uuid4())
    good = {"v": 1, "type": "submit", "job_id": job_id, "target": "n1", "command": "true",
            "timeout_s": 5, "start_by_ms": now * 1000 + 60_000}  # fmt: skip
    out = [
        b"",
        b"\x00\xff\xfe garbage",
        b"\xc3\x28 invalid utf-8",
        b"null",
        b"[1,2,3]",
        b'"a string"',
        b'{"v": 1e999}',
        b'{"v": NaN}',
        b'{"a": 1, "a": 2}',
        b"[" * 100_000 + b"1" + b"]" * 100_000,
        b'{"v":' * 5000 + b"1" + b"}" * 5000,
        b'{"v":1,"type":"submit","x":"' + b"A" * (5 * 1024 * 1024) + b'"}',  # over the limit
        json.dumps({**good, "command": "x" * 70_000}).encode(),
        json.dumps({**good, "timeout_s": 10**30}).encode(),
        json.dumps({**good, "type": ["submit"]}).encode(),
        json.dumps({**good, "v": True}).encode(),
        json.dumps({**good, "target": "n1/../n2"}).encode(),
        json.dumps({**good, "target": "+"}).encode(),
        json.dumps({**good, "unknown": "field"}).encode(),
        json.dumps({**good, "job_id": "\ud800"}).encode(),
        b"{}",
        sign({**good, "timeout_s": "5"}, keys, now),
        sign({**good, "start_by_ms": 2**62}, keys, now),
        sign(
            {
                **good,
                "extra": {
                    "deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
                },
            },
            keys,
            now,
        ),
        sign(good, Keyring.shared("wrong"), now),
        sign(good, keys, now - 10_000),
    ]
    for _ in range(40):  # random bytes and random JSON-ish text
        n = rng.randrange(0, 300)
        out.append(bytes(rng.randrange(256) for _ in range(n)))
        out.append(
            "".join(rng.choice('{}[]":,0123456789.eE-+truefalsnul\\u ') for _ in range(n)).encode()
        )
    return out


def test_hostile_messages_are_refused_and_nothing_breaks(running: Bus) -> None:
    seed = int(os.environ.get("OPSBAY_HOSTILE_SEED", random.randrange(2**32)))
    print(f"hostile-input seed: {seed}")
    rng = random.Random(seed)
    keys = Keyring.shared(running.secret)
    p = running.prefix
    topics = [
        f"{p}/submit",
        f"{p}/rpc/request",
        f"{p}/results/n1/{uuid.uuid4()}",
        f"{p}/results/n1/not-a-uuid",
        f"{p}/nodes/n1/info",
        f"{p}/nodes/n1/status",
        f"{p}/nodes/n1/jobs",
        f"{p}/nodes/bad..name!/status",
    ]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{uuid.uuid4().hex}")
    client.connect("127.0.0.1", running.broker.port)
    client.loop_start()
    try:
        infos = [
            client.publish(topic, payload, qos=1)
            for payload in nasty_payloads(rng, keys)
            for topic in topics
        ]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.loop_stop()
        client.disconnect()
    # Still serving, in order: a job submitted after all of that runs.
    out = running.cli("submit", "-t", "n1", "-c", "echo still fine", "--wait", "--json")
    assert out.returncode == 0, f"seed {seed}: {out.stderr}"
    wait_until(lambda: all(proc.poll() is None for proc in running.procs), 1, "all alive")
    stored = running.cli_json("results", "--limit", "100")
    assert [j["command"] for j in stored] == ["echo still fine"], f"seed {seed}"
    nodes = running.cli_json("nodes")
    assert [(n["node"], n["state"]) for n in nodes] == [("n1", "online")], f"seed {seed}"
    for name in ("coordinator", "worker-n1"):
        assert "Traceback" not in running.log(name), f"seed {seed}: {name} raised"
