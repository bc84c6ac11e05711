"""Runs one claimed migration's plan: its steps in order, retries, cancel and cleanup.

The runner is the same for every migration type; what a step does comes from the
type's :class:`Engine`. Everything it records goes through a :class:`RunStore`, whose
writes are fenced by the claim's epoch: a runner whose lease was taken over gets
:class:`LeaseLost` from its next write and stops without touching anything else.

Order of work (the plan, :class:`~app.engines.plans.Plan`, is the authority):
1. Work steps run in plan order; completed ones (from an earlier attempt) are skipped,
   so a resumed migration starts at its first unfinished step.
2. A step that raises a transient error is retried with backoff (``RetryPolicy``).
3. On success the cleanup steps of :meth:`Plan.success_path` run in plan order; on
   failure or cancel :meth:`Plan.unwind` names the cleanups that undo something that
   started, newest first. A failing cleanup is recorded (step row and event) but never
   masks the original outcome.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from app import metrics
from app.engines.plans import Plan
from app.engines.retry import RetryPolicy
from app.errors import AppError
from app.logs import bind

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]


class LeaseLost(AppError):
    """Another worker owns the migration now (our epoch is stale)."""

    status = 409
    code = "lease-lost"
    title = "Lease lost"


class Cancelled(Exception):
    """Raised inside a step when the migration was asked to cancel."""


@dataclass(slots=True)
class StepRow:
    """A step row as the runner tracks it (status and result change as it runs)."""

    position: int
    name: str
    cleanup: bool
    status: str
    result: JSONDict | None = None


@dataclass(slots=True)
class MigrationView:
    """What a step may know about its migration (secrets decrypted, never persisted)."""

    id: str
    tenant: str
    type: str
    mode: str | None
    spec: JSONDict
    secrets: JSONDict
    checkpoint: JSONDict | None
    attempt: int
    steps: list[StepRow] = field(default_factory=list)

    def row(self, name: str) -> StepRow:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"migration {self.id} has no step {name!r}")

    def result_of(self, step: str) -> JSONDict:
        for s in self.steps:
            if s.name == step and s.result is not None:
                return s.result
        return {}


class RunStore(Protocol):
    """Fenced persistence for one run. Every method raises :class:`LeaseLost` when the
    run's epoch is no longer current."""

    async def step_started(self, position: int) -> None: ...
    async def step_finished(self, position: int, status: str, result: JSONDict | None,
                            error: str | None) -> None: ...
    async def progress(self, position: int, done: int, total: int, rate: int) -> None: ...
    async def checkpoint(self, data: JSONDict) -> None: ...
    async def event(self, type: str, payload: JSONDict) -> None: ...
    async def cancel_requested(self) -> bool: ...


class StepContext:
    """Handed to every step: progress, checkpoints, events and cancellation."""

    def __init__(self, migration: MigrationView, step: StepRow, store: RunStore,
                 cancel: asyncio.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.migration = migration
        self.step = step
        self._store = store
        self._cancel = cancel
        self._clock = clock
        self._last_progress = float("-inf")
        self._started = clock()
        #: Bytes this try of the step reported done so far (for the bytes-moved metric).
        self.bytes_done = 0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    async def progress(self, done: int, total: int, *, force: bool = False) -> None:
        """Record progress; persisted at most once a second unless ``force``."""
        if done > self.bytes_done:
            metrics.bytes_moved.labels(self.migration.type).inc(done - self.bytes_done)
            self.bytes_done = done
        now = self._clock()
        if not force and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-6)
        await self._store.progress(self.step.position, done, total, int(done / elapsed))

    async def checkpoint(self, data: JSONDict) -> None:
        self.migration.checkpoint = data
        await self._store.checkpoint(data)

    async def event(self, type: str, payload: JSONDict | None = None) -> None:
        await self._store.event(type, {"step": self.step.name, **(payload or {})})


class Engine(abc.ABC):
    """What each step of one migration type does. Steps return a JSON-able result
    (kept in the step row, visible to later steps via ``migration.result_of``)."""

    #: Human-readable platform name for error messages ("vmware", "ssh", ...).
    platform: str = "vmigrate"

    @abc.abstractmethod
    async def run_step(self, ctx: StepContext) -> JSONDict | None:
        """Run one forward step; raise to fail it (transient errors are retried)."""

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> JSONDict | None:
        """Run one cleanup step; ``outcome`` is completed, failed or cancelled."""
        return await self.run_step(ctx)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: str  # completed | failed | cancelled
    error: JSONDict | None = None


def describe_error(exc: BaseException, step: str, platform: str) -> JSONDict:
    """A problem-like object for the migration record: names the step and the platform."""
    if isinstance(exc, AppError):
        code, title, detail = exc.code, exc.title, exc.message
    else:
        code, title, detail = "step-failed", "Step failed", f"{type(exc).__name__}: {exc}"
    return {
        "type": f"https://vmigrate.dev/problems/{code}",
        "title": title,
        "detail": f"{step} ({platform}): {detail}",
        "step": step,
        "retryable": bool(getattr(exc, "retryable", False)),
    }


