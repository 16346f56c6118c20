"""daemons: how a daemon subscribes when the broker says no."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from opsbay_mqtt import daemons
from opsbay_mqtt.errors import BrokerRefused
from opsbay_mqtt.transport import BrokerURL


class Refusing:
    """A connection whose broker fails the first `fails` subscriptions (SUBACK failure)."""

    def __init__(self, url: str, fails: int) -> None:
        self.url, self.client_id, self.fails, self.calls = BrokerURL.parse(url), "test", fails, 0

    def subscribe(self, topics: Any) -> None:
        self.calls += 1
        if self.calls <= self.fails:
            raise BrokerRefused("subscribe to", "t/x", "Unspecified error", 128, None)


def test_on_mqtt5_a_refused_subscription_is_a_refusal_at_once() -> None:
    conn = Refusing("mqtt://127.0.0.1:1", fails=1)
    with pytest.raises(BrokerRefused):
        daemons._subscribe(conn, [("t/x", 1)], threading.Event())  # type: ignore[arg-type]
    assert conn.calls == 1


def test_on_mqtt311_a_failed_subscription_is_tried_again_before_it_counts_as_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NATS fails subscriptions for a while under load or with a server down: a worker must not
    stop (exit 78, as for an ACL refusal) at the first failure; it does after the last try."""
    monkeypatch.setattr(daemons, "SUBSCRIBE_TRIES_311", 3)
    stop = threading.Event()
    monkeypatch.setattr(stop, "wait", lambda timeout=None: False)  # no pause between tries
    ok = Refusing("mqtt://127.0.0.1:1?version=3.1.1", fails=2)
    assert daemons._subscribe(ok, [("t/x", 1)], stop)  # type: ignore[arg-type]
    assert ok.calls == 3
    never = Refusing("mqtt://127.0.0.1:1?version=3.1.1", fails=99)
    with pytest.raises(BrokerRefused):
        daemons._subscribe(never, [("t/x", 1)], stop)  # type: ignore[arg-type]
    assert never.calls == 3
