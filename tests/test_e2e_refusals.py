"""Every bad submission is refused with a reason; nothing runs; the coordinator keeps serving."""

from __future__ import annotations

import json
import time
import uuid

from opsbay_mqtt import signing
from opsbay_mqtt.protocol import Submit, wire
from opsbay_mqtt.signing import Keyring
from tests.helpers import Bus, Watcher, wait_until


def submit_body(job_id: str, command: str = "echo should-not-run") -> dict[str, object]:
    return wire(
        Submit(
            job_id=job_id,
            target="n1",
            command=command,
            timeout_s=10,
            start_by_ms=int(time.time() * 1000) + 60_000,
        )
    )


def assert_nothing_dispatched(bus: Bus, jobs_watch: Watcher) -> None:
    # The coordinator is still serving, and answers in order: a job submitted after the bad
    # ones runs; no dispatch of the bad ones went out before it.
    out = bus.cli("submit", "-t", "n1", "-c", "echo ok", "--wait", "--json")
    assert out.returncode == 0, out.stderr
    good = json.loads(out.stdout)["job_id"]
    dispatched = jobs_watch.find(lambda t, b, r: b.get("type") == "dispatch")
    assert [d["job_id"] for d in dispatched] == [good]
    assert all(p.poll() is None for p in bus.procs)


def rejection(watch: Watcher, job_id: str | None, code: str) -> dict[str, object]:
    return watch.wait_for(
        lambda t, b, r: b.get("type") == "rejected" and b.get("job_id") == job_id,
        f"a rejection ({code}) of {job_id}",
    )


def test_wrong_secret_is_refused_with_a_reason(running: Bus) -> None:
    jobs = running.watch("nodes/+/jobs")
    out = running.cli("submit", "-t", "n1", "-c", "echo no", "--wait", OPSBAY_SECRET="wrong")
    assert out.returncode == 77
    assert "rejected" in out.stderr and "bad_signature" in out.stderr
    queried = running.cli("results", OPSBAY_SECRET="wrong")
    assert queried.returncode == 77 and "bad_signature" in queried.stderr
    assert_nothing_dispatched(running, jobs)


def test_stale_timestamp_replayed_nonce_and_bad_messages_are_refused(running: Bus) -> None:
    keys = Keyring.shared(running.secret)
    jobs = running.watch("nodes/+/jobs")
    watch = running.watch("#")
    submit = f"{running.prefix}/submit"
    now = int(time.time())

    stale_id = str(uuid.uuid4())
    running.publish(submit, signing.sign(submit_body(stale_id), keys, now - 3600))
    assert rejection(watch, stale_id, "stale")["code"] == "stale"

    # The same nonce on a second, different submission is a replay.
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    nonce = uuid.uuid4().hex
    running.publish(submit, signing.sign(submit_body(first, "true"), keys, now, nonce))
    wait_until(lambda: running.cli_json("result", first)["state"] == "succeeded", 10, "first job")
    running.publish(submit, signing.sign(submit_body(second), keys, now, nonce))
    assert rejection(watch, second, "replay")["code"] == "replay"

    running.publish(submit, b"{this is not json")
    bad_json = rejection(watch, None, "bad_json")
    assert bad_json["code"] == "bad_json"

    missing = submit_body(str(uuid.uuid4()))
    del missing["command"]
    running.publish(submit, signing.sign(missing, keys, now))
    got = rejection(watch, missing["job_id"], "invalid")  # type: ignore[arg-type]
    assert got["code"] == "invalid" and "command" in str(got["reason"])

    unsigned = json.dumps(submit_body(str(uuid.uuid4()))).encode()
    running.publish(submit, unsigned)
    assert rejection(watch, json.loads(unsigned)["job_id"], "unsigned")["code"] == "unsigned"

    dispatched_before_good = jobs.find(lambda t, b, r: b.get("type") == "dispatch")
    assert [d["job_id"] for d in dispatched_before_good] == [first]
    out = running.cli("submit", "-t", "n1", "-c", "echo ok", "--wait")
    assert out.returncode == 0 and out.stdout == "ok\n"
    for bad in (stale_id, second):
        assert running.cli("result", bad).returncode == 66  # never stored


def test_replayed_submission_never_runs_twice(running: Bus, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keys = Keyring.shared(running.secret)
    marker = tmp_path / "ran"
    job_id = str(uuid.uuid4())
    payload = signing.sign(submit_body(job_id, f"echo once >> {marker}"), keys, int(time.time()))
    watch = running.watch(f"jobs/{job_id}")
    running.publish(f"{running.prefix}/submit", payload)
    wait_until(lambda: running.cli_json("result", job_id)["state"] == "succeeded", 10, "the job")
    running.publish(f"{running.prefix}/submit", payload)  # captured and replayed
    # The coordinator answers a replay of a known job with the job as it stands.
    wait_until(
        lambda: len(watch.find(lambda t, b, r: b.get("type") == "job")) >= 4,
        10,
        "the answer to the replay",
    )
    assert marker.read_text() == "once\n"
    assert not watch.find(lambda t, b, r: b.get("type") == "rejected")


def test_target_not_allowed_is_refused_and_recorded(bus: Bus) -> None:
    bus.coordinator("--allow-node", "n1")
    bus.worker("n1")
    bus.worker("n2")
    jobs = bus.watch("nodes/+/jobs")
    out = bus.cli("submit", "-t", "n2", "-c", "echo no", "--wait")
    assert out.returncode == 77
    assert "target_not_allowed" in out.stderr
    listed = bus.cli_json("results", "--state", "rejected")
    assert [j["target"] for j in listed] == ["n2"]
    assert bus.cli("result", listed[0]["job_id"]).returncode == 77
    assert "job " not in bus.log("worker-n2").split("ready", 1)[1]
    assert_nothing_dispatched(bus, jobs)


def test_bad_target_name_is_a_usage_error(running: Bus) -> None:
    for bad in ("web/01", "+", "#", ""):
        out = running.cli("submit", "-t", bad, "-c", "true")
        assert out.returncode == 2, (bad, out.stderr)
        assert ("node name" if bad else "give a target") in out.stderr
