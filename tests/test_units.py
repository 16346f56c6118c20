"""The shipped systemd units: `systemd-analyze verify` accepts them without a warning, and
`systemd-analyze security` rates them below the exposure documented in systemd/README.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
# The most exposure each unit may reach (systemd/README.md): the coordinator runs no jobs and has
# every restriction; the worker's restrictions are its jobs' too, so it keeps fewer.
MAX_EXPOSURE = {"opsbay-coordinator.service": 2.0, "opsbay-worker@.service": 3.0}
SHIPPED_BINARY = "/opt/opsbay/.venv/bin/opsbay"


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):  # CI checks the shipped units: never skip it there
            pytest.fail("systemd-analyze is not installed (Debian: apt-get install systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def local_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's `opsbay` (verify checks that the
    binary exists), under the same file name."""
    text = (UNITS / unit).read_text(encoding="utf-8")
    assert text.count(SHIPPED_BINARY) == 1, f"{unit}: expected one ExecStart with {SHIPPED_BINARY}"
    opsbay = Path(sys.executable).parent / "opsbay"
    assert opsbay.is_file(), f"no {opsbay}: is the package installed in this venv?"
    copy = tmp_path / unit
    copy.write_text(text.replace(SHIPPED_BINARY, str(opsbay)), encoding="utf-8")
    return copy


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_systemd_analyze_verify_accepts_the_unit_without_a_word(unit: str, tmp_path: Path) -> None:
    tool = analyze()
    copy = local_copy(unit, tmp_path)
    out = subprocess.run(
        [tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
    )
    # An unknown or misspelt setting is only a warning ("Unknown key ..., ignoring"), exit 0.
    assert (out.returncode, out.stderr, out.stdout) == (0, "", ""), out.stderr


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_systemd_analyze_security_rates_the_unit_below_its_threshold(
    unit: str, tmp_path: Path
) -> None:
    tool = analyze()
    copy = local_copy(unit, tmp_path)
    out = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out.stdout)
    assert found, out.stdout
    assert float(found[1]) < MAX_EXPOSURE[unit], out.stdout


def test_the_unit_that_the_readme_printed_is_what_the_check_calls_unsafe(tmp_path: Path) -> None:
    """The check can fail: the README's old unit (password in Environment=, no sandbox)."""
    tool = analyze()
    old = tmp_path / "old-worker.service"
    old.write_text(
        "[Service]\nExecStart=/bin/true\nUser=opsbay\n"
        "Environment=OPSBAY_BROKER=mqtts://w:PASSWORD@broker.example:8883\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(old)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out.stdout)
    assert found and float(found[1]) > 9.0, out.stdout


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_no_secret_sits_in_the_world_readable_unit(unit: str) -> None:
    text = (UNITS / unit).read_text(encoding="utf-8")
    settings = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert not [ln for ln in settings if ln.startswith("Environment=")], settings
    assert "EnvironmentFile=/etc/opsbay/" in text and "LoadCredential=opsbay-keys:" in text
    assert "RestartPreventExitStatus=78" in settings and "StateDirectory=" in text


def test_the_worker_instance_is_its_node_name_state_folder_and_files() -> None:
    text = (UNITS / "opsbay-worker@.service").read_text(encoding="utf-8")
    assert "--node %i --state-dir /var/lib/opsbay/%i " in text
    for line in (
        "StateDirectory=opsbay/%i",
        "EnvironmentFile=/etc/opsbay/worker-%i.env",
        "KillMode=mixed",
    ):
        assert line in text.splitlines(), line
