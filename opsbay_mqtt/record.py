"""The coordinator's record as an interface: what the coordinator and its queries need from a
store, whatever holds it (`store.Store` is SQLite; a second backend implements the same and
runs the same tests, tests/test_store.py).

The rules every backend keeps:
- Writes are batched: they take effect at `commit()`; `atomic()` makes one message's writes all
  or nothing inside the batch.
- Each operation is one statement or one transaction, and changes guard themselves: a nonce is
  remembered once (`remember_nonce` says whether it was new), a node's status only moves to a
  newer (session, seq), an execution row is written whole.
- Nothing is lost at `close()`: it commits.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from opsbay_mqtt.records import Execution, Job


class Brief(NamedTuple):
    """An execution as the rollout sees it."""

    node: str
    state: str
    dispatched_ms: int | None


class Record(Protocol):
    # -- batches
    def atomic(self) -> AbstractContextManager[None]:
        """All of the block's writes, or none of them."""

    def commit(self) -> None: ...

    def close(self) -> None: ...

    # -- nonces: a signed request is acted on once
    def remember_nonce(self, kid: str, nonce: str, ts: int) -> bool:
        """Record a nonce; False if it was already seen."""

    def forget_nonce(self, kid: str, nonce: str) -> None: ...

    def forget_nonces_before(self, ts: int) -> None: ...

    # -- jobs and executions
    def insert_job(self, job: Job) -> None: ...

    def set_job_state(self, job_id: str, state: str) -> None: ...

    def upsert_execution(self, job_id: str, ex: Execution) -> None: ...

    def get_job(self, job_id: str, executions: bool = True) -> Job | None: ...

    def execution(self, job_id: str, node: str) -> Execution | None: ...

    def state_counts(self, job_id: str) -> dict[str, int]: ...

    def has_held(self, job_id: str) -> bool:
        """Whether a rollout holds executions of the job back (pending, never dispatched)."""

    def briefs(self, job_id: str) -> list[Brief]: ...

    def list_jobs(
        self, *, node: str | None = None, state: str | None = None, limit: int = 20
    ) -> list[Job]:
        """Newest first."""

    def overdue(self, now_ms: int, grace_ms: int) -> list[tuple[str, str]]:
        """(job, node) past start-by + grace while pending, or start + timeout + grace while
        running."""

    def redispatchable(self, now_ms: int, node: str | None = None) -> list[tuple[str, str]]:
        """(job, node) dispatched and not started, within start-by."""

    def open_count(self, node: str) -> int: ...

    def prune(self, *, before_ms: int, keep: int) -> int:
        """Delete finished jobs older than `before_ms` or beyond the newest `keep`; how many."""

    def count_terminal(self) -> int: ...

    # -- nodes
    def node_seen(
        self,
        node: str,
        now_ms: int,
        *,
        state: str | None = None,
        session: int | None = None,
        seq: int = 0,
        info: dict[str, Any] | None = None,
        kid: str | None = None,
    ) -> bool:
        """Record that the node was heard from; True if `state` was recorded."""

    def node_conflict(self, node: str, now_ms: int, text: str, session: int) -> None: ...

    def node_kid(self, node: str) -> str | None: ...

    def node_labels_all(self) -> dict[str, dict[str, str]]: ...

    def node_labels(self, node: str) -> dict[str, str]: ...

    def list_nodes(self) -> list[dict[str, Any]]: ...
