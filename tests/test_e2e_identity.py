"""Per-identity keys, who may do what, and what never leaks, through a real Mosquitto."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from opsbay_mqtt import keys as keyfile
from opsbay_mqtt.protocol import NodeInfo, Result, Submit, encode, wire
from opsbay_mqtt.signing import sign
from tests.helpers import Bus, stop_process, wait_until

CLIENTS = {"ci": ('targets = ["n1", "web-*"]\ncommands = ["echo *", "true"]\n'), "admin": ""}
NODES = ("n1", "n2")


class Keys:
    """A coordinator key file with every key, and each party's own file."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.entries: dict[str, list[str]] = {}  # identity -> its [[keys]] entries
        for name in CLIENTS:
            self.add("client", name)
        for name in NODES:
            self.add("node", name)

    def add(self, kind: str, name: str) -> str:
        _, entry = keyfile.new_key_instructions(kind, name)
        self.entries.setdefault(name, []).append(entry)
        self.write()
        return entry

    def drop_first(self, name: str) -> None:
        self.entries[name].pop(0)
        self.write()

    def write(self) -> None:
        policies = "".join(f"[clients.{n}]\n{p}\n" for n, p in CLIENTS.items() if p)
        everything = "\n".join(e for es in self.entries.values() for e in es)
        (self.dir / "coordinator.toml").write_text(everything + "\n" + policies)
        (self.dir / "coordinator.toml").chmod(0o600)  # opsbay refuses key files others can read
        for name, es in self.entries.items():
            (self.dir / f"{name}.toml").write_text("\n".join(es))
            (self.dir / f"{name}.toml").chmod(0o600)

    def file(self, name: str) -> str:
        return str(self.dir / f"{name}.toml")

    def keyring(self, name: str) -> Any:
        """What party `name` signs with: its own key file."""
        own = keyfile.load(Path(self.file(name)))
        return keyfile.keyring(
            own, None, own.signing_kid("node" if name in NODES else "client", name)
        )


@pytest.fixture
def ids(bus: Bus, tmp_path: Path) -> Keys:
    k = Keys(tmp_path)
    bus.coordinator(OPSBAY_SECRET="", OPSBAY_KEY_FILE=k.file("coordinator"))
    for node in NODES:
        bus.worker(node, OPSBAY_SECRET="", OPSBAY_KEY_FILE=k.file(node))
    return k


def as_(keys: Keys, name: str) -> dict[str, str]:
    return {"OPSBAY_SECRET": "", "OPSBAY_KEY_FILE": keys.file(name)}


def publish(bus: Bus, topic: str, payload: bytes) -> None:
    bus.publish(f"{bus.prefix}/{topic}", payload)


def test_each_identity_signs_with_its_own_key(bus: Bus, ids: Keys) -> None:
    out = bus.cli("submit", "-t", "n2", "-c", "echo hello", "--wait", "--json", **as_(ids, "admin"))
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["submitted_by"] == "admin" and job["executions"][0]["stdout"] == "hello\n"
    # Without a key of its own, a party cannot even start.
    nokey = bus.cli("submit", "-t", "n1", "-c", "true", **as_(ids, "n1"))
    assert nokey.returncode == 78 and "no key for a client" in nokey.stderr


def test_a_node_key_cannot_submit(bus: Bus, ids: Keys) -> None:
    watch = bus.watch("#")
    job_id = str(uuid.uuid4())
    body = Submit(
        job_id=job_id, target="n2", command="echo pwned", timeout_s=5,
        start_by_ms=int(time.time() * 1000) + 60_000,
    )  # fmt: skip
    publish(bus, "submit", encode(body, ids.keyring("n1"), int(time.time())))
    got = watch.wait_for(lambda t, b, r: b.get("type") == "rejected", "the refusal")
    assert got["code"] == "wrong_identity" and got["job_id"] == job_id
    assert not watch.find(lambda t, b, r: b.get("type") == "dispatch")


def test_a_node_key_cannot_speak_for_another_node_and_a_client_key_for_none(
    bus: Bus, ids: Keys
) -> None:
    out = bus.cli("submit", "-t", "n2", "-c", "echo slow; sleep 3", **as_(ids, "admin"))
    job_id = out.stdout.strip()
    forged = Result(job_id=job_id, node="n2", state="failed", exit_code=99)
    publish(bus, f"results/n2/{job_id}", encode(forged, ids.keyring("n1"), int(time.time())))
    info = NodeInfo(
        node="n1", session=1, published_ms=1, agent_version="x", labels={"owned": "yes"}
    )
    publish(bus, "nodes/n1/info", encode(info, ids.keyring("admin"), int(time.time())))
    job = wait_until(
        lambda: (
            (j := bus.cli_json("result", job_id, **as_(ids, "admin")))["state"] == "succeeded" and j
        ),
        20,
        "the real result",
    )
    assert job["executions"][0]["exit_code"] == 0
    nodes = {n["node"]: n for n in bus.cli_json("nodes", **as_(ids, "admin"))}
    assert "owned" not in nodes["n1"]["labels"]
    assert "wrong_identity" in bus.log("coordinator")


