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
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from app.engines.machine import Failure
from app.engines.plans import Plan
from app.engines.retry import RetryPolicy
from app.errors import AppError
from app.models.enums import HypervisorMode, MigrationType
from app.models.json import EventPayload
from app.models.schemas.specs import MigrationSecrets, StoredSpec

log = logging.getLogger(__name__)


class LeaseLost(AppError):
    """Another worker owns the migration now (our epoch is stale)."""

    status = 409
    code = "lease-lost"
    title = "Lease lost"


class Cancelled(Exception):
    """Raised inside a step when the migration was asked to cancel."""


class MissingResult(AppError):
    """A step needs what an earlier step recorded, and it is not there (or no longer
    reads as what it should be)."""

    status = 409
    code = "missing-step-result"
    title = "An earlier step's result is missing"


class WrongSpec(AppError):
    code = "wrong-spec"
    title = "The migration's spec is not for this engine"


class StepResult(BaseModel):
    """What a step made or found: exactly what is stored in its step row (and shown in
    the API), read back typed by later steps and resumed attempts
    (:meth:`MigrationRun.result_of`). Subclasses declare the fields; never secrets."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Checkpoint(BaseModel):
    """A run's resume point (the migration's ``checkpoint``), typed by its engine and
    read back with :meth:`MigrationRun.checkpoint_as`."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Recorded(BaseModel):
    """Stored JSON (a step result or checkpoint of an earlier attempt) not yet read as
    its model: :meth:`MigrationRun.result_of` / :meth:`~MigrationRun.checkpoint_as` do."""

    model_config = ConfigDict(frozen=True, extra="allow")


R = TypeVar("R", bound=StepResult)
C = TypeVar("C", bound=Checkpoint)
S = TypeVar("S", bound=BaseModel)


def _as(kind: type[BaseModel], value: BaseModel) -> BaseModel:
    if isinstance(value, kind):
        return value
    return kind.model_validate(value.model_dump(mode="json"))


@dataclass(slots=True)
class StepRow:
    """A step row as the runner tracks it (status and result change as it runs)."""

    position: int
    name: str
    cleanup: bool
    status: str
    result: StepResult | Recorded | None = None


@dataclass(slots=True)
class MigrationRun:
    """What a step may know about the migration being run: its typed spec, its
    secrets (decrypted, never persisted), its checkpoint and its step rows."""

    id: str
    tenant: str
    type: MigrationType
    mode: HypervisorMode | None
    spec: StoredSpec
    secrets: MigrationSecrets
    checkpoint: Checkpoint | Recorded | None
    attempt: int
    steps: list[StepRow] = field(default_factory=list)

    def row(self, name: str) -> StepRow:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"migration {self.id} has no step {name!r}")

    def spec_as(self, kind: builtins.type[S]) -> S:
        """The spec as the model an engine runs; :class:`WrongSpec` if it is another."""
        spec: BaseModel = self.spec
        if not isinstance(spec, kind):
            raise WrongSpec(f"migration {self.id} is a {self.type} migration; this engine "
                            f"runs {kind.__name__}")
        return spec

    def maybe_result_of(self, step: str, kind: builtins.type[R]) -> R | None:
        """The result ``step`` recorded, as ``kind``; None when it recorded none (it did
        not run, or is not in this migration's plan)."""
        for s in self.steps:
            if s.name == step and s.result is not None:
                try:
                    typed = _as(kind, s.result)
                except ValidationError as exc:
                    raise MissingResult(f"the {step} step's result does not read as "
                                        f"{kind.__name__}; run the migration again") from exc
                if not isinstance(typed, kind):
                    raise MissingResult(f"the {step} step's result is not a {kind.__name__}")
                s.result = typed
                return typed
        return None

    def result_of(self, step: str, kind: builtins.type[R]) -> R:
        """The result ``step`` recorded, as ``kind``; :class:`MissingResult` if none."""
        found = self.maybe_result_of(step, kind)
        if found is None:
            raise MissingResult(f"the {step} step has no result; run the migration again")
        return found

    def checkpoint_as(self, kind: builtins.type[C]) -> C | None:
        """The checkpoint as ``kind``; None when there is none or it is another kind
        (written by another step or an older build: nothing to resume from)."""
        if self.checkpoint is None:
            return None
        try:
            typed = _as(kind, self.checkpoint)
        except ValidationError:
            return None
        return typed if isinstance(typed, kind) else None


class RunStore(Protocol):
    """Fenced persistence for one run. Every method raises :class:`LeaseLost` when the
    run's epoch is no longer current. Results and checkpoints arrive as models; the
    store dumps them to JSON where it persists them."""

    async def step_started(self, position: int) -> None: ...
    async def step_finished(self, position: int, status: str, result: StepResult | None,
                            error: str | None) -> None: ...
    async def progress(self, position: int, done: int, total: int, rate: int) -> None: ...
    async def checkpoint(self, data: Checkpoint) -> None: ...
    async def event(self, type: str, payload: EventPayload) -> None: ...
    async def cancel_requested(self) -> bool: ...


