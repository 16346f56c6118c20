"""Fuzzing the parsers that read what others wrote: topics, broker URLs, key files, policies.
Each either returns a value or raises the one error it documents; nothing else escapes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsbay_mqtt import keys, policy
from opsbay_mqtt.errors import ConfigError, Refused
from opsbay_mqtt.topics import Topics
from opsbay_mqtt.transport import BrokerURL

TOPICS = Topics("opsbay")
level = st.text(alphabet=st.characters(codec="utf-8"), max_size=70)


@given(st.lists(level, max_size=6).map("/".join))
def test_topic_parse_refuses_or_returns(topic: str) -> None:
    try:
        _kind, fields = TOPICS.parse(topic)
    except Refused as e:
        assert e.code in ("bad_topic", "bad_node_name", "bad_job_id")
        return
    for value in fields.values():  # what parse returns is always a single, plain level
        assert value and not set(value) & set("/+#")


@given(st.text(max_size=200))
def test_broker_url_parse_refuses_or_returns(url: str) -> None:
    try:
        parsed = BrokerURL.parse(url)
    except ConfigError:
        return
    assert parsed.host and 0 < parsed.port < 65536
    assert parsed.password is None or parsed.password not in str(parsed)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(text=st.text(max_size=400))
def test_key_file_load_refuses_with_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # a key file others can read is refused before its text is looked at
    try:
        keys.load(path)
    except ConfigError as e:
        assert "OPSBAY_KEY_FILE" in str(e)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[keys]]\nid='a'\nclient='c'\nsecret='00'\n", "64 lowercase hex"),
        ("[[keys]]\nid='a'\nclient='c'\nnode='n'\nsecret='" + "0" * 64 + "'\n", "exactly one"),
        ("[[keys]]\nid='default'\nclient='c'\nsecret='" + "0" * 64 + "'\n", "not 'default'"),
        ("[[keys]]\nid='a'\nclient='c/d'\nsecret='" + "0" * 64 + "'\n", "not a valid name"),
        ("[[keys]]\nid='a'\nclient='c'\nsecret='" + "0" * 64 + "'\n" * 1, ""),
        ("[other]\n", "unknown section"),
        ("[clients.ci]\ntargets='web-*'\n", "list of strings"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_key_file_errors_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    path.chmod(0o600)
    if not fragment:
        assert keys.load(path).keys[0][0] == "a"
        return
    with pytest.raises(ConfigError, match=fragment):
        keys.load(path)


def test_duplicate_key_ids_are_refused(tmp_path: Path) -> None:
    entry = "[[keys]]\nid='a'\nclient='c'\nsecret='" + "0" * 64 + "'\n"
    path = tmp_path / "keys.toml"
    path.write_text(entry + entry)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="appears twice"):
        keys.load(path)


@pytest.mark.parametrize(
    ("pattern", "command", "allowed"),
    [
        ("uptime", "uptime", True),
        ("uptime", "uptime; id", False),
        ("deploy-app *", "deploy-app v12", True),
        ("deploy-app *", "deploy-app v1 v2", False),
        ("deploy-app * *", "deploy-app v1 v2", True),
        ("deploy-app *", "deploy-app v12; rm -rf /", False),
        ("deploy-app *", "deploy-app $(id)", False),
        ("deploy-app *", "deploy-app `id`", False),
        ("deploy-app *", "deploy-app v1|sh", False),
        ("deploy-app *", "deploy-app v1>x", False),
        ("deploy-app *", "deploy-app 'a'", False),
        ("deploy-app *", "deploy-app v1\nid", False),
        ("systemctl restart ?ginx", "systemctl restart nginx", True),
        ("a.b", "aXb", False),  # no regex leaks through
    ],
)
def test_command_patterns(pattern: str, command: str, allowed: bool) -> None:
    assert policy.command_allowed([pattern], command) is allowed


@given(st.text(max_size=60), st.text(max_size=60))
def test_command_patterns_never_let_a_metacharacter_through_a_star(prefix: str, rest: str) -> None:
    pattern = prefix.replace("*", "").replace("?", "") + " *"
    command = pattern[:-1] + rest
    if policy.command_allowed([pattern], command):
        assert not set(rest) & set(" ;|&$`'\"<>()\n\\*?[]{}~!#")


@pytest.mark.parametrize(
    ("patterns", "node", "labels", "allowed"),
    [
        (["web-*"], "web-01", {}, True),
        (["web-*"], "db-01", {}, False),
        (["role=web"], "db-01", {"role": "web"}, True),
        (["role=web"], "db-01", {"role": "db"}, False),
        (["n1"], "n10", {}, False),
    ],
)
def test_target_patterns(
    patterns: list[str], node: str, labels: dict[str, str], allowed: bool
) -> None:
    assert policy.target_allowed(patterns, node, labels) is allowed


def test_worker_policy_resolves_named_and_refuses_the_rest() -> None:
    p = policy.WorkerPolicy(allow=("echo *",), named={"backup": "/usr/bin/backup --full"})
    assert p.resolve("@backup") == "/usr/bin/backup --full"
    assert p.resolve("echo hi") == "echo hi"
    for command, code in (("@nope", "unknown_command"), ("uname", "command_not_allowed")):
        with pytest.raises(Refused) as e:
            p.resolve(command)
        assert e.value.code == code
    only = policy.WorkerPolicy(named={"a": "true"}, named_only=True)
    with pytest.raises(Refused):
        only.resolve("true")
    with pytest.raises(ConfigError):
        policy.parse_named(["no-equals-sign"])