def test_client_policy_limits_targets_and_commands(bus: Bus, ids: Keys) -> None:
    ok = bus.cli("submit", "-t", "n1", "-c", "echo fine", "--wait", **as_(ids, "ci"))
    assert (ok.returncode, ok.stdout) == (0, "fine\n"), ok.stderr
    for target, command, code in (
        ("n2", "echo fine", "target_not_allowed"),
        ("n1", "echo fine; touch /tmp/opsbay-pwned", "command_not_allowed"),
        ("n1", "uname -a", "command_not_allowed"),
    ):
        out = bus.cli("submit", "-t", target, "-c", command, "--wait", **as_(ids, "ci"))
        assert out.returncode == 77 and code in out.stderr, (target, command, out.stderr)
    assert not Path("/tmp/opsbay-pwned").exists()


def test_keys_rotate_without_downtime(bus: Bus, ids: Keys, tmp_path: Path) -> None:
    def works() -> None:
        out = bus.cli("submit", "-t", "n1", "-c", "echo ok", "--wait", **as_(ids, "admin"))
        assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr

    works()
    ids.add("node", "n1")  # 1. the coordinator learns the new key (both valid)
    coordinator = bus.procs[0]
    stop_process(coordinator)
    bus.coordinator(OPSBAY_SECRET="", OPSBAY_KEY_FILE=ids.file("coordinator"))
    works()
    worker = next(p for p in bus.procs if "n1" in " ".join(map(str, p.args)))
    stop_process(worker)  # 2. the node starts signing with it
    bus.worker("n1", OPSBAY_SECRET="", OPSBAY_KEY_FILE=ids.file("n1"))
    works()
    ids.drop_first("n1")  # 3. the old key goes everywhere
    for p in bus.procs:
        stop_process(p)
    bus.coordinator(OPSBAY_SECRET="", OPSBAY_KEY_FILE=ids.file("coordinator"))
    bus.worker("n1", OPSBAY_SECRET="", OPSBAY_KEY_FILE=ids.file("n1"))
    works()


def test_a_replayed_nonce_is_refused_after_a_restart(bus: Bus, ids: Keys) -> None:
    keyring = ids.keyring("admin")
    nonce = uuid.uuid4().hex
    now = int(time.time())

    def body(job_id: str) -> dict[str, Any]:
        return wire(Submit(
            job_id=job_id, target="n1", command="true", timeout_s=5,
            start_by_ms=int(time.time() * 1000) + 60_000,
        ))  # fmt: skip

    first = str(uuid.uuid4())
    publish(bus, "submit", sign(body(first), keyring, now, nonce))
    wait_until(
        lambda: bus.cli_json("result", first, **as_(ids, "admin"))["state"] == "succeeded",
        10,
        "the first job",
    )
    stop_process(bus.procs[0])
    bus.coordinator(OPSBAY_SECRET="", OPSBAY_KEY_FILE=ids.file("coordinator"))
    watch = bus.watch("rejected")
    second = str(uuid.uuid4())
    publish(bus, "submit", sign(body(second), keyring, now, nonce))
    got = watch.wait_for(lambda t, b, r: b.get("job_id") == second, "the replay refused")
    assert got["code"] == "replay"


def test_worker_policy_named_commands_allowlist_and_clean_environment(bus: Bus) -> None:
    bus.coordinator()
    bus.worker(
        "n1", "--allow", "echo *", "--allow", "env", "--define", "backup=echo backing up",
        "--clean-env", OPSBAY_SECRET=bus.secret,
    )  # fmt: skip
    named = bus.cli("submit", "-t", "n1", "-c", "@backup", "--wait")
    assert (named.returncode, named.stdout) == (0, "backing up\n"), named.stderr
    allowed = bus.cli("submit", "-t", "n1", "-c", "echo hi", "--wait")
    assert (allowed.returncode, allowed.stdout) == (0, "hi\n")
    for command, code in (("uname -a", "command_not_allowed"), ("@nope", "unknown_command")):
        out = bus.cli("submit", "-t", "n1", "-c", command, "--wait", "--json")
        assert out.returncode == 77, out.stderr
        ex = json.loads(out.stdout)["executions"][0]
        assert ex["state"] == "rejected" and code in ex["reason"] and ex["stdout"] == ""
    env = bus.cli("submit", "-t", "n1", "-c", "env", "--wait").stdout
    names = {line.split("=", 1)[0] for line in env.splitlines()}
    assert {"PATH", "HOME", "OPSBAY_JOB_ID", "OPSBAY_NODE"} <= names
    assert not {"OPSBAY_SECRET", "OPSBAY_BROKER", "OPSBAY_PREFIX"} & names
    assert bus.secret not in env


