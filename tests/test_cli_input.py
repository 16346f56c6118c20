"""What was typed: every local check returns a valid value or refuses with a usage error that
names the option, before anything connects; bad usage exits 2, a bad setting 78; a password is
never shown; job output reaches a terminal escaped and a pipe byte for byte."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from opsbay_mqtt import models, protocol
from opsbay_mqtt.cli import args as cliargs
from opsbay_mqtt.cli import render
from opsbay_mqtt.cli.app import exit_for
from opsbay_mqtt.errors import ConfigError, UsageError
from opsbay_mqtt.protocol import Execution
from opsbay_mqtt.transport import BrokerURL
from tests.conftest import free_port
from tests.helpers import Bus, sample_job, wait_until

# Text as it reaches the CLI: any string, bytes that are not UTF-8 (lone surrogates, as Python
# decodes argv and the environment), digits of other scripts, and near misses of valid input.
typed = st.one_of(
    st.text(max_size=80),
    st.binary(max_size=40).map(os.fsdecode),
    st.sampled_from(
        ["", " ", "²", "³m", "٣", "\uff11\uff10", "10 m", "0", "0%", "1e3", "web-*/", "a,,b"]
    ),
    st.from_regex(r"[0-9]{1,14}[smhdSMHD%]?", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9*?][A-Za-z0-9._*?/#+ -]{0,70}", fullmatch=True),
)


def _submit_is_valid(**fields: Any) -> bool:
    """Whether the coordinator's model takes a submission with these fields."""
    body = {
        "job_id": str(uuid.uuid4()),
        "target": "n1",
        "command": "true",
        "timeout_s": 60,
        "start_by_ms": 1,
        **fields,
    }
    try:
        models.validate(protocol.Submit, {"v": 1, "type": "submit", **body})
    except ValueError:
        return False
    return True


def _refuses(check: Callable[[], object], option: str) -> bool:
    """True if `check` raised a usage error naming `option`; False if it returned."""
    try:
        check()
    except UsageError as e:
        assert str(e).startswith(f"{option}: "), str(e)
        assert e.option == option
        return True
    return False


@given(typed)
def test_durations_are_a_number_of_seconds_or_a_usage_error(text: str) -> None:
    if _refuses(lambda: cliargs.parse_duration(text, "--for"), "--for"):
        return
    seconds = cliargs.parse_duration(text, "--for")
    assert 1 <= seconds <= cliargs.MAX_DURATION_S
    assert re.fullmatch(r"[0-9]+[smhd]?", text.strip().lower())


@given(typed)
def test_a_timeout_is_what_the_protocol_takes_or_a_usage_error(text: str) -> None:
    if not _refuses(lambda: cliargs.parse_timeout(text), "--timeout"):
        assert _submit_is_valid(timeout_s=cliargs.parse_timeout(text))


@given(typed)
def test_a_target_is_checked_as_the_coordinator_checks_it(text: str) -> None:
    refused = _refuses(lambda: cliargs.check_target(text), "--target")
    assert refused == (not _submit_is_valid(target=text)), text


@given(st.lists(typed, max_size=40))
def test_labels_are_what_the_protocol_takes_or_a_usage_error(items: list[str]) -> None:
    if not _refuses(lambda: cliargs.parse_labels(items, "--where"), "--where"):
        assert _submit_is_valid(where=cliargs.parse_labels(items, "--where"))


@given(typed)
def test_node_names_and_job_ids_are_valid_or_a_usage_error(text: str) -> None:
    if not _refuses(lambda: cliargs.check_node(text, "--node"), "--node"):
        assert protocol.NODE_NAME_RE.fullmatch(text)
    if not _refuses(lambda: cliargs.check_job_id(text, "JOB_ID"), "JOB_ID"):
        assert _submit_is_valid(job_id=text)


@given(typed)
def test_rollout_limits_are_what_the_protocol_takes_or_a_usage_error(text: str) -> None:
    if not _refuses(lambda: cliargs.check_limit(text, "--batch", True), "--batch"):
        assert _submit_is_valid(batch=text)
    refused = _refuses(lambda: cliargs.check_limit(text, "--max-failures", False), "--max-failures")
    assert refused == (not _submit_is_valid(max_failures=text))


