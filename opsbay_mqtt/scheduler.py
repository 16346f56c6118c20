"""The coordinator's schedules: the changes clients ask for, the runs of due times, and the
answers to schedule queries. Every run is an ordinary job (`Coordinator.start`), made with the
authority of the schedule's owner as it stands at that moment.

Whose authority: a schedule belongs to the client identity that added it. At every run the
owner's policy (`[clients.NAME]` in the key file) is checked again, for the nodes the target
resolves to then; and if no key of the owner is left in the key file (the client was removed),
the run is refused and recorded as such (`owner_removed`): removing a client's key stops its
schedules, visibly (`schedule check`), without deleting them. A key rotated within the same
identity keeps them running.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from opsbay_mqtt import rollout, schedules, states
from opsbay_mqtt.errors import Refused
from opsbay_mqtt.protocol import (
    Execution,
    Job,
    Query,
    Reply,
    Schedule,
    ScheduleChange,
    ScheduleRun,
    fields_of,
    wire,
)
from opsbay_mqtt.queries import JOB_BUDGET_BYTES, LISTING_OUTPUT_CHARS
from opsbay_mqtt.schedrecord import ScheduleTable
from opsbay_mqtt.signing import Auth, Identity
from opsbay_mqtt.topics import new_job_id

if TYPE_CHECKING:
    from opsbay_mqtt.coordinator import Coordinator

log = logging.getLogger(__name__)

# Change ids are remembered where nonces are, under this key id (no key id holds a "#").
CHANGE_KID = "#schedule-change"
DUE_PER_TICK = 200  # schedules handled per deadline check; the rest at the next one
KEEP_RUNS = 1000  # per schedule, within the retention age
# A run not started this long after it was recorded has its dispatch sent again, once, by
# every coordinator (checked every OWED_CHECK_S, for runs up to OWED_WINDOW_S old).
OWED_AFTER_S, OWED_CHECK_S, OWED_WINDOW_S = 5, 5.0, 120
MAX_SHOWN_RUNS = 100  # runs in one `schedule` answer


class _Taken(Exception):
    """Another coordinator handled this due time first: nothing of it is kept here."""


class Scheduler:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        # When the next run is to start, as last read (after each tick and each change): the
        # loop wakes for it (`wake_in_s`, `due_now`) rather than at its next regular tick, if
        # it was ahead when read (one already past is another coordinator's, or came back
        # from a failure: the regular tick handles it without spinning), or at once when a
        # tick left due schedules over (`_more`).
        self.next_fire_ms: int | None = None
        self._read_next = True
        self._armed = False
        self._more = False
        self._next_owed_check = 0.0
        self._resent: set[str] = set()

    def wake_in_s(self) -> float | None:
        """Seconds until the loop should tick for a run (0: now; None: no run to wake for)."""
        if self._read_next:
            self._read_next = False
            self.next_fire_ms = self.table.next_fire()
            self._armed = self.next_fire_ms is not None and self.next_fire_ms > self.coord._now_ms()
        if self._more:
            return 0.0
        if not self._armed or self.next_fire_ms is None:
            return None
        return max(0.0, self.next_fire_ms / 1000 - self.coord.clock())

    def due_now(self) -> bool:
        """Whether the loop should tick now for a run (see `wake_in_s`)."""
        return self.wake_in_s() == 0.0

    @property
    def table(self) -> ScheduleTable:
        return self.coord.store.schedules

    # -- changes (signed requests, answered with a Reply)
    def change(self, ch: ScheduleChange, client: str, auth: Auth) -> Reply:
        """Apply `ch` for `client`, once per change id; Refused (nothing written) if it
        cannot be.

        The change id is remembered with the change, in its transaction (beside the nonces,
        for as long), and forgotten if the change is refused: a copy of a change that was
        made (sent again by its client, or received by a second coordinator) is answered with
        the schedule as it now stands, and never made again, even after later changes to
        the schedule. A copy that meets the first one's uncommitted change waits for it."""
        now = self.coord._now_ms()
        store = self.coord.store
        if not store.remember_nonce(CHANGE_KID, ch.change_id, now // 1000):
            log.info("schedule %s: change %s made already; answered", ch.name, ch.change_id)
            return Reply(correlation=ch.correlation, ok=True, data=self._current(ch, now))
        try:
            if ch.op == "add":
                data = self._add(ch, client, auth, now)
            else:
                data = self._alter(ch, client, auth, now)
        except Refused:
            store.forget_nonce(CHANGE_KID, ch.change_id)
            raise
        self._read_next = True
        return Reply(correlation=ch.correlation, ok=True, data=data)

    def _current(self, ch: ScheduleChange, now: int) -> dict[str, Any]:
        s = self.table.get(ch.name)
        data = {"name": ch.name, "removed": True} if s is None else self._shown(s, now)
        return {**data, "job_id": ch.job_id} if ch.op == "run" else data

    def _add(self, ch: ScheduleChange, client: str, auth: Auth, now: int) -> dict[str, Any]:
        assert ch.spec is not None
        existing = self.table.get(ch.name, lock=True)
        if existing is not None:
            raise Refused(
                "schedule_exists",
                f"a schedule named {ch.name!r} exists (added by {existing.owner!r}): remove it "
                "first, or choose another name",
            )
        spec = ch.spec
        if spec.cron is not None and spec.jitter_s:
            # Checked when added, never when read: it depends on the due times to come.
            try:
                schedules.check_jitter(spec.cron, spec.tz, spec.jitter_s, now / 1000)
            except ValueError as e:
                raise Refused("invalid", str(e)) from None
        nodes, known = self._resolve(spec.target, spec.where)
        self.coord._authorize(spec.command, client, nodes, known)
        first = schedules.due_after(spec, now)
        s = Schedule(
            **fields_of(spec),
            name=ch.name,
            owner=client,
            owner_kid=auth.kid,
            created_ms=now,
            updated_ms=now,
            next_due_ms=first,
            change_id=ch.change_id,
        )
        if not self.table.add(s, schedules.fire_at(s.name, s, first)):
            raise Refused("schedule_exists", f"a schedule named {ch.name!r} was just added")
        log.info("schedule %s: added by %s (%s)", s.name, client, schedules.describe(s))
        return self._shown(s, now)

    def _alter(self, ch: ScheduleChange, client: str, auth: Auth, now: int) -> dict[str, Any]:
        s = self.table.get(ch.name, lock=True)
        if s is None:
            raise Refused("not_found", f"no schedule {ch.name!r}")
        if client not in (s.owner, "shared"):
            raise Refused("not_yours", f"schedule {s.name} belongs to {s.owner!r}")
        if ch.op == "remove":
            self.table.remove(s.name, ch.change_id, now)
            log.info("schedule %s: removed by %s", s.name, client)
            return {"name": s.name, "removed": True}
        if ch.op == "run":
            assert ch.job_id is not None
            job = self.coord.store.get_job(ch.job_id, executions=False)
            if job is not None and job.schedule != s.name:
                raise Refused("job_id_conflict", f"job {ch.job_id} exists, not a run of {s.name}")
            if job is None:
                self._start_run(s, now, now, "manual", job_id=ch.job_id, kid=auth.kid)
                self.table.set_last_job(s.name, ch.job_id)
            return {**self._current(ch, now), "job_id": ch.job_id}
        paused = ch.op == "pause"
        if s.paused != paused:
            # Resumed: from the next due time on. What fell due while paused is not a run
            # missed: someone chose so.
            due = {}
            if not paused:
                first = schedules.due_after(s, now)
                due = {"next_due_ms": first, "next_fire_ms": schedules.fire_at(s.name, s, first)}
            self.table.set_paused(s.name, paused, ch.change_id, now, **due)
            log.info("schedule %s: %s by %s", s.name, "paused" if paused else "resumed", client)
        got = self.table.get(s.name)
        assert got is not None
        return self._shown(got, now)

    # -- due times
    def fire_due(self) -> int:
        """Handle every schedule whose next run is to start now (up to DUE_PER_TICK); how
        many were handled here (not by another coordinator)."""
        now = self.coord._now_ms()
        handled = 0
        due = self.table.due(now, DUE_PER_TICK)
        self._more = len(due) == DUE_PER_TICK  # more may be due: tick again at once
        for s in due:
            mark = len(self.coord.outbox)
            try:
                with self.coord.store.atomic():
                    self._due(s, now)
                handled += 1
            except _Taken:
                del self.coord.outbox[mark:]
                log.info("schedule %s: due time handled by another coordinator", s.name)
        self._read_next = True
        if self.coord.clock() >= self._next_owed_check:
            self._next_owed_check = self.coord.clock() + OWED_CHECK_S
            self.resend_owed(now)
        return handled

    def resend_owed(self, now: int) -> None:
        """Send again, once, the dispatches of recent runs not started after OWED_AFTER_S.
        A run comes from no message: if the coordinator that started it died between its
        commit and its publish, no broker redelivery and no other coordinator would send it,
        and it would expire unseen by its node. Any coordinator that sees it sends it; the
        worker's ledger makes a second copy harmless."""
        since = now - OWED_WINDOW_S * 1000
        for job_id in self.table.unstarted_runs(since, now - OWED_AFTER_S * 1000):
            if job_id in self._resent:
                continue
            job = self.coord.store.get_job(job_id)
            if job is None:
                continue
            log.info("schedule %s: run %s not started yet; sending it again", job.schedule, job_id)
            self._resent.add(job_id)
            self.coord._resend_owed(job)
        if len(self._resent) > 10_000:
            self._resent.clear()

    def _due(self, s: Schedule, now: int) -> None:
        """Handle what came due of `s`: record the due times missed, run or skip the latest,
        and move the schedule on from the due time it was at (`_Taken` if another coordinator
        did first: nothing of this is kept)."""
        p = schedules.plan(s.name, s, s.next_due_ms, now)
        if p is None:
            return
        if p.missed is not None:
            self._record_missed(s, p, now)
        job_id = None if p.fire_due_ms is None else self._run_or_skip(s, p, now)
        next_fire = schedules.fire_at(s.name, s, p.next_due_ms)
        if not self.table.advance(s.name, s.next_due_ms, p.next_due_ms, next_fire, job_id):
            raise _Taken

    def _record_missed(self, s: Schedule, p: schedules.Plan, now: int) -> None:
        assert p.missed is not None
        first, last, count = p.missed
        if count == 1:
            many = "its due time"
        else:
            many = f"{count}{'+' if count >= schedules.COUNT_CAP else ''} due times in a row"
        if p.fire_due_ms is not None:
            why = f"no coordinator ran at {many}; the due time after them ran instead"
        else:
            window = schedules.duration(s.start_within_s)
            why = f"no coordinator ran at {many}, nor within the start window ({window}) after"
        last_due = last if count > 1 else None
        self._record(s.name, first, now, None, "missed", why, count=count, last_due_ms=last_due)
        log.warning("schedule %s: %d due time(s) missed: %s", s.name, count, why)

    def _run_or_skip(self, s: Schedule, p: schedules.Plan, now: int) -> str | None:
        """Start the run of `p.fire_due_ms`, or record why it does not run; its job id."""
        assert p.fire_due_ms is not None
        busy = self._still_running(s)
        if busy is not None:
            self._record(s.name, p.fire_due_ms, now, None, "overlap", busy)
            log.info("schedule %s: skipped (%s)", s.name, busy)
            return None
        code = "caught_up" if p.caught_up else "scheduled"
        try:
            return self._start_run(s, p.fire_due_ms, now, code, start_by=p.start_by_ms)
        except Refused as e:
            self._record(s.name, p.fire_due_ms, now, None, "refused", f"{e.code}: {e.text}")
            log.warning("schedule %s: run refused: %s", s.name, e)
            return None

    def _still_running(self, s: Schedule) -> str | None:
        """Why the next run must not start (its overlap policy), or None."""
        if s.overlap == "allow" or s.last_job_id is None:
            return None
        job = self.coord.store.get_job(s.last_job_id, executions=False)
        if job is None or states.is_terminal(job.state):
            return None
        briefs = self.coord.store.briefs(job.job_id)
        waiting = [b.node for b in briefs if b.state == "pending"]
        going = [b.node for b in briefs if b.state == "running"]
        why = f"the previous run (job {job.job_id}) is still going (overlap skip)"
        if going:
            why += f": running on {_few(going)}"
        if waiting:
            why += f"{';' if going else ':'} not started on {_few(waiting)} (offline, or busy?)"
        return why

    def _start_run(
        self,
        s: Schedule,
        due_ms: int,
        now: int,
        code: str,
        *,
        start_by: int | None = None,
        job_id: str | None = None,
        kid: str | None = None,
    ) -> str:
        """Start the run of `due_ms` as a job, checked as a submission from the owner would
        be now; its job id. Refused if it may not run."""
        owner_kid = self._owner_kid(s)
        nodes, known = self._resolve(s.target, s.where)
        self.coord._room(nodes)
        self.coord._authorize(s.command, s.owner, nodes, known)
        job = Job(
            job_id=job_id or new_job_id(),
            target=s.target,
            where=dict(s.where),
            command=s.command,
            timeout_s=s.timeout_s,
            start_by_ms=start_by if start_by is not None else now + s.start_within_s * 1000,
            batch=s.batch,
            max_failures=s.max_failures,
            state="pending",
            submitted_ms=now,
            submitted_by=s.owner,
            submitted_kid=kid or owner_kid,
            schedule=s.name,
        )
        # Due times are whole seconds: a manual run is recorded off them, never in their place.
        at = due_ms + 1 if code == "manual" and due_ms % 1000 == 0 else due_ms
        while not self._record(s.name, at, now, job.job_id, code):
            if code != "manual" or at > due_ms + 10:
                raise _Taken
            at += 1 if (at + 1) % 1000 else 2  # a manual run at the very millisecond of another
        self.coord.start(job, [Execution(node=n, state="pending") for n in nodes])
        log.info("schedule %s: run %s started (%s)", s.name, job.job_id, code)
        return job.job_id

    def _owner_kid(self, s: Schedule) -> str:
        keyring = self.coord.cfg.keyring
        if s.owner == "shared":
            kids = [k for k in [keyring.shared_kid] if k is not None]
        else:
            kids = keyring.kids_of(Identity("client", s.owner))
        if not kids:
            raise Refused(
                "owner_removed",
                f"the key file holds no key of {s.owner!r}, who added this schedule: its runs "
                "are refused until the key is back; or remove the schedule",
            )
        return s.owner_kid if s.owner_kid in kids else kids[-1]

    def _resolve(self, target: str, where: dict[str, str]) -> tuple[list[str], Any]:
        store = self.coord.store
        known = store.node_labels_all() if rollout.needs_known(target, where) else {}
        return rollout.resolve(target, where, known), known

    def _record(
        self,
        name: str,
        due_ms: int,
        now: int,
        job_id: str | None,
        code: str,
        reason: str = "",
        **more: Any,
    ) -> bool:
        run = ScheduleRun(
            name=name, due_ms=due_ms, recorded_ms=now, job_id=job_id, code=code,
            reason=reason or None, **more,
        )  # fmt: skip
        return bool(self.table.add_run(run))

    # -- queries
    def answer(self, q: Query) -> Reply:
        now = self.coord._now_ms()
        if q.query == "schedules":
            last = self.table.last_runs()
            data: Any = [
                {**self._shown(s, now), "last_run": _run(last.get(s.name))}
                for s in self.table.listing()
            ]
            return _fitted(q.correlation, data)
        if q.schedule is None:
            return Reply(
                correlation=q.correlation, ok=False, code="invalid", error="schedule: missing"
            )
        s = self.table.get(q.schedule)
        if s is None:
            return Reply(
                correlation=q.correlation,
                ok=False,
                code="not_found",
                error=f"no schedule {q.schedule!r}",
            )
        runs = self.table.runs(s.name, min(q.limit, MAX_SHOWN_RUNS), s.created_ms)
        data = {
            **self._shown(s, now),
            "upcoming_ms": schedules.upcoming(s, max(now, s.next_due_ms - 1), 5),
            "runs": [_run(r) for r in runs],
            "last_run": _run(runs[0] if runs else None),
        }
        return Reply(correlation=q.correlation, ok=True, data=data)

    @staticmethod
    def _shown(s: Schedule, now: int) -> dict[str, Any]:
        shown = wire(s)
        shown["next_fire_ms"] = None if s.paused else schedules.fire_at(s.name, s, s.next_due_ms)
        shown["now_ms"] = now
        return shown

    def prune(self, before_ms: int) -> int:
        return int(self.table.prune(before_ms, KEEP_RUNS))


def _few(nodes: list[str]) -> str:
    shown = ", ".join(nodes[:5])
    return shown + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")


def _fitted(correlation: str, listing: list[dict[str, Any]]) -> Reply:
    """The listing in one reply: commands cut to their first LISTING_OUTPUT_CHARS characters
    when the whole would not fit, and an error rather than a listing cut short (which would
    let `schedule check` pass over schedules it never saw)."""
    if len(json.dumps(listing)) > JOB_BUDGET_BYTES:
        for s in listing:
            if len(s["command"]) > LISTING_OUTPUT_CHARS:
                s["command"] = s["command"][:LISTING_OUTPUT_CHARS] + "..."
        if len(json.dumps(listing)) > JOB_BUDGET_BYTES:
            return Reply(
                correlation=correlation,
                ok=False,
                code="too_large",
                error=f"{len(listing)} schedules do not fit in one reply (about 4,000 do)",
            )
    return Reply(correlation=correlation, ok=True, data=listing)


def _run(r: ScheduleRun | None) -> dict[str, Any] | None:
    return None if r is None else wire(r)
