"""`opsbay keys` as a user runs it: the mosquitto_passwd steps it prints, run as printed against
a new password file, give a login that a Mosquitto using that file accepts; --append and the
text agree; a coordinator and a watcher get a login without a key."""

from __future__ import annotations

import os
import pwd
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from opsbay_mqtt import keys
from opsbay_mqtt.cli.stack import find_mosquitto, wait_for_port
from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.keys import new_key_instructions
from tests.conftest import free_port
from tests.helpers import stop_process
from tests.test_e2e_broker_security import NOT_AUTHORIZED, Peer


def opsbay_keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opsbay_mqtt", "keys", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def login_steps(text: str) -> str:
    """The shell lines of the password-file step, as printed (without chgrp: no such group
    need exist here)."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("#      touch "))
    block = []
    for ln in lines[start:]:
        if not ln.startswith("#      "):
            break
        block.append(ln[len("#      ") :])
    assert block[-1].startswith("chgrp mosquitto "), block
    return "\n".join(block[:-1]) + "\n"


def password_in(text: str, user: str) -> str:
    url = next(ln for ln in text.splitlines() if f"OPSBAY_BROKER=mqtts://{user}:" in ln)
    return url.split(f"mqtts://{user}:", 1)[1].split("@", 1)[0]


def start_broker(port: int, passwd: Path) -> subprocess.Popen[bytes]:
    conf = passwd.parent / "mosquitto.conf"
    me = pwd.getpwuid(os.geteuid()).pw_name  # as root it would drop to `mosquitto`: no access
    conf.write_text(
        f"allow_anonymous false\npassword_file {passwd}\nuser {me}\nlistener {port} 127.0.0.1\n"
    )
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_port(port, 10, proc)
    return proc


def run_steps(script: str, cwd: Path) -> None:
    out = subprocess.run(["sh", "-eu", "-c", script], cwd=cwd, capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr


def test_the_printed_steps_make_logins_a_broker_accepts_starting_from_no_file(
    tmp_path: Path,
) -> None:
    passwd = tmp_path / "passwd"
    made = {}
    for args, user in (
        (("coordinator",), "coordinator"),
        (("node", "web-01"), "web-01"),
        (("client", "ci"), "ci"),
        (("watcher", "dash"), "dash"),
    ):
        out = opsbay_keys(*args, "--passwd-file", str(passwd))
        assert out.returncode == 0, out.stderr
        script = login_steps(out.stdout)
        assert " -b " not in script and " -c " not in script, script
        run_steps(script, tmp_path)  # the first run creates the file, the others add to it
        made[user] = password_in(out.stdout, user)
    # Again for web-01: a new password replaces the old one (rotation), no second line.
    out = opsbay_keys("node", "web-01", "--passwd-file", str(passwd))
    run_steps(login_steps(out.stdout), tmp_path)
    old_web01, made["web-01"] = made["web-01"], password_in(out.stdout, "web-01")
    users = [ln.split(":", 1)[0] for ln in passwd.read_text().splitlines()]
    assert sorted(users) == sorted(made), users
    assert not any(pw in passwd.read_text() for pw in made.values()), "stored in clear"

    port = free_port()
    proc = start_broker(port, passwd)
    try:
        for user, password in [*made.items(), ("web-01", old_web01)]:
            p = Peer(port, user, password)
            try:
                assert p.connack is not None
                if password == old_web01:
                    assert p.connack.value == NOT_AUTHORIZED, p.connack
                else:
                    assert not p.connack.is_failure, (user, p.connack)
            finally:
                p.close()
    finally:
        stop_process(proc)


def test_append_writes_the_entry_once_and_the_text_says_so(tmp_path: Path) -> None:
    coordinator = tmp_path / "coordinator-keys.toml"
    out = opsbay_keys("node", "web-01", "--append", str(coordinator))
    assert out.returncode == 0, out.stderr
    assert coordinator.stat().st_mode & 0o777 == 0o600
    assert f"Appended to {coordinator}" in out.stdout and "do not add it there" in out.stdout
    assert "Add this entry to the coordinator's key file" not in out.stdout
    loaded = keys.load(coordinator)
    assert [(w.kind, w.name) for _, w, _ in loaded.keys] == [("node", "web-01")]
    # The printed text minus its comments is the same entry: a valid key file of its own.
    again = tmp_path / "from-output.toml"
    again.write_text(out.stdout)
    again.chmod(0o600)
    assert keys.load(again).keys == loaded.keys


def test_without_append_the_text_says_to_add_the_entry(tmp_path: Path) -> None:
    out = opsbay_keys("client", "ci")
    assert out.returncode == 0, out.stderr
    assert "Add this entry to the coordinator's key file" in out.stdout
    assert "Appended" not in out.stdout


@pytest.mark.parametrize(("args", "acl"), [
    (("watcher", "dash"), "topic read opsbay/#"),
    (("coordinator",), "topic readwrite opsbay/#"),
])  # fmt: skip
def test_a_coordinator_or_watcher_gets_a_login_and_its_acl_but_no_key(
    args: tuple[str, ...], acl: str
) -> None:
    out = opsbay_keys(*args)
    assert out.returncode == 0, out.stderr
    assert "[[keys]]" not in out.stdout and acl in out.stdout
    refused = opsbay_keys(*args, "--append", "/nonexistent/never-written.toml")
    assert refused.returncode == 78 and "no key" in refused.stderr, refused.stderr


def test_a_watcher_needs_a_name() -> None:
    out = opsbay_keys("watcher")
    assert out.returncode != 0 and "needs a NAME" in out.stderr, out.stderr


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o666])
def test_a_key_or_secret_file_others_can_read_or_change_is_refused(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(keys.key_entry("a", "client", "c", secrets.token_hex(32)))
    path.chmod(mode)
    with pytest.raises(ConfigError) as e:
        keys.load(path)
    said = str(e.value)
    assert str(path) in said and f"{mode:04o}" in said and f"chmod 600 {path}" in said, said
    path.chmod(0o600)
    assert keys.load(path).keys[0][0] == "a"


def test_the_cli_refuses_an_unprotected_secret_file_naming_it(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o644)
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", "nodes", "--secret-file", str(secret)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 78, out.stderr
    assert "--secret-file / OPSBAY_SECRET_FILE" in out.stderr and "0644" in out.stderr
    assert f"chmod 600 {secret}" in out.stderr, out.stderr


@pytest.mark.parametrize(
    ("kind", "name", "passwd", "port"),
    [
        ("node", "web-01", "passwd-daemons", 8883),
        ("coordinator", None, "passwd-daemons", 8883),
        ("client", "ci", "passwd-clients", 8884),
        ("watcher", "dash", "passwd-clients", 8884),
    ],
)
def test_each_login_goes_to_its_listeners_password_file_and_port(
    kind: str, name: str | None, passwd: str, port: int
) -> None:
    text, _ = new_key_instructions(kind, name)
    assert f"/etc/mosquitto/opsbay/{passwd} " in text
    assert f"@BROKER:{port}" in text


def test_a_daemon_login_may_not_look_like_a_client_id() -> None:
    with pytest.raises(Refused, match="may not start with opsbay-"):
        new_key_instructions("node", "opsbay-web")


def test_append_never_writes_a_secret_into_a_file_others_may_read(tmp_path: Path) -> None:
    loose = tmp_path / "keys.toml"
    loose.write_text("")
    loose.chmod(0o644)
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", "keys", "node", "web-01", "--append", str(loose)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 78 and "chmod 600" in out.stderr, out.stderr
    assert loose.read_text() == ""
