"""Workers: claim runnable migrations from Postgres, run them, heartbeat, hand back.

Any number of worker processes on any number of machines share one database and
nothing else. A worker:

- claims a ``queued`` migration, or one whose lease expired, with
  ``FOR UPDATE SKIP LOCKED`` (so two workers never take the same row) through the
  ``claim`` transition, which bumps the epoch (the fencing token) and takes a lease;
- respects its own concurrency limit and a per-source-host limit shared by all workers
  (an advisory lock per source key makes count-then-claim atomic);
- renews the lease every heartbeat; a heartbeat that finds the epoch moved on means
  another worker owns the migration: the run is stopped without touching anything;
- notices a cancel request at the next heartbeat and lets the runner unwind;
- on shutdown stops claiming, stops its runs and releases them (``release``) so
  another worker can resume at once from the last checkpoint;
- outlives the database: every loop backs off while it is unreachable (the outage is
  logged once per process, see :class:`~app.db.Outage`). A run keeps going while its
  lease is still valid by this worker's own clock (:class:`LeaseClock`), its database
  writes waiting for the database to come back; once the lease may have expired it is
  stopped without a word to the database, so a lease this worker cannot renew is never
  acted upon. When the database is back, the lease lapses and a worker (this one or
  another) claims the migration again and resumes it from its checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database, DatabaseUnavailable
from app.engines import machine
from app.engines.machine import Action, Failure, Lease, StaleEpoch
from app.engines.plans import flags_from_spec, plan_for
from app.engines.retry import RetryPolicy
from app.engines.runner import (
    Checkpoint,
    Engine,
    EngineFactory,
    LeaseLost,
    MigrationRun,
    Recorded,
    Runner,
    RunOutcome,
    StepContext,
    StepResult,
    StepRow,
)
from app.models.enums import HypervisorMode, MigrationStatus, MigrationType
from app.models.json import EventPayload
from app.models.schemas.specs import MigrationSecrets, load_spec
from app.repositories import migrations as migrations_repo
from app.repositories import work

log = logging.getLogger(__name__)

__all__ = ["Claimed", "DbRunStore", "EngineFactory", "Worker", "WorkerConfig"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:"
                           f"{uuid.uuid4().hex[:6]}")
    concurrency: int = 4
    per_source_limit: int = 2
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            concurrency=settings.worker_concurrency,
            per_source_limit=settings.worker_per_source_limit,
            lease_seconds=settings.worker_lease_seconds,
            heartbeat_seconds=settings.worker_heartbeat_seconds,
            poll_seconds=settings.worker_poll_seconds,
            retry=RetryPolicy(max_attempts=settings.step_max_attempts),
        )


@dataclass(frozen=True, slots=True)
class Claimed:
    id: uuid.UUID
    tenant: str
    epoch: int
    #: When the claim was sent (monotonic): the lease counts from there.
    sent_at: float = 0.0


class LeaseClock:
    """When the lease of one run may expire, by this worker's monotonic clock.

    The database sets ``lease_expires_at = now() + lease`` when it runs the claim or
    heartbeat; the deadline counts from when that statement was *sent*, minus a margin,
    so it always comes before the database's expiry. Past it, another worker may claim
    the migration and this run must not act any more."""

    def __init__(self, lease_seconds: float, db: Database,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_seconds = lease_seconds
        self.margin = min(1.0, lease_seconds * 0.1)
        self.db = db
        self._clock = clock
        self.deadline = clock() + lease_seconds - self.margin

    def renewed(self, sent_at: float) -> None:
        self.deadline = max(self.deadline, sent_at + self.lease_seconds - self.margin)

    def now(self) -> float:
        return self._clock()

    def expired(self) -> bool:
        return self._clock() >= self.deadline

    async def call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run the database operation ``op``; while the database is unreachable, try
        again with backoff as long as the lease lasts, then raise :class:`LeaseLost`.
        ``op`` runs in a transaction of its own, so a failed try left nothing behind."""
        backoff = self.db.backoff()
        while True:
            try:
                return await op()
            except DatabaseUnavailable as exc:
                delay = backoff.next()
                if self._clock() + delay >= self.deadline:
                    raise LeaseLost(f"{what}: the database was unreachable until the lease "
                                    "would have expired") from exc
                await asyncio.sleep(delay)


