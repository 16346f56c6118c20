"""What `opsbay watch` makes of the bus: which topics it subscribes to, which received messages
it can read (and whether their signature checked), which concern the job and node asked for, and
the line or lines each one becomes. Pure: the connection and the loop are in `cli.fleet`.

Whoever may publish to the broker chooses what these lines hold, so control characters in them
are shown escaped (a message must not drive the terminal), and `--json` lines are ASCII-only.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

from opsbay_mqtt import states
from opsbay_mqtt.cli.render import visible
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import (
    JobEvent,
    Message,
    NodeStatus,
    Output,
    Rejected,
    Topic,
    decode,
    decode_unverified,
    wire,
)
from opsbay_mqtt.signing import Keyring
from opsbay_mqtt.topics import JOB_ID_RE, Topics

log = logging.getLogger(__name__)

# What `--job` takes: a whole job id or the start of one.
JOB_PREFIX_RE = re.compile(r"[0-9a-f-]{1,36}")

# Every kind of topic watch reads (the messages each carries: `protocol.ON_TOPIC`).
_WATCHED = frozenset({"job_events", "node_status", "output"})


@dataclass(frozen=True)
class Seen:
    """One message a watcher received and could read; `verified` when its signature checked."""

    msg: Message
    verified: bool


def subscriptions(
    topics: Topics, job: str | None, node: str | None, output: bool
) -> list[tuple[str, int]]:
    """(topic filter, QoS) to subscribe to: job events and node status, and with `output` live
    output. A whole job id or a node narrows the filter; the start of an id cannot, so it
    subscribes to every job and `matches` picks."""
    # Topic filters with wildcards, which `Topics` does not build.
    exact_job = job if job is not None and JOB_ID_RE.fullmatch(job) else "+"
    level_node = node or "+"
    p = topics.prefix
    subs = [(f"{p}/jobs/{exact_job}", 1), (f"{p}/nodes/{level_node}/status", 1)]
    if output:
        subs.append((f"{p}/output/{level_node}/{exact_job}", 0))
    return subs


def read_message(
    topics: Topics, topic: str, payload: bytes, keyring: Keyring | None
) -> Seen | None:
    """Decode a job event, rejection, node status or output chunk; None for anything else,
    or for a message that does not name what its topic names."""
    try:
        where = topics.parse(topic)
    except Refused:
        return None
    return _decode(payload, keyring, where) if where[0] in _WATCHED else None


def _decode(payload: bytes, keyring: Keyring | None, topic: Topic) -> Seen | None:
    if keyring is not None:
        try:
            return Seen(decode(payload, keyring, topic=topic)[0], True)
        except Refused as e:
            if e.kid is not None:  # signed with a key we hold, and still wrong: not shown
                log.warning("ignored an invalid message: %s", e)
                return None
            # else: signed with a key we do not hold (or not signed): shown as unverified
    try:
        return Seen(decode_unverified(payload, topic=topic), False)
    except Refused as e:
        log.debug("ignored an unreadable message: %s", e)
        return None


def matches(seen: Seen, job: str | None, node: str | None) -> bool:
    """Whether a message concerns job `job` (a full id or its start) and node `node`."""
    m = seen.msg
    if isinstance(m, JobEvent):
        job_id: str | None = m.job.job_id
        nodes = {ex.node for ex in m.job.executions}
    elif isinstance(m, Rejected):
        job_id, nodes = m.job_id, set()
    elif isinstance(m, NodeStatus):
        job_id, nodes = None, {m.node}
    else:
        assert isinstance(m, Output)
        job_id, nodes = m.job_id, {m.node}
    if job is not None and not (job_id or "").startswith(job):
        return False
    return node is None or node in nodes


def clock(now: float) -> str:
    """`now` (epoch seconds) as local HH:MM:SS.mmm."""
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"


def human_lines(
    seen: Seen, now: float, full_ids: bool = False, node: str | None = None
) -> list[str]:
    """What `opsbay watch` prints for one message (an output chunk may take several lines)."""
    m = seen.msg
    head = clock(now) + ("" if seen.verified else " (unverified)")

    def jid(job_id: str | None) -> str:
        return "?" if job_id is None else job_id if full_ids else job_id[:8]

    if isinstance(m, JobEvent):
        execs = [ex for ex in m.job.executions if node is None or ex.node == node]
        parts = []
        for ex in execs:
            code = f" exit {ex.exit_code}" if ex.exit_code is not None else ""
            why = f" ({ex.reason})" if ex.reason and ex.state != "succeeded" else ""
            parts.append(f"{ex.node} {ex.state}{code}{why}")
        done = sum(n for s, n in m.counts.items() if states.is_terminal(s))
        what = f": {', '.join(parts)}" if parts else ""
        run = f" (schedule {m.job.schedule})" if m.job.schedule else ""
        return [
            visible(f"{head} job {jid(m.job.job_id)}{run} {m.job.state}{what} [{done}/{m.total}]")
        ]
    if isinstance(m, Rejected):
        return [visible(f"{head} job {jid(m.job_id)} rejected: {m.code}: {m.reason}")]
    if isinstance(m, NodeStatus):
        return [f"{head} node {m.node} {m.state}"]
    assert isinstance(m, Output)
    chunk = f"{head} job {jid(m.job_id)} [{m.node}]"
    out = [f"{chunk} {m.dropped} bytes dropped"] if m.dropped else []
    out += [visible(f"{chunk} {line}") for line in split_lines(m.data)]
    return out


def json_line(seen: Seen) -> str:
    """What `opsbay watch --json` prints: the message body (no auth, no sig) and `verified`."""
    body = wire(seen.msg)
    body["verified"] = seen.verified
    return json.dumps(body)


def split_lines(text: str) -> list[str]:
    """Output text as lines, split on `\\n` only; a final `\\n` ends the last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines
