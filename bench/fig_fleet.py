"""Fleet: 1,000 simulated workers connected at once; one job fanned out to all of them, then one
job for each, until every result is stored; the coordinator's memory meanwhile."""

from __future__ import annotations

import sys
import threading
import time

from bench.common import (
    BenchError,
    Lines,
    Row,
    Suite,
    mb,
    peak_rss,
    private_bus,
    rss,
    sec,
    wait_until,
)
from bench.driver import Driver
from bench.simworkers import node_name
from opsbay_mqtt.states import TERMINAL

FLEET = """\
**Fleet**: 1,000 simulated workers in 4 processes (`bench/simworkers.py`: one epoll loop over
250 paho connections each) speaking the real protocol: the worker's client id, a signed Will,
a subscription to the node's job topic, a retained signed birth (info and status), and for each
dispatch a verified signature, type, topic and node, then a signed `running` and a signed
`succeeded` result (nothing is run). Once the coordinator lists all 1,000 nodes online, the
suite publishes one signed submission with `target: "fleet-*"` (a glob over the known nodes:
one job, 1,000 executions) and times the publish to the job event saying the whole job
`succeeded` (the coordinator publishes events only after its commit, so every result is
stored). Then the same with 1,000 single-target submissions, one per node, published at once,
to the last job's `succeeded` event. The coordinator's RSS is its peak (VmHWM) over the whole
figure."""


def drive(driver: Driver, signed: list[tuple[str, bytes]], timeout_s: float) -> tuple[float, float]:
    """Publish the submissions at once; return (time to the last job's terminal event, the
    same for the first job submitted)."""
    pending = {job_id for job_id, _ in signed}
    first_id = signed[0][0]
    t0 = time.perf_counter()
    ended: dict[str, float] = {}
    for _, payload in signed:
        driver.publish(payload)
    deadline = t0 + timeout_s
    while pending:
        if time.perf_counter() > deadline:
            raise BenchError(f"{len(pending)} of {len(signed)} jobs not done in {timeout_s:g} s")
        for t, job_id, state in driver.poll(0.5):
            if job_id in pending and state in TERMINAL:
                if state != "succeeded":
                    raise BenchError(f"job {job_id} ended {state}: {driver.rejected[:1]}")
                pending.discard(job_id)
                ended[job_id] = t
    return max(ended.values()) - t0, ended[first_id] - t0


def run(suite: Suite) -> list[Row]:
    total, procs = suite.pick(1000, 40), suite.pick(4, 2)
    timeout_s = suite.pick(120.0, 30.0)
    from opsbay_mqtt.client import Client

    with private_bus(suite, "fleet") as bus:
        coord = bus.coordinator()
        per = total // procs
        t_connect = time.perf_counter()
        sims = []
        for k in range(procs):
            count = per if k < procs - 1 else total - per * (procs - 1)
            argv = [sys.executable, "-m", "bench.simworkers", "--port", str(bus.port)]
            argv += ["--prefix", bus.prefix, "--first", str(k * per), "--count", str(count)]
            sims.append(Lines(bus.start(f"sim-{k}", argv, piped=True, BENCH_SECRET=bus.secret)))
        for s in sims:
            s.expect("ready", timeout_s)
        connected_s = time.perf_counter() - t_connect
        with Client(bus.client_config()) as client:

            def all_online() -> bool:
                nodes = client.nodes(timeout_s=30)
                return sum(1 for n in nodes if n.get("state") == "online") >= total

            wait_until(all_online, timeout_s, f"{total} nodes online", every=0.2)
        online_s = time.perf_counter() - t_connect
        idle_rss = rss(coord.pid)
        driver = Driver(bus)
        peak_sampled = [idle_rss]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                peak_sampled.append(rss(coord.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            fanned, _ = drive(driver, [driver.sign("fleet-*")], timeout_s)
            single, _ = drive(driver, [driver.sign(node_name(i)) for i in range(total)], timeout_s)
        finally:
            sampling.set()
            sampler.join()
            driver.close()
        coord_peak = peak_rss(coord.pid)
        broker_rss = rss(bus.broker.pid)
        for s in sims:  # stop them: close their standard input, read their counts
            assert s.proc.stdin is not None
            s.proc.stdin.close()
        handled = [s.expect("handled", 10) for s in sims]
    done = sum(int(h.split()[1]) for h in handled)
    refused = sum(int(h.split()[3]) for h in handled)
    if done != 2 * total or refused:
        raise BenchError(f"simulated workers handled {done} of {2 * total}, refused {refused}")
    return [
        Row(
            "fleet",
            f"one job fanned out to {total:,} simulated workers, all results stored",
            sec(fanned),
            f"connected + birth in {sec(connected_s)}; all online at the coordinator "
            f"after {sec(online_s)}",
            target="≤ 5 s",
            met=fanned <= 5,
        ),
        Row(
            "fleet",
            f"{total:,} single-target jobs, one per node, all results stored",
            sec(single),
        ),
        Row(
            "fleet",
            f"coordinator peak RSS with {total:,} nodes",
            mb(coord_peak),
            f"before the jobs {mb(idle_rss)}, sampled peak during them {mb(max(peak_sampled))}; "
            f"Mosquitto RSS {mb(broker_rss)}",
            target="≤ 150 MB",
            met=coord_peak <= 150e6,
        ),
    ]
