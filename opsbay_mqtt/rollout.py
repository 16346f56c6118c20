"""Fan-out and rollout decisions (pure): which nodes a target names, how many executions may
be out at once, and when a rollout stops."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import MAX_EXECUTIONS
from opsbay_mqtt.topics import validate_node

# What counts against --max-failures: every way an execution can end other than success or
# being cancelled.
FAILURES = frozenset({"failed", "timed_out", "expired", "lost", "rejected"})


def needs_known(target: str, where: Mapping[str, str]) -> bool:
    """Whether resolving needs the known nodes (globs, labels, or no target): plain names don't."""
    return bool(where) or not target or "*" in target or "?" in target


def resolve(
    target: str, where: Mapping[str, str], known: Mapping[str, Mapping[str, str]]
) -> list[str]:
    """The nodes a submission names, in order, each once.

    `known` maps every node the coordinator has heard of to its labels. A plain name is taken
    as it is, known or not (its job waits for it); a glob matches known nodes only; labels
    (`where`) keep the nodes whose labels match all of them. With labels and no target, all
    known nodes are candidates. Nodes that appear later are not added.
    """
    chosen: list[str] = []
    if target:
        for item in target.split(","):
            if "*" in item or "?" in item:
                chosen.extend(sorted(n for n in known if fnmatch.fnmatchcase(n, item)))
            else:
                chosen.append(validate_node(item))
    else:
        chosen = sorted(known)
    if where:
        chosen = [n for n in chosen if all(known.get(n, {}).get(k) == v for k, v in where.items())]
    nodes = list(dict.fromkeys(chosen))
    if not nodes:
        what = " and ".join(
            p for p in (target and f"target {target!r}", where and f"labels {dict(where)}") if p
        )
        raise Refused("no_match", f"no known node matches {what}")
    if len(nodes) > MAX_EXECUTIONS:
        raise Refused("too_many_targets", f"{len(nodes)} nodes; at most {MAX_EXECUTIONS} per job")
    return nodes


def limit(spec: str | None, total: int, *, at_least_one: bool) -> int | None:
    """A count ("10") or a share ("25%") of `total`; None when there is no limit."""
    if spec is None:
        return None
    if spec.endswith("%"):
        share = total * int(spec[:-1]) / 100
        n = math.ceil(share) if at_least_one else math.floor(share)
    else:
        n = int(spec)
    return max(1, n) if at_least_one else n


@dataclass(frozen=True)
class Step:
    dispatch: list[str]  # nodes to send the job to now
    cancel: list[str]  # held-back nodes to cancel (the rollout stopped)


class Brief(Protocol):
    """What the rollout needs of an execution."""

    @property
    def node(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def dispatched_ms(self) -> int | None: ...


def is_held(x: Brief) -> bool:
    """Held back by the rollout: never sent to its node (`Store.has_held` asks the same)."""
    return x.state == "pending" and x.dispatched_ms is None


def next_step(execs: Iterable[Brief], batch: str | None, max_failures: str | None) -> Step:
    """What to do after a change: release held-back executions up to the batch size, or stop
    the rollout once failures exceed max-failures."""
    execs = list(execs)
    held = sorted(x.node for x in execs if is_held(x))
    if not held:
        return Step([], [])
    failures = sum(x.state in FAILURES for x in execs)
    allowed = limit(max_failures, len(execs), at_least_one=False)
    if allowed is not None and failures > allowed:
        return Step([], held)
    size = limit(batch, len(execs), at_least_one=True)
    out = sum(x.state in ("pending", "running") and x.dispatched_ms is not None for x in execs)
    room = len(held) if size is None else max(0, size - out)
    return Step(held[:room], [])
