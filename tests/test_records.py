"""Records read from JSON (a job in an answer): how strictly `protocol.record` checks them."""

from __future__ import annotations

from typing import Any

import pytest

from opsbay_mqtt.protocol import Execution, Job, record, wire


def job_from_wire(data: object) -> Job:
    return record(Job, data)


def wire_job(**over: Any) -> dict[str, Any]:
    job = Job(
        job_id="8d3c1c52-6f0e-4f55-9d7c-2f4b7f1e9a10",
        state="running",
        target="web-*",
        command="uptime",
        timeout_s=600,
        start_by_ms=1_700_000_600_000,
        submitted_ms=1_700_000_000_000,
        submitted_by="ci",
        executions=[
            Execution(node="web-01", state="running", started_ms=1_700_000_000_100),
            Execution(node="web-02", state="succeeded", exit_code=0, stdout="up\n", host={"a": 1}),
        ],
    )
    return {**wire(job), **over}


def test_a_job_read_from_the_wire_is_the_job_that_was_sent() -> None:
    data = wire_job()
    job = job_from_wire(data)
    assert wire(job) == data
    assert job.executions[1] == Execution(
        node="web-02", state="succeeded", exit_code=0, stdout="up\n", host={"a": 1}
    )


def test_optional_fields_may_be_left_out() -> None:
    data = wire_job(executions=[{"node": "n1", "state": "pending"}])
    for name in ("where", "batch", "max_failures", "submitted_kid", "reason_code", "reason"):
        del data[name]
    job = job_from_wire(data)
    assert (job.where, job.batch, job.submitted_kid) == ({}, None, "")
    assert job.executions == [Execution(node="n1", state="pending")]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"state": "finished"}, "job.state"),  # not a state
        ({"timeout_s": "600"}, "job.timeout_s"),  # a string is not a count
        ({"timeout_s": True}, "job.timeout_s"),  # nor is a flag
        ({"timeout_s": 1.5}, "job.timeout_s"),
        ({"batch": 10}, "job.batch"),
        ({"where": {"role": 1}}, "job.where"),
        ({"where": ["role=web"]}, "job.where"),
        ({"executions": {"node": "n1"}}, "job.executions"),
        ({"executions": ["n1"]}, "job.executions.0"),
        ({"executions": [{"node": "n1"}]}, "job.executions.0.state: missing"),
        ({"executions": [{"node": "n1", "state": "pending", "pid": 4}]}, "0.pid: unknown field"),
        ({"executions": [{"node": "n1", "state": "pending", "truncated": 1}]}, "truncated"),
        ({"surprise": 1}, "job.surprise: unknown field"),
    ],
)
def test_a_malformed_job_is_refused_with_where_it_is_wrong(
    change: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValueError) as caught:
        job_from_wire(wire_job(**change))
    assert says in str(caught.value)


@pytest.mark.parametrize("missing", ["job_id", "state", "command", "submitted_by"])
def test_a_job_without_a_required_field_is_refused(missing: str) -> None:
    data = wire_job()
    del data[missing]
    with pytest.raises(ValueError, match=rf"job\.{missing}: missing"):
        job_from_wire(data)


@pytest.mark.parametrize("data", [None, [], "job", 7])
def test_a_job_that_is_not_an_object_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match="an object was expected"):
        job_from_wire(data)
