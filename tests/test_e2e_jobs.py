"""Jobs through a real Mosquitto, coordinator and worker, driven by the `opsbay` CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psutil

from tests.helpers import Bus, wait_until

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_echo_hello_prints_output_and_exits_0(running: Bus) -> None:
    out = running.cli("submit", "--target", "n1", "--command", "echo hello", "--wait")
    assert (out.returncode, out.stdout) == (0, "hello\n"), out.stderr


def test_remote_exit_code_passes_through_and_worker_survives(running: Bus) -> None:
    out = running.cli("submit", "--target", "n1", "--command", "echo oops >&2; exit 3", "--wait")
    assert out.returncode == 3
    assert "oops" in out.stderr and "failed (exit 3)" in out.stderr
    assert all(p.poll() is None for p in running.procs), "a failing command took a process down"
    again = running.cli("submit", "-t", "n1", "-c", "echo still here", "--wait")
    assert (again.returncode, again.stdout) == (0, "still here\n")


def test_timeout_kills_the_whole_process_group(running: Bus, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"echo $$ > {pids}; sleep 30 & echo $! >> {pids}; sleep 31"
    out = running.cli("submit", "-t", "n1", "-c", command, "--timeout", "1", "--wait", "--json")
    assert out.returncode == 124, out.stderr
    job = json.loads(out.stdout)
    assert job["state"] == "timed_out"
    assert job["executions"][0]["state"] == "timed_out"
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    assert not [p for p in started if live(p)], "processes of the timed-out job survived"
    assert not [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["cmdline"] == ["sleep", "31"] and live(p.info["pid"])
    ]
    assert all(p.poll() is None for p in running.procs)


def test_timed_out_without_json_names_the_state(running: Bus) -> None:
    out = running.cli("submit", "-t", "n1", "-c", "sleep 30", "--timeout", "1", "--wait")
    assert out.returncode == 124
    assert "timed_out" in out.stderr


def test_submit_without_wait_prints_id_then_result_and_results_show_it(running: Bus) -> None:
    out = running.cli("submit", "-t", "n1", "-c", "echo later")
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    assert UUID_RE.match(job_id)
    job = wait_until(
        lambda: (j := running.cli_json("result", job_id))["state"] == "succeeded" and j,
        10,
        "the job to succeed",
    )
    ex = job["executions"][0]
    assert (ex["node"], ex["exit_code"], ex["stdout"]) == ("n1", 0, "later\n")
    for key in ("stderr", "truncated", "started_at", "finished_at", "duration_ms"):
        assert key in ex
    shown = running.cli("result", job_id)
    assert shown.returncode == 0 and "later" in shown.stdout and "succeeded" in shown.stdout

    failing = running.cli("submit", "-t", "n1", "-c", "exit 5", "--wait")
    assert failing.returncode == 5
    listed = running.cli_json("results", "--node", "n1", "--state", "succeeded", "--limit", "5")
    assert [j["job_id"] for j in listed] == [job_id]
    assert [j["state"] for j in running.cli_json("results", "--limit", "1")] == ["failed"]
    assert running.cli_json("results", "--node", "nobody") == []
    table = running.cli("results")
    assert table.returncode == 0 and job_id in table.stdout


def test_result_of_unknown_job_is_an_error(running: Bus) -> None:
    out = running.cli("result", "00000000-0000-4000-8000-000000000000")
    assert out.returncode == 66
    assert "not_found" in out.stderr


def test_nodes_lists_the_worker_with_its_facts(running: Bus) -> None:
    nodes = wait_until(
        lambda: [n for n in running.cli_json("nodes") if n["state"] == "online"],
        10,
        "node n1 online",
    )
    (n1,) = nodes
    assert n1["node"] == "n1" and n1["last_seen"] is not None
    for fact in ("hostname", "os", "distro", "arch", "kernel", "uptime_s", "cpu_count"):
        assert fact in n1["facts"]
    table = running.cli("nodes")
    assert table.returncode == 0 and "n1" in table.stdout and "online" in table.stdout


def test_node_names_match_exactly(bus: Bus) -> None:
    bus.coordinator()
    bus.worker("web")
    bus.worker("web-01")
    watch = bus.watch("results/#")
    out = bus.cli("submit", "-t", "web-01", "-c", "echo for-web-01", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert [x["node"] for x in job["executions"]] == ["web-01"]
    job_id = job["job_id"]
    results = watch.find(lambda topic, body, _: body.get("job_id") == job_id)
    assert results and {r["node"] for r in results} == {"web-01"}
    assert job_id not in bus.log("worker-web")
    assert job_id in bus.log("worker-web-01")


def test_large_output_is_bounded_and_counted(running: Bus) -> None:
    command = "head -c 20000000 /dev/zero | tr '\\0' x; echo end-of-output"
    out = running.cli("submit", "-t", "n1", "-c", command, "--wait", "--json")
    assert out.returncode == 0, out.stderr
    ex = json.loads(out.stdout)["executions"][0]
    assert ex["stdout_bytes"] == 20_000_000 + len("end-of-output\n")
    assert ex["truncated"] is True
    assert len(ex["stdout"]) < 200_000
    assert ex["stdout"].startswith("x" * 1000) and ex["stdout"].endswith("xend-of-output\n")
    assert all(p.poll() is None for p in running.procs)
    plain = running.cli("submit", "-t", "n1", "-c", command, "--wait")
    assert plain.returncode == 0 and "output truncated" in plain.stderr


def test_json_output_shape(running: Bus) -> None:
    out = running.cli("submit", "-t", "n1", "-c", "echo out; echo err >&2", "--wait", "--json")
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded" and UUID_RE.match(job["job_id"])
    (ex,) = job["executions"]
    assert ex["stdout"] == "out\n" and ex["stderr"] == "err\n" and ex["truncated"] is False
    assert ex["started_at"].endswith("Z") and ex["finished_at"].endswith("Z")
    assert isinstance(ex["duration_ms"], int)


def test_unreachable_broker_has_its_own_exit_code(bus: Bus) -> None:
    from tests.conftest import free_port

    out = bus.cli(
        "submit",
        "-t",
        "n1",
        "-c",
        "true",
        "--wait",
        OPSBAY_BROKER=f"mqtt://127.0.0.1:{free_port()}",
    )
    assert out.returncode == 69
    assert "cannot reach broker" in out.stderr


def test_missing_secret_is_a_config_error(bus: Bus) -> None:
    out = bus.cli("submit", "-t", "n1", "-c", "true", OPSBAY_SECRET="")
    assert out.returncode == 78
    assert "OPSBAY_SECRET" in out.stderr


def test_wait_gives_up_with_its_own_exit_code(running: Bus) -> None:
    out = running.cli("submit", "-t", "n1", "-c", "sleep 5", "--wait", "--wait-timeout", "1")
    assert out.returncode == 75
    assert "gave up waiting" in out.stderr


def test_the_bus_runs_over_mqtt_3_1_1(bus: Bus) -> None:
    url = f"{bus.broker.url}?version=3.1.1"
    bus.coordinator(OPSBAY_BROKER=url)
    bus.worker("n1", OPSBAY_BROKER=url)
    out = bus.cli("submit", "-t", "n1", "-c", "echo old protocol", "--wait", OPSBAY_BROKER=url)
    assert (out.returncode, out.stdout) == (0, "old protocol\n"), out.stderr
    nodes = bus.cli_json("nodes", OPSBAY_BROKER=url)
    assert [(n["node"], n["state"]) for n in nodes] == [("n1", "online")]
    # Mosquitto logs the protocol of each connection: p2 is 3.1.1 (p5 would be MQTT 5).
    log = bus.broker.log.read_text()
    assert f"as opsbay-worker:{bus.prefix}:n1 (p2, c0," in log
    assert f"as opsbay-coordinator:{bus.prefix} (p2, c0," in log
    bad = bus.cli("nodes", OPSBAY_BROKER=f"{bus.broker.url}?version=4")
    assert bad.returncode == 78 and "version" in bad.stderr