def test_jobs_never_see_the_workers_secrets(running: Bus) -> None:
    out = running.cli("submit", "-t", "n1", "-c", "env", "--wait")
    assert out.returncode == 0
    assert running.secret not in out.stdout and "OPSBAY_SECRET" not in out.stdout


def test_run_as_another_user(bus: Bus) -> None:
    bus.coordinator()
    if os.geteuid() != 0:
        p = bus.start("worker-n1", "worker", "--node", "n1", "--run-as", "nobody")
        assert p.wait(30) == 78
        return
    bus.worker("n1", "--run-as", "nobody")
    out = bus.cli("submit", "-t", "n1", "-c", "id -un; echo $HOME", "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "nobody"


def test_no_secret_in_logs_help_or_results(bus: Bus, ids: Keys) -> None:
    bus.cli("submit", "-t", "n1", "-c", "echo x", "--wait", **as_(ids, "admin"))
    bus.cli("submit", "-t", "n1", "-c", "echo x", "--wait", OPSBAY_SECRET="a-wrong-secret")
    secrets_ = [
        line.split('"')[1]
        for line in Path(ids.file("coordinator")).read_text().splitlines()
        if line.startswith("secret")
    ]
    help_text = bus.cli("submit", "--help", OPSBAY_SECRET="s3cr3t-value").stdout
    assert "s3cr3t-value" not in help_text
    results = bus.cli("results", "--json", **as_(ids, "admin")).stdout
    for name in ("coordinator", "worker-n1", "worker-n2"):
        log = bus.log(name)
        assert log, name
        for s in [*secrets_, "a-wrong-secret"]:
            assert s not in log, f"a secret in the {name} log"
            assert s not in results


def test_live_output_a_client_cannot_verify_is_said_once_and_shown_at_the_end(
    bus: Bus, ids: Keys
) -> None:
    command = "for i in 1 2 3; do echo line $i; done; sleep 0.5; echo done"
    out = bus.cli("submit", "-t", "n1", "-c", command, "--wait", "--follow", **as_(ids, "admin"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "line 1\nline 2\nline 3\ndone\n"
    said = [ln for ln in out.stderr.splitlines() if "live output is signed" in ln]
    assert len(said) == 1, out.stderr


def test_a_node_gets_only_the_labels_the_coordinators_key_file_grants(
    bus: Bus, tmp_path: Path
) -> None:
    """A stolen node login and key must not attract jobs meant for another role by claiming
    its label (issue 12, 2): with per-identity keys the coordinator's [nodes.NAME] decides."""
    k = Keys(tmp_path)
    coordinator_file = tmp_path / "coordinator.toml"
    coordinator_file.write_text(
        coordinator_file.read_text() + '\n[nodes.n2]\nlabels = { role = "web" }\n'
    )
    bus.coordinator(**as_(k, "coordinator"))
    bus.worker("n1", "--label", "role=web", **as_(k, "n1"))  # claims it, is not granted it
    bus.worker("n2", "--label", "role=web", **as_(k, "n2"))

    def labels() -> dict[str, Any]:
        return {n["node"]: n for n in bus.cli_json("nodes", **as_(k, "admin"))}

    wait_until(lambda: "refused_labels" in labels().get("n1", {}), 15, "n1's info recorded")
    nodes = labels()
    assert (nodes["n1"]["labels"], nodes["n1"]["refused_labels"]) == ({}, {"role": "web"})
    assert nodes["n2"]["labels"] == {"role": "web"} and "refused_labels" not in nodes["n2"]
    out = bus.cli("submit", "--where", "role=web", "-c", "echo $OPSBAY_NODE", "--wait",
                  **as_(k, "admin"))  # fmt: skip
    assert (out.returncode, out.stdout) == (0, "[n2] n2\n"), out.stderr  # n2 only
    assert "not granted: role=web" in bus.cli("nodes", **as_(k, "admin")).stdout
    assert "n1 claims label(s) its key file entry does not grant" in bus.log("coordinator")
