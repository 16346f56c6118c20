"""A message as received, with no MQTT library attached: what the daemons' cores take in (the
coordinator never imports paho; `transport` makes these from paho's messages)."""

from __future__ import annotations

from typing import NamedTuple


class Inbound(NamedTuple):
    """A received message. `topic == CONNECTED` marks a reconnection instead."""

    topic: str
    payload: bytes
    retain: bool = False
    mid: int = 0
    qos: int = 0


CONNECTED = "$connected"
