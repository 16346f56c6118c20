"""`opsbay stack`: a whole bus on this machine, for trying it out. Mosquitto from the repository's
`mosquitto/mosquitto.conf`, the coordinator and one worker as child processes."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from opsbay_mqtt.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


def shipped_config(name: str = "mosquitto.conf") -> Path:
    """One of the repository's `mosquitto/` files: from the clone (or an editable install), else
    from the installed wheel, which carries them as the package data `opsbay_mqtt.mosquitto`."""
    clone = Path(__file__).resolve().parents[2] / "mosquitto" / name
    if clone.is_file():
        return clone
    from importlib.resources import files

    return Path(str(files("opsbay_mqtt.mosquitto") / name))


REPO_CONF = shipped_config()
INSTALL_HINT = "sudo apt-get install -y mosquitto mosquitto-clients"


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        raise ConfigError(f"mosquitto is not installed; install it with: {INSTALL_HINT}")
    return found


def broker_config(port: int, data_dir: Path, base: Path = REPO_CONF) -> str:
    """The shipped local config with this run's listener and persistence directory."""
    try:
        lines = base.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the broker config {base}: {e}") from e
    ours = ("listener", "persistence_location", "user ")
    kept = [ln for ln in lines if not ln.strip().startswith(ours)]
    # Started as root, mosquitto would switch to user `mosquitto` and fail to write our data dir.
    kept += [f"user {pwd.getpwuid(os.geteuid()).pw_name}", f"persistence_location {data_dir}/"]
    kept += [f"listener {port} 127.0.0.1"]
    return "\n".join(kept) + "\n"


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"mosquitto exited with code {proc.returncode} (see its log)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)  # polling a port that has no readiness signal, bounded by the deadline
    raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _children(directory: Path, port: int, node: str) -> Iterator[dict[str, str]]:
    logs = directory / "logs"
    for d in (logs, directory / "broker", directory / "data", directory / "state"):
        d.mkdir(parents=True, exist_ok=True)
    secret_file = directory / "secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32) + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    conf = directory / "mosquitto.conf"
    conf.write_text(broker_config(port, (directory / "broker").resolve()), encoding="utf-8")
    env = {
        **os.environ,
        "OPSBAY_BROKER": f"mqtt://127.0.0.1:{port}",
        "OPSBAY_SECRET_FILE": str(secret_file.resolve()),
        "OPSBAY_PREFIX": "opsbay",
    }
    env.pop("OPSBAY_SECRET", None)
    procs: list[subprocess.Popen[bytes]] = []
    try:

        def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed when the child ends
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
            out.close()
            procs.append(p)
            return p

        broker = start("mosquitto", [find_mosquitto(), "-c", str(conf.resolve())])
        wait_for_port(port, 10, broker)
        me = [sys.executable, "-m", "opsbay_mqtt"]
        start("coordinator", [*me, "coordinator", "--data-dir", str(directory / "data")])
        start("worker", [*me, "worker", "--node", node, "--state-dir", str(directory / "state")])
        yield env
    finally:
        for p in reversed(procs):  # worker, coordinator, then the broker
            stop_process(p)


def _opsbay(env: dict[str, str], *args: str) -> int:
    return subprocess.call([sys.executable, "-m", "opsbay_mqtt", *args], env=env)


def run_stack(*, port: int, directory: Path, node: str, once: bool) -> int:
    if not _port_free(port):
        raise ConfigError(f"--port: 127.0.0.1:{port} is already in use; pick another with --port")
    find_mosquitto()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with _children(directory, port, node) as env:
        print(f"opsbay stack: broker on 127.0.0.1:{port}, data under {directory}/", flush=True)
        if not _wait_online(env, node, 30):
            print(f"opsbay stack: node {node} did not come online; see {directory}/logs/")
            return 1
        _opsbay(env, "nodes")
        demo = 'echo "hello from $(hostname), via opsbay"'
        print(f"\n$ opsbay submit --target {node} --command '{demo}' --wait", flush=True)
        code = _opsbay(env, "submit", "--target", node, "--command", demo, "--wait")
        print(f"(exit code {code})\n", flush=True)
        if once:
            return code
        print(
            "The stack is up. In another shell:\n"
            f"  export OPSBAY_BROKER={env['OPSBAY_BROKER']}\n"
            f"  export OPSBAY_SECRET_FILE={env['OPSBAY_SECRET_FILE']}\n"
            f"  opsbay submit --target {node} --command 'uptime' --wait\n"
            "  opsbay results; opsbay nodes\n"
            f"  mosquitto_sub -p {port} -t 'opsbay/#' -v\n"
            "Press Ctrl-C to stop.",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        print("opsbay stack: stopping", flush=True)
    return 0


def _wait_online(env: dict[str, str], node: str, timeout_s: float) -> bool:
    """Ask the coordinator, over one connection, until the node reports online (bounded by
    `timeout_s`)."""
    from opsbay_mqtt.client import Client, ClientConfig
    from opsbay_mqtt.settings import BusOptions, resolve

    opts = BusOptions(
        broker=env["OPSBAY_BROKER"],
        secret_file=Path(env["OPSBAY_SECRET_FILE"]),
        prefix=env["OPSBAY_PREFIX"],
    )
    deadline = time.monotonic() + timeout_s
    with Client(ClientConfig.of(resolve(opts, "client"))) as client:
        while time.monotonic() < deadline:
            try:
                if any(n["node"] == node for n in client.nodes(2, node_state="online")):
                    return True
            except BrokerError:  # the coordinator is not answering yet
                continue
            time.sleep(0.2)  # polling another process's state, bounded by the deadline
    return False