class DbRunStore:
    """The :class:`~app.engines.runner.RunStore` of one claimed run, fenced by its epoch.

    Every write waits out a database outage for as long as the lease lasts
    (:meth:`LeaseClock.call`), then gives the run up with :class:`LeaseLost`."""

    #: ``migration.progress`` events are written at most this often per migration,
    #: whatever the engine asks for (``force`` included).
    PROGRESS_EVENT_SECONDS = 1.0

    def __init__(self, db: Database, claimed: Claimed,
                 clock: Callable[[], float] = time.monotonic,
                 lease: LeaseClock | None = None) -> None:
        self.db = db
        self.claimed = claimed
        self._clock = clock
        self._last_progress_event = float("-inf")
        self.lease = lease or LeaseClock(float("inf"), db)

    async def _fenced(self, session: Any, **values: Any) -> None:
        if not await work.fence(session, self.claimed.id, self.claimed.epoch, **values):
            raise LeaseLost(f"migration {self.claimed.id}: epoch {self.claimed.epoch} is stale")

    async def step_started(self, position: int) -> None:
        await self.lease.call("step_started", lambda: self._step_started(position))

    async def _step_started(self, position: int) -> None:
        async with self.db.session() as session:
            step = await self._step_name(session, position)
            await self._fenced(session, phase=step)
            await work.update_step(session, self.claimed.id, position, status="running",
                                   started_at=datetime.now(UTC), finished_at=None, error=None)

    async def _step_name(self, session: Any, position: int) -> str:
        for row in await migrations_repo.steps(session, self.claimed.id):
            if row.position == position:
                return str(row.name)
        raise LeaseLost(f"migration {self.claimed.id} has no step {position}")

    async def step_finished(self, position: int, status: str, result: StepResult | None,
                            error: str | None) -> None:
        await self.lease.call("step_finished",
                              lambda: self._step_finished(position, status, result, error))

    async def _step_finished(self, position: int, status: str, result: StepResult | None,
                             error: str | None) -> None:
        stored = None if result is None else result.model_dump(mode="json")
        async with self.db.session() as session:
            await self._fenced(session)
            await work.update_step(session, self.claimed.id, position, status=status,
                                   result=stored, error=error, finished_at=datetime.now(UTC))
            name = await self._step_name(session, position)
            await self._event(session, f"migration.step.{status}",
                              {"step": name, **({"error": error} if error else {})})

    async def progress(self, position: int, done: int, total: int, rate: int) -> None:
        await self.lease.call("progress", lambda: self._progress(position, done, total, rate))

    async def _progress(self, position: int, done: int, total: int, rate: int) -> None:
        async with self.db.session() as session:
            await self._fenced(session, bytes_done=done, bytes_total=total, rate=rate)
            await work.update_step(session, self.claimed.id, position, bytes_done=done,
                                   bytes_total=total)
            now = self._clock()
            if now - self._last_progress_event >= self.PROGRESS_EVENT_SECONDS:
                self._last_progress_event = now
                await self._event(session, "migration.progress", {
                    "step": await self._step_name(session, position), "bytes_done": done,
                    "bytes_total": total, "rate": rate})

    async def checkpoint(self, data: Checkpoint) -> None:
        await self.lease.call("checkpoint", lambda: self._checkpoint(data))

    async def _checkpoint(self, data: Checkpoint) -> None:
        async with self.db.session() as session:
            await self._fenced(session, checkpoint=data.model_dump(mode="json"))

    async def event(self, type: str, payload: EventPayload) -> None:
        await self.lease.call("event", lambda: self._record_event(type, payload))

    async def _record_event(self, type: str, payload: EventPayload) -> None:
        async with self.db.session() as session:
            await self._event(session, type, payload)

    async def _event(self, session: Any, type_: str, payload: EventPayload) -> None:
        try:
            await machine.append_event(session, self.claimed.id, self.claimed.tenant, type_,
                                       payload, epoch=self.claimed.epoch)
        except StaleEpoch as exc:
            raise LeaseLost(str(exc)) from exc

    async def cancel_requested(self) -> bool:
        return await self.lease.call("cancel_requested", self._cancel_requested)

    async def _cancel_requested(self) -> bool:
        async with self.db.session() as session:
            row = await work.load(session, self.claimed.id)
        if row is None or row.epoch != self.claimed.epoch:
            raise LeaseLost(f"migration {self.claimed.id} was taken over")
        return row.status == MigrationStatus.cancelling or row.cancel_requested


