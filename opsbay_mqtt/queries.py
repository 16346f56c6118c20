"""Answers to clients' queries (result, results, nodes), read from the store."""

from __future__ import annotations

from typing import Any

from opsbay_mqtt import signing
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import Job, Query, Reply
from opsbay_mqtt.store import Store
from opsbay_mqtt.topics import REPLY_ID_RE

# `results` lists many jobs in one reply: each stream is cut to its last this-many characters
# there (with `truncated` set); `result` gives a job's whole stored output.
LISTING_OUTPUT_CHARS = 200


def answer(q: Query, store: Store) -> Reply:
    if q.query == "result":
        job = store.get_job(q.job_id) if q.job_id else None
        if job is None:
            return Reply(
                correlation=q.correlation, ok=False, code="not_found", error=f"no job {q.job_id!r}"
            )
        data: Any = job.model_dump(mode="json")
    elif q.query == "results":
        jobs = store.list_jobs(node=q.node, state=q.state, limit=q.limit)
        data = [_listed(j) for j in jobs]
    else:
        data = [
            n
            for n in store.list_nodes()
            if (q.node_state is None or n["state"] == q.node_state)
            and all((n.get("labels") or {}).get(k) == v for k, v in q.where.items())
        ]
    return Reply(correlation=q.correlation, ok=True, data=data)


def _listed(job: Job) -> dict[str, Any]:
    d = job.model_dump(mode="json")
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
