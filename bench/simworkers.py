"""Simulated workers (the fleet and job-cycle figures): many MQTT connections in one process,
one epoll loop (a `loop_start()` thread per paho client stalls at a few hundred; paho's own loop
uses select(), which fails above fd 1023).

Each node speaks the real protocol through the package's own functions (`protocol.encode` and
`decode`, `topics.Topics`, the daemons' client id): a signed offline status as its Will, a
subscription to its job topic, a retained signed birth (info and online status), and for every
dispatch the signature, type, topic and node checked, then a signed `running` and a signed
`succeeded` result (exit 0). It keeps no ledger and runs nothing: it measures the bus.

    python -m bench.simworkers --port P --prefix X --first 0 --count 250   (secret: BENCH_SECRET)

Prints `ready N` once every node is subscribed and has published its birth, and runs until its
standard input closes or it gets SIGTERM; then prints `handled N refused M` and disconnects.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from opsbay_mqtt import sysinfo
from opsbay_mqtt.daemons import client_id
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import Dispatch, NodeInfo, NodeStatus, Result, decode, encode
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import Topics

if TYPE_CHECKING:
    from bench.common import Bus, Lines

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


def node_name(i: int) -> str:
    return f"fleet-{i:05d}"


class Fleet:
    def __init__(
        self,
        ports: list[int],
        topics: Topics,
        keyring: Keyring,
        nodes: list[str],
        v311: bool = False,
    ) -> None:
        self.ports, self.v311 = ports, v311  # node i on ports[i % len]; MQTT 3.1.1 (NATS)
        self.topics = topics
        self.keyring = keyring
        self.nodes = nodes
        self.sel = selectors.EpollSelector()
        self.clients: list[mqtt.Client] = []
        self.session = int(time.time() * 1000)
        facts = sysinfo.facts()
        self.facts = facts
        keep = ("hostname", "uptime_s", "load_x100", "memory_available", "disk_free")
        self.host = {k: facts[k] for k in keep}
        self.subscribed = 0
        self.handled = 0
        self.refused = 0
        self.retries = 0  # subscriptions the broker failed, made again
        self.failures: list[str] = []
        self.stop = False

    # -- the event loop's side of paho
    def _open(self, client: Any, node: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel.register(sock, READ, client)

    def _close(self, client: Any, node: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def _want_write(self, client: Any, node: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, READ | WRITE, client)

    def _no_write(self, client: Any, node: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, READ, client)

    # -- the protocol
    def _status(self, node: str, state: str) -> bytes:
        now = time.time()
        msg = NodeStatus(
            node=node,
            state=state,  # type: ignore[arg-type]
            session=self.session,
            seq=1,
            published_ms=int(now * 1000),
        )
        return encode(msg, self.keyring, int(now))

    def _on_connect(self, client: Any, node: str, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.failures.append(f"{node}: {rc}")
            return
        client.subscribe(self.topics.node_jobs(node), qos=1)

    def _on_subscribe(self, client: Any, node: str, mid: int, rcs: Any, props: Any) -> None:
        if any(rc.is_failure for rc in rcs):  # as the worker does (daemons._subscribe): again
            self.retries += 1
            client.subscribe(self.topics.node_jobs(node), qos=1)
            return
        now = time.time()
        info = NodeInfo(
            node=node,
            session=self.session,
            published_ms=int(now * 1000),
            agent_version="bench-sim",
            labels={"sim": "1"},
            facts=self.facts,
        )
        t = self.topics
        client.publish(t.node_info(node), encode(info, self.keyring, int(now)), 1, retain=True)
        client.publish(t.node_status(node), self._status(node, "online"), 1, retain=True)
        self.subscribed += 1

    def _on_message(self, client: Any, node: str, msg: Any) -> None:
        try:
            topic = self.topics.parse(msg.topic)
            if topic != ("node_jobs", {"node": node}):
                raise Refused("wrong_topic", f"{msg.topic} reached {node}")
            d, _auth = decode(msg.payload, self.keyring, Dispatch, topic)
        except Refused:
            self.refused += 1
            return
        now = time.time()
        now_ms = int(now * 1000)
        topic = self.topics.result(node, d.job_id)
        running = Result(
            job_id=d.job_id, node=node, state="running", session=self.session, started_ms=now_ms
        )
        client.publish(topic, encode(running, self.keyring, int(now)), qos=1)
        done = Result(
            job_id=d.job_id,
            node=node,
            state="succeeded",
            session=self.session,
            exit_code=0,
            started_ms=now_ms,
            finished_ms=now_ms,
            duration_ms=0,
            host=self.host,
        )
        client.publish(topic, encode(done, self.keyring, int(now)), qos=1)
        self.handled += 1

    def _client(self, node: str) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id("worker", self.topics, node),
            protocol=MQTTProtocolVersion.MQTTv311 if self.v311 else MQTTProtocolVersion.MQTTv5,
            userdata=node,
        )
        c.on_socket_open = self._open
        c.on_socket_close = self._close
        c.on_socket_register_write = self._want_write
        c.on_socket_unregister_write = self._no_write
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.will_set(self.topics.node_status(node), self._status(node, "offline"), 1, retain=True)
        return c

    # -- the loop
    def pump(self, timeout_s: float) -> None:
        for key, mask in self.sel.select(timeout_s):
            if key.data is None:  # our standard input: closed means stop
                if not os.read(key.fd, 4096):
                    self.sel.unregister(key.fd)
                    self.stop = True
                continue
            client = key.data
            if mask & READ:
                client.loop_read()
            if mask & WRITE:
                client.loop_write()

    def misc(self) -> None:
        for c in self.clients:
            c.loop_misc()

    def run(self) -> int:
        self.sel.register(sys.stdin.fileno(), READ, None)
        for i, node in enumerate(self.nodes):
            c = self._client(node)
            self.clients.append(c)
            c.connect("127.0.0.1", self.ports[i % len(self.ports)], keepalive=60)
            if i % 50 == 49:
                self.pump(0)
        announced = False
        next_misc = time.monotonic() + 1
        while not self.stop:
            self.pump(0.2)
            if time.monotonic() >= next_misc:
                next_misc = time.monotonic() + 1
                self.misc()
            if self.failures:
                print(f"failed {self.failures[0]}", flush=True)
                return 1
            if not announced and self.subscribed == len(self.nodes):
                print(f"ready {len(self.nodes)}", flush=True)
                announced = True
        print(f"handled {self.handled} refused {self.refused}", flush=True)
        for c in self.clients:
            c.disconnect()
        deadline = time.monotonic() + 2
        while any(c.want_write() for c in self.clients) and time.monotonic() < deadline:
            self.pump(0.05)
        return 0


def start_fleet(bus: Bus, total: int, processes: int, timeout_s: float) -> list[Lines]:
    """`total` simulated nodes (`fleet-00000`...) in `processes` processes, once all are ready."""
    from bench.common import Lines

    per, sims = total // processes, []
    for k in range(processes):
        count = per if k < processes - 1 else total - per * (processes - 1)
        ports = ",".join(map(str, bus.ports or [bus.port]))
        argv = [sys.executable, "-m", "bench.simworkers", "--port", ports]
        argv += ["--v311"] if bus.v311 else []
        argv += ["--prefix", bus.prefix, "--first", str(k * per), "--count", str(count)]
        sims.append(Lines(bus.start(f"sim-{k}", argv, piped=True, BENCH_SECRET=bus.secret)))
    for s in sims:
        s.expect("ready", timeout_s)
    return sims


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.simworkers")
    ap.add_argument("--port", required=True, help="a port, or several: p1,p2,p3")
    ap.add_argument("--v311", action="store_true", help="MQTT 3.1.1 (NATS's gateway)")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--first", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    args = ap.parse_args()
    fleet = Fleet(
        [int(p) for p in args.port.split(",")],
        Topics(args.prefix),
        Keyring.shared(os.environ["BENCH_SECRET"]),
        [node_name(i) for i in range(args.first, args.first + args.count)],
        v311=args.v311,
    )

    def stop(signum: int, frame: Any) -> None:
        fleet.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return fleet.run()


if __name__ == "__main__":
    sys.exit(main())