class _OutageAwareEngine(Engine):
    """Runs the steps of ``inner``; a step that fails because the database is
    unreachable (its own reads and writes, not the store's) is run again once the
    database answers, as long as the lease lasts (steps resume from their checkpoint)."""

    def __init__(self, inner: Engine, lease: LeaseClock) -> None:
        self.inner = inner
        self.lease = lease

    @property
    def platform(self) -> str:
        return self.inner.platform

    @platform.setter
    def platform(self, value: str) -> None:
        self.inner.platform = value

    async def run_step(self, ctx: StepContext) -> StepResult | None:
        return await self._again(lambda: self.inner.run_step(ctx))

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> StepResult | None:
        return await self._again(lambda: self.inner.run_cleanup(ctx, outcome))

    async def step_failed(self, ctx: StepContext, exc: BaseException) -> None:
        await self.inner.step_failed(ctx, exc)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _again(
        self, step: Callable[[], Awaitable[StepResult | None]]
    ) -> StepResult | None:
        while True:
            try:
                return await step()
            except DatabaseUnavailable:
                await self.lease.call("step", self.lease.db.ping)


@dataclass(slots=True)
class _Run:
    """What the worker keeps about one run it owns."""

    claimed: Claimed
    lease: LeaseClock
    task: asyncio.Task[None] | None = None
    #: Why the run was stopped without a word to the database (lease not renewable).
    lost: str | None = None


