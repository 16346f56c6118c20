"""One real Mosquitto for the whole session, on a free port with a generated config; one
isolated bus (topic prefix, secret, directories) per test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from opsbay_mqtt.cli.stack import INSTALL_HINT, find_mosquitto, stop_process
from tests import harness
from tests.harness import Broker, free_port
from tests.helpers import Bus

__all__ = ["free_port", "restart", "start_broker"]

# No time limit per generated example: on a busy 2-core machine hypothesis's default 200 ms
# deadline failed a pure parsing test at random (a timing is not what any test here asserts).
settings.register_profile("opsbay", deadline=None)
settings.load_profile("opsbay")


def start_broker(directory: Path, port: int | None = None) -> Broker:
    try:
        find_mosquitto()
    except Exception as e:  # fail, never skip: the suite is about delivery through a real broker
        pytest.fail(f"{e} (or run ./scripts/test.sh, which installs it: {INSTALL_HINT})")
    return harness.start_broker(directory, port)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("broker"))
    yield b
    stop_process(b.process)


@pytest.fixture
def bus(broker: Broker, tmp_path: Path) -> Iterator[Bus]:
    b = Bus(broker=broker, tmp=tmp_path)
    yield b
    b.stop()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Bus]:
    """A bus on a Mosquitto of its own, which the test may stop (`stop_process(bus.broker
    .process)`, a clean stop: Mosquitto saves its sessions) and start again (`restart`)."""
    bus = Bus(broker=start_broker(tmp_path / "own-broker"), tmp=tmp_path)
    try:
        yield bus
    finally:
        bus.stop()
        stop_process(bus.broker.process)


def restart(bus: Bus, *, keep_data: bool = True) -> None:
    """Start the bus's own broker again on the same port: with the sessions it saved, or with
    nothing at all (`keep_data=False`: its persistence file deleted first)."""
    stop_process(bus.broker.process)
    if not keep_data:
        for f in (bus.tmp / "own-broker" / "broker-data").glob("*"):
            f.unlink()
    bus.broker = start_broker(bus.tmp / "own-broker", port=bus.broker.port)


@pytest.fixture
def running(bus: Bus) -> Bus:
    """A bus with a coordinator and one worker, node `n1`."""
    bus.coordinator()
    bus.worker("n1")
    return bus


def pytest_report_header() -> str:
    return f"mosquitto: {shutil.which('mosquitto') or '/usr/sbin/mosquitto?'}"
