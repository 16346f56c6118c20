"""Answers to clients' queries (result, results, nodes), read from the store."""

from __future__ import annotations

import json
from typing import Any

from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import Job, Query, Reply, replace, wire
from opsbay_mqtt.record import Record
from opsbay_mqtt.topics import REPLY_ID_RE

# `results` lists many jobs in one reply: each stream is cut to its last this-many characters
# there (with `truncated` set); `result` gives a job's whole stored output.
LISTING_OUTPUT_CHARS = 200


# A reply or event must stay under the message limit (4 MiB) whatever the job printed.
JOB_BUDGET_BYTES = 3 * 1024 * 1024


def fit(job: Job, budget: int = JOB_BUDGET_BYTES) -> Job:
    """The job, with each execution's output cut to its tail (and marked truncated) when the
    whole would not fit in one message: jobs on thousands of nodes, or very noisy ones."""
    if not job.executions:
        return job
    # Cheap first: JSON spells a character in at most six, plus ~2 KiB around each execution.
    output = sum(len(x.stdout) + len(x.stderr) for x in job.executions)
    if 6 * output + 2048 * len(job.executions) + len(job.command) * 6 < budget:
        return job
    size = _json_size(job)
    if size <= budget:
        return job
    bare = [replace(x, stdout="", stderr="") for x in job.executions]
    overhead = _json_size(replace(job, executions=bare))
    # JSON may spell one character in up to six: leave room for the worst case.
    per_stream = max(0, (budget - overhead) // (12 * len(job.executions)))
    cut = [
        replace(
            x,
            stdout=x.stdout[-per_stream:] if per_stream else "",
            stderr=x.stderr[-per_stream:] if per_stream else "",
            truncated=x.truncated or len(x.stdout) > per_stream or len(x.stderr) > per_stream,
        )
        for x in job.executions
    ]
    return replace(job, executions=cut)


def _json_size(job: Job) -> int:
    return len(json.dumps(wire(job), separators=(",", ":")))


def answer(q: Query, store: Record) -> Reply:
    if q.query == "result":
        job = store.get_job(q.job_id) if q.job_id else None
        if job is None:
            return Reply(
                correlation=q.correlation, ok=False, code="not_found", error=f"no job {q.job_id!r}"
            )
        data: Any = wire(fit(job))
    elif q.query == "results":
        data, used = [], 0
        for job in store.list_jobs(node=q.node, state=q.state, schedule=q.schedule, limit=q.limit):
            listed = _listed(fit(job, JOB_BUDGET_BYTES // 4))
            used += len(json.dumps(listed))
            if used > JOB_BUDGET_BYTES and data:
                break  # the reply must fit in one message: fewer jobs than asked for
            data.append(listed)
    else:
        data = _fitted_nodes(
            [
                n
                for n in store.list_nodes()
                if (q.node_state is None or n["state"] == q.node_state)
                and all((n.get("labels") or {}).get(k) == v for k, v in q.where.items())
            ]
        )
    return Reply(correlation=q.correlation, ok=True, data=data)


def _fitted_nodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes, in one message whatever the fleet's size: with their `facts` while the reply
    fits in JOB_BUDGET_BYTES, without them (`facts: {}`) when it would not (about 3,000 nodes
    and up), and, beyond that, the first ones that fit, in name order."""
    if len(json.dumps(nodes)) <= JOB_BUDGET_BYTES:
        return nodes
    bare = [{**n, "facts": {}} if "facts" in n else n for n in nodes]
    out, used = [], 2
    for n in bare:
        used += len(json.dumps(n)) + 1
        if used > JOB_BUDGET_BYTES:
            break
        out.append(n)
    return out


def _listed(job: Job) -> dict[str, Any]:
    d = wire(job)
    if len(d["command"]) > LISTING_OUTPUT_CHARS:
        d["command"] = d["command"][:LISTING_OUTPUT_CHARS] + "..."
    for ex in d["executions"]:
        for stream in ("stdout", "stderr"):
            if len(ex[stream]) > LISTING_OUTPUT_CHARS:
                ex[stream] = ex[stream][-LISTING_OUTPUT_CHARS:]
                ex["truncated"] = True
    return d


def peek_reply(payload: bytes) -> tuple[str | None, str]:
    """Where to send the refusal of a query we could not accept, if it says."""
    try:
        obj = signing.parse(payload)
    except Refused:
        return None, ""
    reply_to, corr = obj.get("reply_to"), obj.get("correlation")
    if isinstance(reply_to, str) and REPLY_ID_RE.fullmatch(reply_to) and isinstance(corr, str):
        return reply_to, corr[:64]
    return None, ""