# Commands about the size limit (64 KiB of UTF-8), of 1- and 2-byte characters, maybe a NUL.
near_the_limit = st.tuples(
    st.sampled_from(["a", "é"]), st.integers(-2, 2), st.sampled_from(["", "\x00", "é"])
).map(lambda t: t[0] * (65536 // len(t[0].encode()) + t[1]) + t[2])


@given(st.one_of(typed, near_the_limit))
def test_a_command_is_what_the_protocol_takes_or_a_usage_error(text: str) -> None:
    if not _refuses(lambda: cliargs.check_command(text), "--command"):
        assert _submit_is_valid(command=text)


@given(st.binary(max_size=100) | near_the_limit.map(lambda t: t.encode()))
def test_a_command_read_from_a_file_is_utf8_within_the_limit(data: bytes) -> None:
    if not _refuses(lambda: cliargs.decode_command(data, "--command-file"), "--command-file"):
        assert _submit_is_valid(command=cliargs.decode_command(data, "--command-file"))


def test_the_repeated_limits_are_the_protocols() -> None:
    assert cliargs.TARGET_ITEM_RE.pattern == protocol.TARGET_ITEM_RE.pattern
    assert cliargs.MAX_TARGET_ITEMS == protocol.MAX_TARGET_ITEMS
    assert cliargs.MAX_TIMEOUT_S == protocol.MAX_TIMEOUT_S
    assert cliargs.MAX_COMMAND_BYTES == protocol.MAX_COMMAND_BYTES


def test_usage_errors_exit_2_and_settings_78() -> None:
    assert exit_for(UsageError("--timeout", "bad")) == (2, "--timeout: bad")
    assert exit_for(ConfigError("--broker / OPSBAY_BROKER: bad")) == (
        78,
        "--broker / OPSBAY_BROKER: bad",
    )


# -- the broker URL: a setting (78) whose password is never shown

MARK = "Zq7Xv"  # in passwords only: never in a URL's other parts, nor in any message


@given(
    scheme=st.sampled_from(["mqtt", "mqtts", "tcp", "ssl", "http", ""]),
    user=st.text(alphabet="abc-_.%:", max_size=6),
    password=st.lists(
        st.sampled_from([MARK, "/", "?", "#", "@", ":", "%", "%2", " ", "\udcff"])
        | st.text(max_size=4),
        min_size=1,
        max_size=6,
    )
    .map("".join)
    .filter(lambda p: MARK in p),
    host=st.sampled_from(["host", "10.0.0.1", "[::1]", "", "hóst", "h/x"]),
    port=st.sampled_from(["", ":1883", ":0", ":88x3", ":70000", ":²"]),
    tail=st.sampled_from(["", "/", "?version=3.1.1", "?v=1", "#x", "/path"]),
)
def test_a_broker_url_never_shows_its_password(
    scheme: str, user: str, password: str, host: str, port: str, tail: str
) -> None:
    url = f"{scheme}://{user}:{password}@{host}{port}{tail}"
    try:
        parsed = BrokerURL.parse(url)
    except ConfigError as e:
        assert MARK not in str(e), str(e)
        assert str(e).startswith("--broker / OPSBAY_BROKER: ")
        return
    assert MARK not in str(parsed) and MARK not in repr(str(parsed))
    assert parsed.port != 0


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mqtts://ci:TopSecret@host:88x3", "port that is not a number"),
        ("mqtt://host:0", "port 0"),
        ("mqtt://ci:Top#Secret@host", "%23"),
        ("mqtt://ci:Top/Secret@host:1883", "%2F"),
    ],
)
def test_a_bad_broker_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        BrokerURL.parse(url)
    assert "Secret" not in str(e.value)


def test_a_percent_encoded_password_is_taken() -> None:
    parsed = BrokerURL.parse("mqtts://ci:Top%23Se%2Fcret%40@host:8883")
    assert parsed.password == "Top#Se/cret@"
    assert str(parsed) == "mqtts://ci@host:8883"


# -- the commands: bad input fails before connecting, with the right code and a message

JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
SUBMIT = ("submit", "--target", "n1", "--command", "true")
CASES: list[tuple[tuple[str | bytes, ...], dict[str, str], int, str]] = [
    ((*SUBMIT, "--timeout", "²"), {}, 2, "--timeout: '²' is not a duration"),
    ((*SUBMIT, "--timeout", "8d"), {}, 2, "--timeout: '8d' is too long: at most 7d"),
    ((*SUBMIT, "--start-by", "³m"), {}, 2, "--start-by: '³m' is not a duration"),
    ((*SUBMIT, "--start-by", "20000d"), {}, 2, "--start-by: '20000d' is too long"),
    ((*SUBMIT, "--wait-timeout", "0"), {}, 2, "--wait-timeout"),
    ((*SUBMIT, "--ack-timeout", "x"), {}, 2, "--ack-timeout"),
    (SUBMIT, {"OPSBAY_ACK_TIMEOUT": "5x"}, 78, "--ack-timeout (from OPSBAY_ACK_TIMEOUT)"),
    (("watch", "--for", "²"), {}, 2, "--for: '²' is not a duration"),
    (("submit", "-t", "n1", "--command", ""), {}, 2, "--command: empty"),
    (("submit", "-t", "n1", "--command", b"echo \xff"), {}, 2, "--command: not valid UTF-8"),
    (("submit", "-t", "n1"), {}, 2, "--command"),
    (("submit", "-t", "n1", "-c", "x", "--command-file", "/dev/null"), {}, 2, "--command"),
    (("submit", "-t", "n1", "--command-file", "/nonexistent/cmd"), {}, 2, "--command-file"),
    (("submit", "-t", "n1", "--command-file", "/dev/null"), {}, 2, "--command-file: empty"),
    (("submit", "-t", "web-*/", "-c", "true"), {}, 2, "--target: 'web-*/' is not"),
    (("submit", "-t", "a,,b", "-c", "true"), {}, 2, "--target: an empty name"),
    (("submit", "-c", "true"), {}, 2, "--target"),
    ((*SUBMIT, "--where", "x"), {}, 2, "--where: 'x' is not KEY=VALUE"),
    ((*SUBMIT, "--where", b"k=\xff"), {}, 2, "--where: not valid UTF-8"),
    ((*SUBMIT, "--where", "k=" + "v" * 257), {}, 2, "at most 256"),
    ((*SUBMIT, *[a for i in range(33) for a in ("--where", f"k{i}=v")]), {}, 2, "at most 32"),
    ((*SUBMIT, "--batch", "abc"), {}, 2, "--batch: 'abc' is not a count"),
    ((*SUBMIT, "--batch", "0"), {}, 2, "--batch: '0': at least 1"),
    ((*SUBMIT, "--max-failures", "1.5"), {}, 2, "--max-failures"),
    ((*SUBMIT, "--job-id", JOB.upper()), {}, 2, "--job-id"),
    (("result", "not-a-uuid"), {}, 2, "JOB_ID: 'not-a-uuid' is not a job id"),
    (("result", b"\xff"), {}, 2, "JOB_ID"),
    (("cancel", "not-a-uuid"), {}, 2, "JOB_ID"),
    (("results", "--node", "a/#"), {}, 2, "--node: invalid node name 'a/#'"),
    (("nodes", "--where", "=x"), {}, 2, "--where"),
    (("watch", "--node", "a/b"), {}, 2, "--node"),
    (("worker", "--node", "bad/name"), {}, 2, "--node: invalid node name 'bad/name'"),
    (("worker", "--node", ""), {}, 2, "--node: empty"),
    (("worker",), {"OPSBAY_NODE": "bad/name"}, 78, "OPSBAY_NODE: invalid node name"),
    (("worker",), {"OPSBAY_NODE": ""}, 78, "OPSBAY_NODE is set but empty"),
    (("worker", "--node", "n1", "--label", "x"), {}, 2, "--label: 'x'"),
    (("worker", "--node", "n1", "--define", "bad"), {}, 2, "--define"),
    (("coordinator", "--allow-node", "a/b"), {}, 2, "--allow-node: invalid node name"),
    (("coordinator",), {"OPSBAY_ALLOW_NODES": "a/b"}, 78, "(from OPSBAY_ALLOW_NODES)"),
    (("results", "--broker", "mqtts://ci:TopSecret@host:88x3"), {}, 78, "ci:***@host"),
    (("results", "--broker", "mqtt://127.0.0.1:0"), {}, 78, "port 0"),
    (("results",), {"OPSBAY_BROKER": "mqtt://ci:Top#Secret@h"}, 78, "%23"),
    (("results",), {"OPSBAY_SECRET": ""}, 78, "no key"),
    (("results",), {"OPSBAY_SECRET": os.fsdecode(b"\xff")}, 78, "OPSBAY_SECRET: not valid UTF-8"),
    (
        ("results", "--broker", "mqtts://127.0.0.1:1", "--ca-file", "/etc/hostname"),
        {},
        78,
        "--ca-file / OPSBAY_CA_FILE /etc/hostname: not usable",
    ),
]


