"""Execution and job states, and the only transitions allowed between them (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

ExecState = Literal[
    "pending",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "expired",
    "cancelled",
    "lost",
    "rejected",
]
# A job is in the state of its worst execution (or `rejected` by the coordinator as a whole).
JobState = ExecState

EXEC_STATES: tuple[str, ...] = get_args(ExecState)
PENDING: ExecState = "pending"
RUNNING: ExecState = "running"
OPEN: tuple[ExecState, ...] = (PENDING, RUNNING)  # not terminal
JOB_STATES: tuple[str, ...] = get_args(JobState)
TERMINAL: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "expired", "cancelled", "lost", "rejected"}
)

_ALLOWED: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", *TERMINAL}),
    "running": frozenset(TERMINAL - {"expired", "rejected"}),
}

# When executions end differently, the job shows the worst: this order decides.
_SEVERITY = ("succeeded", "cancelled", "expired", "failed", "timed_out", "lost", "rejected")


def sql(*names: ExecState) -> str:
    """State names as SQL text, `'pending'` or `('pending', 'running')`: the SQL of the store
    and the ledger spells states only through this (names from this module, never input)."""
    assert all(n in EXEC_STATES for n in names), names
    quoted = ", ".join(f"'{n}'" for n in names)
    return quoted if len(names) == 1 else f"({quoted})"


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def can_move(current: str, new: str) -> bool:
    """Whether an execution in `current` may move to `new`. Terminal states never change."""
    return new in _ALLOWED.get(current, frozenset())


def job_state(exec_states: Iterable[str]) -> JobState:
    """Aggregate the states of a job's executions into the job's state."""
    states = list(exec_states)
    if not states:
        return "pending"
    if not all(is_terminal(s) for s in states):
        return "running" if any(s != "pending" for s in states) else "pending"
    worst = max(states, key=_SEVERITY.index)
    return worst  # type: ignore[return-value]
