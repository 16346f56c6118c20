"""states: the allowed execution transitions and the aggregation of a job's state."""

from __future__ import annotations

import pytest

from opsbay_mqtt.states import EXEC_STATES, JOB_STATES, TERMINAL, can_move, is_terminal, job_state

ENDINGS = ["succeeded", "failed", "timed_out", "expired", "cancelled", "lost"]


@pytest.mark.parametrize(
    ("current", "new", "allowed"),
    [
        ("pending", "running", True),
        ("pending", "succeeded", True),
        ("pending", "failed", True),
        ("pending", "timed_out", True),
        ("pending", "expired", True),
        ("pending", "cancelled", True),
        ("pending", "lost", True),
        ("pending", "pending", False),
        ("pending", "rejected", True),  # refused by the worker's policy
        ("running", "succeeded", True),
        ("running", "failed", True),
        ("running", "timed_out", True),
        ("running", "cancelled", True),
        ("running", "lost", True),
        ("running", "expired", False),
        ("running", "running", False),
        ("running", "pending", False),
        ("running", "rejected", False),
        ("pending", "bogus", False),
        ("bogus", "running", False),
    ],
)
def test_can_move(current: str, new: str, allowed: bool) -> None:
    assert can_move(current, new) is allowed


@pytest.mark.parametrize("current", sorted(TERMINAL))
@pytest.mark.parametrize("new", JOB_STATES)
def test_terminal_states_never_move(current: str, new: str) -> None:
    assert not can_move(current, new)


def test_terminal_set() -> None:
    assert set(TERMINAL) == {*ENDINGS, "rejected"}
    assert set(EXEC_STATES) == {"pending", "running", *ENDINGS, "rejected"}
    assert set(JOB_STATES) == set(EXEC_STATES)
    assert [s for s in JOB_STATES if is_terminal(s)] == [s for s in JOB_STATES if s in TERMINAL]
    assert not is_terminal("pending") and not is_terminal("running")


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], "pending"),
        (["pending"], "pending"),
        (["pending", "pending"], "pending"),
        (["running"], "running"),
        (["pending", "running"], "running"),
        (["pending", "succeeded"], "running"),
        (["running", "failed"], "running"),
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "cancelled"], "cancelled"),
        (["cancelled", "expired"], "expired"),
        (["succeeded", "expired"], "expired"),
        (["expired", "failed"], "failed"),
        (["succeeded", "failed"], "failed"),
        (["failed", "timed_out"], "timed_out"),
        (["timed_out", "lost"], "lost"),
        (["lost", "succeeded", "failed", "timed_out"], "lost"),
        (ENDINGS, "lost"),
    ],
)
def test_job_state(states: list[str], expected: str) -> None:
    assert job_state(states) == expected
    assert job_state(reversed(states)) == expected
    assert job_state(iter(states)) == expected


@pytest.mark.parametrize("state", ENDINGS)
def test_job_state_of_one_ended_execution_is_its_state(state: str) -> None:
    assert job_state([state]) == state
    assert job_state([state, "succeeded"]) == state
