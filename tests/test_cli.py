"""The CLI's plumbing: every command is found by the lazy loader, durations parse, and the
exit code of a usage error (2) and of a bad setting (78)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from opsbay_mqtt.cli import app as cli
from opsbay_mqtt.errors import ConfigError, UsageError


def test_every_command_is_in_the_lazy_loaders_map() -> None:
    for module in set(cli.COMMAND_MODULES.values()):
        importlib.import_module(f"opsbay_mqtt.cli.{module}")
    names = {c.name or c.callback.__name__ for c in cli.app.registered_commands}  # type: ignore[union-attr]
    names |= {g.name for g in cli.app.registered_groups if g.name}  # `opsbay store ...`
    assert names == set(cli.COMMAND_MODULES)


@pytest.mark.parametrize("command", sorted(cli.COMMAND_MODULES))
def test_each_command_has_help(command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "opsbay_mqtt", command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and f"opsbay_mqtt {command} [OPTIONS]" in out.stdout


def test_an_unknown_command_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, "-m", "opsbay_mqtt", "bogus"], capture_output=True)
    assert out.returncode == 2


@pytest.mark.parametrize(
    ("text", "seconds"), [("30", 30), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert cli.parse_duration(text, "--x") == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "1.5m", "5x", "m", "10 m"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--timeout"):
        cli.parse_duration(text, "--timeout")


@pytest.mark.parametrize("text", ["²", "³m", "٣s", "\uff11\uff10", "1" * 5000, "\udcff", "1e3"])
def test_durations_in_other_digits_or_too_long_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--start-by: .* is not a duration"):
        cli.parse_duration(text, "--start-by")


@pytest.mark.parametrize(
    ("text", "option", "says"),
    [
        ("8d", "--timeout", "at most 7d"),
        ("604801", "param 'timeout'", "at most 7d"),  # the Cronicle plugin's, too
        ("20000d", "--start-by", "at most 3650d"),
    ],
)
def test_durations_have_a_ceiling(text: str, option: str, says: str) -> None:
    with pytest.raises(UsageError, match=says):
        cli.parse_duration(text, option)
    assert cli.parse_duration("7d", option) == 604800


def test_a_usage_error_exits_2_and_a_setting_78() -> None:
    assert cli.exit_for(UsageError("--where", "bad")) == (2, "--where: bad")
    assert cli.exit_for(ConfigError("OPSBAY_NODE: bad")) == (78, "OPSBAY_NODE: bad")