@pytest.mark.parametrize(("args", "env", "code", "says"), CASES, ids=lambda v: repr(v)[:60])
def test_bad_input_fails_before_connecting(
    tmp_path: Path, args: tuple[str | bytes, ...], env: dict[str, str], code: int, says: str
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OPSBAY_")}
    closed = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens: connecting would exit 69
    base.update(OPSBAY_BROKER=closed, OPSBAY_SECRET="s", OPSBAY_STATE_DIR=str(tmp_path))
    base.update(env)
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", *args],
        env=base,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    err = out.stderr.decode(errors="replace")
    assert (out.returncode, says in err) == (code, True), err
    assert "Traceback" not in err and "Secret" not in err


def test_a_long_command_comes_from_a_file_or_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opsbay_mqtt.cli.jobs import _command

    long = "echo é; " * 7000  # 63,000 bytes: more than a command line may hold
    path = tmp_path / "cmd"
    path.write_bytes(long.encode())
    assert _command(None, path) == long
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(long.encode())))
    assert _command("-", None) == long
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff")))
    with pytest.raises(UsageError, match="--command-file: not valid UTF-8"):
        _command(None, Path("-"))
    path.write_bytes(b"x" * 65537)
    with pytest.raises(UsageError, match="--command-file: more than 65536 bytes"):
        _command(None, path)


# -- what the commands print


def test_a_timed_out_job_says_the_exit_code_opsbay_exits_with() -> None:
    ex = Execution(node="n1", state="timed_out", exit_code=143, duration_ms=30_000)
    job = sample_job(ex, state="timed_out", timeout_s=30)
    assert render.exit_code(job) == 124
    summary = render.job_summary(job)
    assert "n1: timed_out (killed after the 30s timeout; exit 124)" in summary
    assert "143" not in summary


def test_control_characters_are_shown_escaped() -> None:
    text = "red \x1b[31mX\x1b[0m\r\n\tok \x07\x9b\x7f é"
    assert render.visible(text, keep_newlines=True) == (
        "red \\x1b[31mX\\x1b[0m\\x0d\n\tok \\x07\\x9b\\x7f é"
    )
    assert render.visible("a\nb") == "a\\x0ab"


def _on_a_terminal(bus: Bus, *args: str) -> tuple[int, bytes]:
    """Run `opsbay args` with stdout on a pseudo-terminal; (exit code, what it printed)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "opsbay_mqtt", *args],
        env=bus.env(),
        stdout=slave,
        stderr=subprocess.DEVNULL,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child is gone
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=60), out


def _piped(bus: Bus, *args: str) -> tuple[int, bytes]:
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", *args], env=bus.env(), capture_output=True, timeout=60
    )
    return out.returncode, out.stdout


def test_job_output_reaches_a_terminal_escaped_and_a_pipe_exactly(running: Bus) -> None:
    command = r"printf 'red \033[31mX\033[0m\r\n'"
    written = b"red \x1b[31mX\x1b[0m\r\n"
    escaped = b"red \\x1b[31mX\\x1b[0m\\x0d\r\n"  # the terminal turns \n into \r\n
    assert _piped(running, "submit", "-t", "n1", "-c", command, "--wait") == (0, written)
    job = running.cli("submit", "-t", "n1", "-c", command).stdout.strip()
    wait_until(lambda: running.cli("result", job).returncode == 0, 30, "the job done")
    code, shown = _piped(running, "result", job)
    assert code == 0 and b"--- stdout (n1)\n" + written in shown
    code, shown = _on_a_terminal(running, "result", job)
    assert code == 0 and escaped in shown and b"\x1b" not in shown, shown
    code, shown = _on_a_terminal(running, "submit", "-t", "n1", "-c", command, "--wait")
    assert code == 0 and escaped in shown and b"\x1b" not in shown, shown


def test_cancelling_an_unknown_job_exits_66_as_result_does(bus: Bus) -> None:
    bus.coordinator()
    unknown = str(uuid.uuid4())
    assert bus.cli("result", unknown).returncode == 66
    out = bus.cli("cancel", unknown)
    assert out.returncode == 66 and unknown in out.stderr, out.stderr
