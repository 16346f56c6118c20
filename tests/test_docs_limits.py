"""The limits docs/reliability.md promises are the ones the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opsbay_mqtt import ledger, livelog, runner, signing
from opsbay_mqtt.coordinator import CoordinatorConfig
from opsbay_mqtt.protocol import MAX_EXECUTIONS
from opsbay_mqtt.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")


def rows() -> dict[str, str]:
    found = re.search(r"<!-- limits:.*-->\n((?:\|.*\n)+)", DOC)
    assert found, "no limits table in docs/reliability.md"
    out = {}
    for line in found[1].splitlines()[2:]:
        what, default, _ = (c.strip() for c in line.strip().strip("|").split("|"))
        out[what] = default
    return out


def number(text: str) -> int:
    return int(text.replace(",", ""))


KIB, MIB = 1024, 1024 * 1024
DEFAULTS = CoordinatorConfig(topics=Topics("t"), keyring=signing.Keyring.shared("x"))
CONFIGS = ("mosquitto.conf", "production.conf", "docker.conf")


@pytest.mark.parametrize(
    ("what", "pattern", "in_code"),
    [
        ("stored jobs", r"(\d+) days .* ([\d,]+) finished jobs",
         (DEFAULTS.keep_days, DEFAULTS.keep_jobs)),
        ("open jobs per node", r"([\d,]+) ", (DEFAULTS.max_open_per_node,)),
        ("nodes per job", r"([\d,]+)", (MAX_EXECUTIONS,)),
        ("live output per job", r"(\d+) KiB/s \(bursts of (\d+) KiB\)",
         (livelog.RATE_BYTES_S // KIB, livelog.BURST_BYTES // KIB)),
        ("the worker's ledger", r"([\d,]+) finished", (ledger.DEFAULT_MAX_ENTRIES,)),
        ("output kept per stream", r"(\d+) KiB head \+ (\d+) KiB tail",
         (runner.DEFAULT_OUTPUT_CAP // KIB,) * 2),
        ("message size", r"(\d+) MiB", (signing.MAX_PAYLOAD_BYTES // MIB,)),
    ],
)  # fmt: skip
def test_each_documented_limit_is_the_codes(
    what: str, pattern: str, in_code: tuple[int, ...]
) -> None:
    found = re.search(pattern, rows()[what])
    assert found, f"{what}: {rows()[what]!r}"
    assert tuple(number(g) for g in found.groups()) == in_code


def test_the_broker_queue_is_what_every_shipped_config_sets() -> None:
    documented = number(re.search(r"([\d,]+) messages", rows()["broker queue per client"])[1])  # type: ignore[index]
    for name in CONFIGS:
        text = (ROOT / "mosquitto" / name).read_text(encoding="utf-8")
        assert re.search(rf"^max_queued_messages {documented}$", text, re.M), name