class Runner:
    def __init__(self, engine: Engine, store: RunStore, retry: RetryPolicy,
                 cancel: asyncio.Event, sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.engine = engine
        self.store = store
        self.retry = retry
        self.cancel = cancel
        self._sleep = sleep

    async def run(self, migration: MigrationView, plan: Plan) -> RunOutcome:
        outcome = RunOutcome("completed")
        for planned in plan.steps:
            step = migration.row(planned.name)
            if step.cleanup or step.status in ("completed", "skipped"):
                continue
            if self.cancel.is_set() or await self.store.cancel_requested():
                self.cancel.set()
                outcome = RunOutcome("cancelled")
                break
            try:
                await self._run_with_retries(migration, step)
            except Cancelled:
                outcome = RunOutcome("cancelled")
                break
            except LeaseLost:
                raise
            except Exception as exc:
                outcome = RunOutcome("failed", describe_error(exc, step.name,
                                                              self.engine.platform))
                break
        await self._cleanup(migration, plan, outcome)
        return outcome

    async def _run_with_retries(self, migration: MigrationView, step: StepRow) -> None:
        attempt = 1
        while True:
            with bind(step=step.name, attempt=attempt):
                if await self._try_step(migration, step, attempt):
                    return
            attempt += 1

    async def _try_step(self, migration: MigrationView, step: StepRow, attempt: int) -> bool:
        """One try of ``step``: True when it completed, False when it is to be retried
        (after the backoff delay); raises when it failed for good or was stopped."""
        kind = migration.type
        started = time.monotonic()

        def timed(outcome: str) -> float:
            elapsed = time.monotonic() - started
            metrics.step_seconds.labels(kind, step.name, outcome).observe(elapsed)
            return elapsed

        step.status = "running"
        await self.store.step_started(step.position)
        log.info("step %s started (try %d)", step.name, attempt)
        ctx = StepContext(migration, step, self.store, self.cancel)
        try:
            result = await self._cancellable(self.engine.run_step(ctx))
        except (Cancelled, LeaseLost) as exc:
            timed("cancelled")
            log.info("step %s stopped: %s", step.name,
                     "cancel requested" if isinstance(exc, Cancelled) else "lease lost")
            await self._finish_quietly(step, "failed", None, "cancelled")
            raise
        except Exception as exc:
            message = describe_error(exc, step.name, self.engine.platform)["detail"]
            if self.retry.should_retry(exc, attempt):
                delay = self.retry.delay(attempt)
                timed("retried")
                metrics.step_retries.labels(kind, step.name).inc()
                log.warning("step %s failed (try %d), retrying in %.1f s: %s", step.name,
                            attempt, delay, message)
                await self.store.event("migration.step.retrying", {
                    "step": step.name, "attempt": attempt, "delay_seconds": round(delay, 2),
                    "error": message,
                })
                await self._sleep(delay)
                return False
            timed("failed")
            log.error("step %s failed (try %d, not retried): %s", step.name, attempt,
                      message)
            step.status = "failed"
            await self.store.step_finished(step.position, "failed", None, message)
            raise
        elapsed = timed("completed")
        if ctx.bytes_done:
            metrics.throughput.labels(kind).observe(ctx.bytes_done / max(elapsed, 1e-6))
        log.info("step %s completed in %.2f s", step.name, elapsed,
                 extra={"bytes": ctx.bytes_done} if ctx.bytes_done else None)
        step.status, step.result = "completed", result
        await self.store.step_finished(step.position, "completed", result, None)
        return True

    async def _cancellable(self, coro: Any) -> JSONDict | None:
        """Run a step; if cancel is requested while it runs, cancel it and raise Cancelled."""
        task = asyncio.ensure_future(coro)
        waiter = asyncio.ensure_future(self.cancel.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                result: JSONDict | None = task.result()
                return result
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Cancelled()
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _finish_quietly(self, step: StepRow, status: str, result: JSONDict | None,
                              error: str) -> None:
        step.status = status
        with contextlib.suppress(LeaseLost):
            await self.store.step_finished(step.position, status, result, error)

    async def _cleanup(self, migration: MigrationView, plan: Plan, outcome: RunOutcome) -> None:
        if outcome.status == "completed":
            planned = [s for s in plan.success_path() if s.cleanup]
        else:
            started = {s.name for s in migration.steps
                       if not s.cleanup and s.status in ("running", "completed", "failed")}
            planned = list(plan.unwind(started))
        for cleanup in planned:
            step = migration.row(cleanup.name)
            if step.status == "completed":
                continue
            with bind(step=step.name, attempt=None):
                await self._cleanup_step(migration, step, outcome)

    async def _cleanup_step(self, migration: MigrationView, step: StepRow,
                            outcome: RunOutcome) -> None:
        await self.store.step_started(step.position)
        ctx = StepContext(migration, step, self.store, asyncio.Event())
        started = time.monotonic()

        def timed(result: str) -> None:
            metrics.step_seconds.labels(migration.type, step.name, result).observe(
                time.monotonic() - started)

        try:
            result = await self.engine.run_cleanup(ctx, outcome.status)
        except LeaseLost:
            raise
        except Exception as exc:
            timed("failed")
            detail = describe_error(exc, step.name, self.engine.platform)["detail"]
            log.warning("cleanup step %s of %s failed: %s", step.name, migration.id, detail)
            await self.store.step_finished(step.position, "failed", None, detail)
            await self.store.event("migration.cleanup.failed", {"step": step.name,
                                                                 "error": detail})
            return
        timed("completed")
        log.info("cleanup step %s completed", step.name)
        step.status = "completed"
        await self.store.step_finished(step.position, "completed", result, None)


EngineFactory = Callable[[MigrationView], Engine]
EngineRegistry = Mapping[str, EngineFactory]