class Worker:
    def __init__(self, db: Database, box: SecretBox, engines: Mapping[str, EngineFactory],
                 config: WorkerConfig | None = None) -> None:
        self.db = db
        self.box = box
        self.engines = engines
        self.config = config or WorkerConfig()
        self._runs: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        #: Set while the claim loop cannot reach the database or fails otherwise.
        self.claim_failing_since: float | None = None
        self.state = "starting"

    @property
    def running(self) -> int:
        return len(self._runs)

    def health(self) -> str:
        """``ok``, ``waiting for the database`` (claiming fails), ``starting`` or
        ``stopped``: what ``/readyz`` shows for an in-process worker."""
        if self.state != "running":
            return self.state
        if self.claim_failing_since is not None:
            return "waiting for the database" if self.db.outage.down else "claiming fails"
        return "ok"

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run until ``stop`` is set; then hand back what is still running.

        Nothing but ``stop`` ends the loop: a claim that fails (the database is away)
        is tried again with backoff; the first failure of a series is logged."""
        log.info("worker %s started", self.config.worker_id)
        self.state = "running"
        backoff = self.db.backoff()
        try:
            while not stop.is_set():
                wait = self.config.poll_seconds
                try:
                    while len(self._runs) < self.config.concurrency and not stop.is_set():
                        claimed = await self.claim()
                        if claimed is None:
                            break
                        self._start(claimed)
                except DatabaseUnavailable:
                    self._claim_failed(None)
                    wait = backoff.next()
                except Exception as exc:
                    self._claim_failed(exc)
                    wait = backoff.next()
                else:
                    if self.claim_failing_since is not None:
                        log.info("worker %s claims again", self.config.worker_id)
                        self.claim_failing_since = None
                    backoff.reset()
                await self._idle(stop, wait)
        finally:
            self.state = "stopped"
            await self.shutdown()
            log.info("worker %s stopped", self.config.worker_id)

    def _claim_failed(self, exc: Exception | None) -> None:
        first = self.claim_failing_since is None
        if first:
            self.claim_failing_since = time.monotonic()
        if exc is not None and first:  # the database's own outage is logged by Outage
            log.exception("worker %s: claiming failed; retrying with backoff",
                          self.config.worker_id)

    async def _idle(self, stop: asyncio.Event, seconds: float) -> None:
        self._wake.clear()
        stopper = asyncio.ensure_future(stop.wait())
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stopper, waker}, timeout=seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            waker.cancel()

    async def shutdown(self) -> None:
        """Stop every run; each releases its migration for another worker."""
        tasks = list(self._runs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start(self, claimed: Claimed) -> None:
        task = asyncio.create_task(self._execute(claimed), name=f"migration-{claimed.id}")
        self._runs[claimed.id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._runs.pop(claimed.id, None)
            self._wake.set()

        task.add_done_callback(done)

    async def claim(self) -> Claimed | None:
        """Claim one runnable migration, or None when there is none we may take."""
        lease = Lease(self.config.worker_id, int(self.config.lease_seconds + 0.999))
        sent_at = time.monotonic()
        async with self.db.session() as session:
            for cand in await work.candidates(session, limit=16):
                if cand.source_key:
                    if not await work.lock_source_key(session, cand.source_key):
                        continue
                    if await work.active_on_source(session, cand.source_key) \
                            >= self.config.per_source_limit:
                        continue
                applied = await machine.apply(session, cand.id, cand.tenant, Action.claim,
                                              lease=lease,
                                              payload={"worker": self.config.worker_id})
                return Claimed(cand.id, cand.tenant, applied.epoch, sent_at)
        return None

    async def _load(self, claimed: Claimed) -> MigrationRun | None:
        """The claimed migration, typed: its stored spec validated back into the
        per-type model, secrets opened, recorded results and checkpoint wrapped for
        typed reading. Raises ``pydantic.ValidationError`` for a spec that no longer
        validates."""
        async with self.db.session() as session:
            row = await work.load(session, claimed.id)
            if row is None:
                return None
            steps = await migrations_repo.steps(session, claimed.id)
        return MigrationRun(
            id=str(row.id), tenant=row.tenant, type=MigrationType(row.type),
            mode=HypervisorMode(row.mode) if row.mode else None, spec=load_spec(row.spec),
            secrets=MigrationSecrets.from_paths(self.box.open(row.secrets)),
            checkpoint=None if row.checkpoint is None else Recorded.model_validate(
                row.checkpoint),
            attempt=row.attempt,
            steps=[StepRow(s.position, s.name, s.cleanup, s.status,
                           None if s.result is None else Recorded.model_validate(s.result))
                   for s in steps],
        )

    def _lease_clock(self, claimed: Claimed) -> LeaseClock:
        lease = LeaseClock(self.config.lease_seconds, self.db)
        lease.deadline = claimed.sent_at + lease.lease_seconds - lease.margin
        return lease

    async def _execute(self, claimed: Claimed) -> None:
        run = _Run(claimed, self._lease_clock(claimed), asyncio.current_task())
        store = DbRunStore(self.db, claimed, lease=run.lease)
        cancel = asyncio.Event()
        handed_back = False
        try:
            try:
                view = await run.lease.call("load", lambda: self._load(claimed))
            except ValidationError as exc:
                log.warning("migration %s: stored spec does not validate: %s", claimed.id,
                            exc.errors(include_input=False))
                invalid = RunOutcome("failed", Failure(
                    "Invalid spec", "the stored migration no longer validates against its "
                    "type's schema; create it again", code="invalid-spec"))
                await run.lease.call("finish", lambda: self._finish(claimed, invalid))
                return
            if view is None:
                return
            if await store.cancel_requested():
                cancel.set()
            factory = self.engines.get(view.type.value)
            plan = plan_for(view.type, view.mode, flags_from_spec(view.spec))
            if factory is None:
                outcome = RunOutcome("failed", Failure(
                    "No engine", f"this worker cannot run {view.type.value} migrations",
                    code="no-engine"))
            else:
                engine = _OutageAwareEngine(factory(view), run.lease)
                runner = Runner(engine, store, self.config.retry, cancel)
                beat = asyncio.create_task(self._heartbeat(run, cancel))
                try:
                    outcome = await runner.run(view, plan)
                finally:
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
            await run.lease.call("finish", lambda: self._finish(claimed, outcome))
        except LeaseLost as exc:
            handed_back = True
            log.warning("worker %s gave up %s: %s", self.config.worker_id, claimed.id, exc)
        except asyncio.CancelledError:
            handed_back = True
            if run.lost is not None:  # stopped by the heartbeat: nothing to tell anyone
                log.warning("worker %s gave up %s: %s", self.config.worker_id, claimed.id,
                            run.lost)
                return
            await asyncio.shield(self._release(claimed))
            raise
        except Exception:
            log.exception("worker %s: migration %s crashed", self.config.worker_id, claimed.id)
            if not handed_back:
                with contextlib.suppress(LeaseLost, DatabaseUnavailable):
                    await asyncio.shield(run.lease.call("finish", lambda: self._finish(
                        claimed, RunOutcome("failed", Failure(
                            "Internal error", "the worker failed unexpectedly; see the "
                            "service log", code="internal-error", retryable=True)))))

    async def _heartbeat(self, run: _Run, cancel: asyncio.Event) -> None:
        """Renew the lease every heartbeat. A renewal that fails is tried again sooner;
        when the lease may have expired by this worker's clock, the run is stopped."""
        claimed, lease = run.claimed, run.lease
        interval = self.config.heartbeat_seconds
        wait = interval
        while True:
            await asyncio.sleep(max(0.0, min(wait, lease.deadline - lease.now())))
            sent = lease.now()
            beat: work.Beat | None = None
            failed = False
            try:
                async with asyncio.timeout(max(0.05, lease.deadline - sent)):
                    async with self.db.session() as session:
                        beat = await work.heartbeat(session, claimed.id, claimed.epoch,
                                                    self.config.worker_id,
                                                    self.config.lease_seconds)
            except (DatabaseUnavailable, TimeoutError):
                failed = True
            except Exception as exc:
                failed = True
                log.warning("heartbeat for %s failed: %s", claimed.id, exc)
            if failed:
                if lease.expired():
                    self._lose(run, "the lease could not be renewed in time (database "
                               "unreachable or too slow) and may have expired; the "
                               "migration resumes when a worker claims it again")
                    return
                wait = min(interval, 0.5)
                continue
            wait = interval
            if beat is None:
                log.warning("migration %s: fenced out (epoch %s)", claimed.id, claimed.epoch)
                self._lose(run, "fenced out: another worker holds the migration")
                return
            lease.renewed(sent)
            if beat.status == MigrationStatus.cancelling or beat.cancel_requested:
                cancel.set()

    @staticmethod
    def _lose(run: _Run, why: str) -> None:
        run.lost = why
        if run.task is not None:
            run.task.cancel(msg="lease lost")

    async def _finish(self, claimed: Claimed, outcome: RunOutcome) -> None:
        async with self.db.session() as session:
            if outcome.status == "completed":
                await machine.apply(session, claimed.id, claimed.tenant, Action.complete,
                                    epoch=claimed.epoch)
            elif outcome.status == "cancelled":
                await machine.apply(session, claimed.id, claimed.tenant, Action.finish_cancel,
                                    epoch=claimed.epoch)
            else:
                failure = outcome.error or Failure("Migration failed", "")
                await machine.apply(session, claimed.id, claimed.tenant, Action.fail,
                                    epoch=claimed.epoch, failure=failure)

    async def _release(self, claimed: Claimed) -> None:
        try:
            async with asyncio.timeout(5.0), self.db.session() as session:
                await machine.apply(session, claimed.id, claimed.tenant, Action.release,
                                    epoch=claimed.epoch)
        except Exception as exc:  # fenced out or DB gone: the lease will expire instead
            log.warning("could not release %s: %s", claimed.id, exc)
