"""render: the exit code of every job state, ISO times and the public JSON shape of a job."""

from __future__ import annotations

import json
from typing import Any

import pytest

from opsbay_mqtt.cli import render
from opsbay_mqtt.protocol import Execution, Job, wire
from opsbay_mqtt.states import JOB_STATES
from tests.helpers import sample_job

JOB = "6f1c2b1e-8a4d-4c3e-9f0a-1b2c3d4e5f60"
MS = 1_700_000_000_123


def job(state: str, *executions: Execution) -> Job:
    return sample_job(
        *executions, job_id=JOB, state=state, target="web", start_by_ms=MS + 60_000, submitted_ms=MS
    )


def ex(state: str, exit_code: int | None = None, node: str = "web") -> Execution:
    return Execution(node=node, state=state, exit_code=exit_code)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("j", "code"),
    [
        (job("succeeded", ex("succeeded", 0)), 0),
        (job("failed", ex("failed", 3)), 3),
        (job("failed", ex("failed", 1)), 1),
        (job("failed", ex("failed", 255)), 255),
        (job("failed", ex("failed", 137)), 137),
        (job("failed", ex("failed", None)), 1),
        (job("failed", ex("failed", 0)), 1),
        (job("failed", ex("failed", 256)), 1),
        (job("failed", ex("failed", -9)), 1),
        (job("failed"), 1),
        # several nodes: 1 when the worst outcome is a failure (their codes may differ)
        (job("failed", ex("succeeded", 0, "a"), ex("failed", 3, "b")), 1),
        (job("failed", ex("failed", None, "a"), ex("failed", 4, "b")), 1),
        (job("timed_out", ex("timed_out", 143)), 124),
        (job("rejected"), 77),
        (job("expired", ex("expired")), 68),
        (job("lost", ex("lost")), 70),
        (job("cancelled", ex("cancelled")), 80),
        (job("pending", ex("pending")), 75),
        (job("pending"), 75),
        (job("running", ex("running")), 75),
    ],
    ids=lambda v: f"{v.state}:{[x.exit_code for x in v.executions]}" if isinstance(v, Job) else "",
)
def test_exit_code(j: Job, code: int) -> None:
    assert render.exit_code(j) == code


def test_every_job_state_has_an_exit_code() -> None:
    codes = {state: render.exit_code(job(state)) for state in JOB_STATES}
    assert codes == {
        "pending": 75,
        "running": 75,
        "succeeded": 0,
        "failed": 1,
        "timed_out": 124,
        "expired": 68,
        "cancelled": 80,
        "lost": 70,
        "rejected": 77,
    }


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, None),
        (0, "1970-01-01T00:00:00.000Z"),
        (1, "1970-01-01T00:00:00.001Z"),
        (999, "1970-01-01T00:00:00.999Z"),
        (1_700_000_000_000, "2023-11-14T22:13:20.000Z"),
        (MS, "2023-11-14T22:13:20.123Z"),
        (951_782_400_000, "2000-02-29T00:00:00.000Z"),
    ],
)
def test_iso(ms: int | None, text: str | None) -> None:
    assert render.iso(ms) == text


def test_public_job_shape() -> None:
    full = Execution(
        node="web",
        state="failed",
        exit_code=3,
        stdout="out",
        stderr="err",
        stdout_bytes=3,
        stderr_bytes=3,
        truncated=False,
        dispatched_ms=MS,
        started_ms=MS + 1,
        finished_ms=MS + 21,
        duration_ms=20,
        reason="exit 3",
        host={"hostname": "web"},
    )
    d = render.public_job(job("failed", full, ex("pending", node="web-02")))
    json.dumps(d)  # plain JSON
    assert d["job_id"] == JOB
    assert d["state"] == "failed"
    assert d["submitted_at"] == "2023-11-14T22:13:20.123Z"
    assert d["start_by"] == "2023-11-14T22:14:20.123Z"
    assert "submitted_ms" not in d and "start_by_ms" not in d
    first, second = d["executions"]
    wanted = {
        "node": "web",
        "state": "failed",
        "exit_code": 3,
        "stdout": "out",
        "stderr": "err",
        "truncated": False,
        "dispatched_at": "2023-11-14T22:13:20.123Z",
        "started_at": "2023-11-14T22:13:20.124Z",
        "finished_at": "2023-11-14T22:13:20.144Z",
        "duration_ms": 20,
    }
    assert {k: first[k] for k in wanted} == wanted
    assert not [k for k in first if k.endswith("_ms") and k != "duration_ms"]
    pending: dict[str, Any] = {k: second[k] for k in wanted}
    assert pending == {
        "node": "web-02",
        "state": "pending",
        "exit_code": None,
        "stdout": "",
        "stderr": "",
        "truncated": False,
        "dispatched_at": None,
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
    }


def test_public_job_does_not_change_the_job() -> None:
    j = job("succeeded", ex("succeeded", 0))
    before = wire(j)
    render.public_job(j)
    assert wire(j) == before