class StepContext:
    """Handed to every step: progress, checkpoints, events and cancellation."""

    def __init__(self, migration: MigrationRun, step: StepRow, store: RunStore,
                 cancel: asyncio.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.migration = migration
        self.step = step
        self._store = store
        self._cancel = cancel
        self._clock = clock
        self._last_progress = float("-inf")
        self._started = clock()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()

    async def progress(self, done: int, total: int, *, force: bool = False) -> None:
        """Record progress; persisted at most once a second unless ``force``."""
        now = self._clock()
        if not force and now - self._last_progress < 1.0:
            return
        self._last_progress = now
        elapsed = max(now - self._started, 1e-6)
        await self._store.progress(self.step.position, done, total, int(done / elapsed))

    async def checkpoint(self, data: Checkpoint) -> None:
        self.migration.checkpoint = data
        await self._store.checkpoint(data)

    async def event(self, type: str, payload: EventPayload | None = None) -> None:
        await self._store.event(type, {"step": self.step.name, **(payload or {})})


class Engine(abc.ABC):
    """What each step of one migration type does. Steps return a typed
    :class:`StepResult` (kept in the step row, read back by later steps with
    ``migration.result_of(step, Model)``).

    An engine lives for one run of one migration (the worker builds it per claim) and
    may hold resources across its steps (driver sessions). The runner calls
    :meth:`aclose` exactly once when the run ends, whatever the outcome."""

    #: Human-readable platform name for error messages ("vmware", "ssh", ...).
    platform: str = "vmigrate"

    @abc.abstractmethod
    async def run_step(self, ctx: StepContext) -> StepResult | None:
        """Run one forward step; raise to fail it (transient errors are retried)."""

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> StepResult | None:
        """Run one cleanup step; ``outcome`` is completed, failed or cancelled."""
        return await self.run_step(ctx)

    async def step_failed(self, ctx: StepContext, exc: BaseException) -> None:  # noqa: B027
        """Called after an attempt of a step raised (before a retry): drop state that
        the error may have spoiled (a session the network dropped). Never raises."""

    async def aclose(self) -> None:  # noqa: B027
        """Release what the engine held for the run (sessions). Never raises."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    status: str  # completed | failed | cancelled
    error: Failure | None = None


def describe_error(exc: BaseException, step: str, platform: str) -> Failure:
    """Why a step failed, for the migration record: names the step and the platform."""
    if isinstance(exc, AppError):
        code, title, detail = exc.code, exc.title, exc.message
    else:
        code, title, detail = "step-failed", "Step failed", f"{type(exc).__name__}: {exc}"
    return Failure(title=title, detail=f"{step} ({platform}): {detail}", code=code, step=step,
                   retryable=bool(getattr(exc, "retryable", False)))


class Runner:
    def __init__(self, engine: Engine, store: RunStore, retry: RetryPolicy,
                 cancel: asyncio.Event,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.engine = engine
        self.store = store
        self.retry = retry
        self.cancel = cancel
        self._sleep = sleep

    async def run(self, migration: MigrationRun, plan: Plan) -> RunOutcome:
        """Run the plan's steps and cleanups; the engine is closed at the end, whatever
        happens (also when the run is cancelled or fenced out)."""
        try:
            return await self._run(migration, plan)
        finally:
            closing = asyncio.ensure_future(self.engine.aclose())
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing
                raise
            except Exception:
                log.exception("closing the engine of %s failed", migration.id)

    async def _run(self, migration: MigrationRun, plan: Plan) -> RunOutcome:
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

    async def _run_with_retries(self, migration: MigrationRun, step: StepRow) -> None:
        attempt = 1
        while True:
            step.status = "running"
            await self.store.step_started(step.position)
            ctx = StepContext(migration, step, self.store, self.cancel)
            try:
                result = await self._cancellable(self.engine.run_step(ctx))
            except (Cancelled, LeaseLost):
                await self._finish_quietly(step, "failed", "cancelled")
                raise
            except Exception as exc:
                await self.engine.step_failed(ctx, exc)
                message = describe_error(exc, step.name, self.engine.platform).detail
                if self.retry.should_retry(exc, attempt):
                    delay = self.retry.delay(attempt)
                    await self.store.event("migration.step.retrying", {
                        "step": step.name, "attempt": attempt, "delay_seconds": round(delay, 2),
                        "error": message,
                    })
                    await self._sleep(delay)
                    attempt += 1
                    continue
                step.status = "failed"
                await self.store.step_finished(step.position, "failed", None, message)
                raise
            step.status, step.result = "completed", result
            await self.store.step_finished(step.position, "completed", result, None)
            return

    async def _cancellable(self, coro: Coroutine[Any, Any, StepResult | None]
                           ) -> StepResult | None:
        """Run a step; if cancel is requested while it runs, cancel it and raise Cancelled."""
        task = asyncio.ensure_future(coro)
        waiter = asyncio.ensure_future(self.cancel.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
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

    async def _finish_quietly(self, step: StepRow, status: str, error: str) -> None:
        step.status = status
        with contextlib.suppress(LeaseLost):
            await self.store.step_finished(step.position, status, None, error)

    async def _cleanup(self, migration: MigrationRun, plan: Plan, outcome: RunOutcome) -> None:
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
            await self.store.step_started(step.position)
            ctx = StepContext(migration, step, self.store, asyncio.Event())
            try:
                result = await self.engine.run_cleanup(ctx, outcome.status)
            except LeaseLost:
                raise
            except Exception as exc:
                detail = describe_error(exc, step.name, self.engine.platform).detail
                log.warning("cleanup step %s of %s failed: %s", step.name, migration.id, detail)
                await self.store.step_finished(step.position, "failed", None, detail)
                await self.store.event("migration.cleanup.failed", {"step": step.name,
                                                                     "error": detail})
                continue
            step.status, step.result = "completed", result
            await self.store.step_finished(step.position, "completed", result, None)


EngineFactory = Callable[[MigrationRun], Engine]
EngineRegistry = Mapping[str, EngineFactory]
