"""What any MQTT client sees: retained node info and status, the Last Will, live results."""

from __future__ import annotations

import json
import signal

from tests.helpers import Bus, Watcher, wait_until

INFO_FACTS = (
    "hostname", "os", "distro", "arch", "kernel", "uptime_s", "cpu_count",
    "memory_total", "memory_available", "disk_total", "disk_free",
)  # fmt: skip


def test_plain_subscriber_sees_node_info_status_and_results(bus: Bus) -> None:
    bus.coordinator()
    bus.worker("n1", "--label", "role=web", "--label", "region=eu-west")
    # A subscriber that arrives later still gets the retained info and status. "Later": once
    # both were published (the coordinator has them), or one could arrive live, not retained.
    wait_until(
        lambda: any(n["node"] == "n1" and n["state"] == "online" and n.get("labels")
                    for n in bus.cli_json("nodes")),
        20,
        "n1 online with its info, as the coordinator records it",
        0.2,
    )  # fmt: skip
    watch = bus.watch("#")
    info = watch.wait_for(
        lambda topic, body, retained: topic == f"{bus.prefix}/nodes/n1/info" and retained,
        "retained node info",
    )
    assert info["labels"] == {"role": "web", "region": "eu-west"}
    assert info["agent_version"]
    for fact in INFO_FACTS:
        assert fact in info["facts"], fact
    status = watch.wait_for(
        lambda topic, body, retained: topic == f"{bus.prefix}/nodes/n1/status" and retained,
        "retained status",
    )
    assert status["state"] == "online"

    out = bus.cli("submit", "-t", "n1", "-c", "echo watched", "--wait", "--json")
    job_id = json.loads(out.stdout)["job_id"]
    results_topic = f"{bus.prefix}/results/n1/{job_id}"
    seen = watch.find(lambda topic, body, _: topic == results_topic)
    assert [r["state"] for r in seen] == ["running", "succeeded"]
    assert seen[-1]["stdout"] == "watched\n"
    events = watch.find(lambda topic, body, _: topic == f"{bus.prefix}/jobs/{job_id}")
    assert events[-1]["job"]["state"] == "succeeded"


def test_killed_worker_turns_offline_through_its_last_will(bus: Bus) -> None:
    bus.coordinator()
    worker = bus.worker("n1")
    wait_until(
        lambda: [n for n in bus.cli_json("nodes") if n["state"] == "online"], 10, "n1 online"
    )
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    status_topic = f"{bus.prefix}/nodes/n1/status"

    def retained_offline() -> bool:
        w = Watcher(bus.broker.port, status_topic)
        try:
            got = w.wait_for(lambda t, b, r: r, "the retained status", timeout=5)
        finally:
            w.close()
        return got["state"] == "offline"

    wait_until(retained_offline, 20, "a retained offline status after kill -9", every=0.5)
    wait_until(
        lambda: [n for n in bus.cli_json("nodes") if n["state"] == "offline"],
        10,
        "opsbay nodes to show n1 offline",
    )
    # Back again: online, and the old connection's Will does not win.
    bus.worker("n1")
    wait_until(
        lambda: [n for n in bus.cli_json("nodes") if n["state"] == "online"], 10, "n1 online again"
    )
    out = bus.cli("submit", "-t", "n1", "-c", "echo back", "--wait")
    assert (out.returncode, out.stdout) == (0, "back\n")


def test_stopped_worker_says_offline(bus: Bus) -> None:
    bus.coordinator()
    worker = bus.worker("n1")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    wait_until(
        lambda: [n for n in bus.cli_json("nodes") if n["state"] == "offline"],
        10,
        "n1 offline after a clean stop",
    )
