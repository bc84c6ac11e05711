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
  another worker can resume at once from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.engines import machine
from app.engines.machine import Action, Failure, Lease, StaleEpoch
from app.engines.plans import flags_from_spec, plan_for
from app.engines.retry import RetryPolicy
from app.engines.runner import (
    Checkpoint,
    EngineFactory,
    LeaseLost,
    MigrationRun,
    Recorded,
    Runner,
    RunOutcome,
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


class DbRunStore:
    """The :class:`~app.engines.runner.RunStore` of one claimed run, fenced by its epoch."""

    #: ``migration.progress`` events are written at most this often per migration,
    #: whatever the engine asks for (``force`` included).
    PROGRESS_EVENT_SECONDS = 1.0

    def __init__(self, db: Database, claimed: Claimed,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.claimed = claimed
        self._clock = clock
        self._last_progress_event = float("-inf")

    async def _fenced(self, session: Any, **values: Any) -> None:
        if not await work.fence(session, self.claimed.id, self.claimed.epoch, **values):
            raise LeaseLost(f"migration {self.claimed.id}: epoch {self.claimed.epoch} is stale")

    async def step_started(self, position: int) -> None:
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
        stored = None if result is None else result.model_dump(mode="json")
        async with self.db.session() as session:
            await self._fenced(session)
            await work.update_step(session, self.claimed.id, position, status=status,
                                   result=stored, error=error, finished_at=datetime.now(UTC))
            name = await self._step_name(session, position)
            await self._event(session, f"migration.step.{status}",
                              {"step": name, **({"error": error} if error else {})})

    async def progress(self, position: int, done: int, total: int, rate: int) -> None:
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
        async with self.db.session() as session:
            await self._fenced(session, checkpoint=data.model_dump(mode="json"))

    async def event(self, type: str, payload: EventPayload) -> None:
        async with self.db.session() as session:
            await self._event(session, type, payload)

    async def _event(self, session: Any, type_: str, payload: EventPayload) -> None:
        try:
            await machine.append_event(session, self.claimed.id, self.claimed.tenant, type_,
                                       payload, epoch=self.claimed.epoch)
        except StaleEpoch as exc:
            raise LeaseLost(str(exc)) from exc

    async def cancel_requested(self) -> bool:
        async with self.db.session() as session:
            row = await work.load(session, self.claimed.id)
        if row is None or row.epoch != self.claimed.epoch:
            raise LeaseLost(f"migration {self.claimed.id} was taken over")
        return row.status == MigrationStatus.cancelling or row.cancel_requested


class Worker:
    def __init__(self, db: Database, box: SecretBox, engines: Mapping[str, EngineFactory],
                 config: WorkerConfig | None = None) -> None:
        self.db = db
        self.box = box
        self.engines = engines
        self.config = config or WorkerConfig()
        self._runs: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._runs)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and run until ``stop`` is set; then hand back what is still running."""
        log.info("worker %s started", self.config.worker_id)
        try:
            while not stop.is_set():
                while len(self._runs) < self.config.concurrency:
                    claimed = await self.claim()
                    if claimed is None:
                        break
                    self._start(claimed)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    stopper = asyncio.ensure_future(stop.wait())
                    waker = asyncio.ensure_future(self._wake.wait())
                    try:
                        await asyncio.wait({stopper, waker}, timeout=self.config.poll_seconds,
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stopper.cancel()
                        waker.cancel()
        finally:
            await self.shutdown()
            log.info("worker %s stopped", self.config.worker_id)

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
                return Claimed(cand.id, cand.tenant, applied.epoch)
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

    async def _execute(self, claimed: Claimed) -> None:
        store = DbRunStore(self.db, claimed)
        cancel = asyncio.Event()
        handed_back = False
        try:
            try:
                view = await self._load(claimed)
            except ValidationError as exc:
                log.warning("migration %s: stored spec does not validate: %s", claimed.id,
                            exc.errors(include_input=False))
                await self._finish(claimed, RunOutcome("failed", Failure(
                    "Invalid spec", "the stored migration no longer validates against its "
                    "type's schema; create it again", code="invalid-spec")))
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
                runner = Runner(factory(view), store, self.config.retry, cancel)
                beat = asyncio.create_task(self._heartbeat(claimed, cancel,
                                                           asyncio.current_task()))
                try:
                    outcome = await runner.run(view, plan)
                finally:
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beat
            await self._finish(claimed, outcome)
        except LeaseLost as exc:
            handed_back = True
            log.warning("worker %s lost %s: %s", self.config.worker_id, claimed.id, exc)
        except asyncio.CancelledError:
            handed_back = True
            await asyncio.shield(self._release(claimed))
            raise
        except Exception:
            log.exception("worker %s: migration %s crashed", self.config.worker_id, claimed.id)
            if not handed_back:
                await asyncio.shield(self._finish(claimed, RunOutcome("failed", Failure(
                    "Internal error", "the worker failed unexpectedly; see the service log",
                    code="internal-error", retryable=True))))

    async def _heartbeat(self, claimed: Claimed, cancel: asyncio.Event,
                         run_task: asyncio.Task[Any] | None) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                async with self.db.session() as session:
                    beat = await work.heartbeat(session, claimed.id, claimed.epoch,
                                                self.config.worker_id,
                                                self.config.lease_seconds)
            except Exception:
                log.exception("heartbeat for %s failed; retrying", claimed.id)
                continue
            if beat is None:
                log.warning("migration %s: fenced out (epoch %s)", claimed.id, claimed.epoch)
                if run_task is not None:
                    run_task.cancel(msg="lease lost")
                return
            if beat.status == MigrationStatus.cancelling or beat.cancel_requested:
                cancel.set()

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
            async with self.db.session() as session:
                await machine.apply(session, claimed.id, claimed.tenant, Action.release,
                                    epoch=claimed.epoch)
        except Exception as exc:  # fenced out or DB gone: the lease will expire instead
            log.warning("could not release %s: %s", claimed.id, exc)
