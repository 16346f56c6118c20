"""The coordinator's record as an interface: what the coordinator and its queries need from a
store, whatever holds it (`store.Store` is SQLite; a second backend implements the same and
runs the same tests, tests/test_store.py).

The rules every backend keeps:
- Writes are batched: they take effect at `commit()`; `atomic()` makes one message's writes all
  or nothing inside the batch.
- Each operation is one statement or one transaction, and changes guard themselves: a nonce is
  remembered once (`remember_nonce` says whether it was new), a job is inserted once
  (`insert_job`), an execution changes only from the state it was read in (`write_execution`),
  a node's status only moves to a newer (session, seq). Each says whether it took effect: with
  several coordinators on one record, whichever commits a change publishes its consequences.
- `lock_job` holds a job against the other coordinators until the batch commits: read a job's
  executions after it, so the changes to one job are made by one coordinator at a time. A
  backend where two batches can wait on each other raises `Contention`; the caller rolls back
  and handles the batch again, message by message.
- Nothing is lost at `close()`: it commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from opsbay_mqtt.protocol import Execution, Job
from opsbay_mqtt.schedrecord import ScheduleTable


class Contention(Exception):
    """Another coordinator holds what this batch needs, and waits on what this batch holds
    (PostgreSQL's deadlock or serialization failure): roll back and handle the batch again."""


class Brief(NamedTuple):
    """An execution as the rollout sees it."""

    node: str
    state: str
    dispatched_ms: int | None


class Record(Protocol):
    schedules: ScheduleTable  # the schedules and their runs (one SQL text for both backends)

    # -- batches
    def atomic(self) -> AbstractContextManager[None]:
        """All of the block's writes, or none of them."""

    def commit(self) -> None: ...

    def rollback(self) -> None:
        """Undo the open batch (after `Contention`)."""

    def close(self) -> None: ...

    # -- nonces: a signed request is acted on once
    def remember_nonce(self, kid: str, nonce: str, ts: int) -> bool:
        """Record a nonce; False if it was already seen."""

    def forget_nonce(self, kid: str, nonce: str) -> None: ...

    def forget_nonces_before(self, ts: int) -> None: ...

    # -- jobs and executions
    def insert_job(self, job: Job) -> bool:
        """Record a new job (and the executions it holds); False if its id is recorded."""

    def claim(self, who: str) -> None:
        """Hold the name `who` (a coordinator's client id) for as long as this process has the
        record open; ConfigError if another process holds it (SQLite: the record's file lock
        already gives it one writer)."""

    def lock_job(self, job_id: str) -> bool:
        """Hold the job until the batch ends (see above); False if there is no such job."""

    def set_job_state(self, job_id: str, state: str) -> None: ...

    def write_execution(self, job_id: str, ex: Execution, before: str | None) -> bool:
        """Write the execution whole: new (`before` None), or only if it is still in the state
        `before`; whether it was written."""

    def write_executions(
        self, job_id: str, changes: Sequence[tuple[str | None, Execution]]
    ) -> set[str]:
        """`write_execution` for each (before, execution), in as few statements as the backend
        can (a job on 10,000 nodes is accepted in one); the nodes whose execution was written."""

    def get_job(self, job_id: str, executions: bool = True) -> Job | None: ...

    def execution(self, job_id: str, node: str) -> Execution | None: ...

    def state_counts(self, job_id: str) -> dict[str, int]: ...

    def has_held(self, job_id: str) -> bool:
        """Whether a rollout holds executions of the job back (pending, never dispatched)."""

    def briefs(self, job_id: str) -> list[Brief]: ...

    def list_jobs(
        self,
        *,
        node: str | None = None,
        state: str | None = None,
        schedule: str | None = None,
        limit: int = 20,
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


def open_record(url: str, data_dir: Path) -> Record:
    """The record `--store` / OPSBAY_STORE names: PostgreSQL for a postgresql:// (or
    postgres://) URL (`pgstore`, which needs the `postgresql` extra), SQLite `opsbay.db` under
    `data_dir` when it is empty (`store`); ConfigError for anything else. Each backend is
    imported only when chosen."""
    from opsbay_mqtt.errors import ConfigError

    if not url:
        from opsbay_mqtt.store import Store

        return Store(data_dir / "opsbay.db")
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() in ("postgresql", "postgres"):
        try:
            from opsbay_mqtt.pgstore import PgStore
        except ImportError as e:
            if (e.name or "").partition(".")[0] != "psycopg":
                raise
            raise ConfigError(
                "--store / OPSBAY_STORE: a PostgreSQL record needs psycopg: "
                "pip install 'opsbay-mqtt[postgresql]'"
            ) from None
        return PgStore(url)
    given = f"a {scheme}:// URL" if sep else "not a URL"  # never the text: it may hold a secret
    raise ConfigError(
        f"--store / OPSBAY_STORE: {given}; give postgresql://[user@]host[:port]/dbname, or "
        "nothing for SQLite (opsbay.db under --data-dir)"
    )
