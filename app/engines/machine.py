"""The migration state machines, as data, and the one function that moves state.

Two levels:

* **Status** (``pending, queued, running, cancelling, completed, failed, cancelled``),
  shared by every type: :data:`TRANSITIONS` maps each :class:`Action` to its moves
  (source status -> target status and event type) and its side effects. Everything
  that changes a migration's status - the API's run and cancel, a worker's claim,
  complete or fail - goes through :func:`apply`, which is one guarded ``UPDATE``
  plus the event row in the caller's transaction. A move the table does not allow,
  or one made with a stale epoch, matches no row and raises; it never overwrites.
* **Plan**: inside ``running``, an ordered tuple of steps per type and mode, in
  :mod:`app.engines.plans`. A ``run`` (new attempt) resets the step rows the plan's
  resume rule names, in the same transaction as the move.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncSession

from app.engines.plans import StepState, resume_reset
from app.errors import AppError, Conflict, NotFound
from app.models.enums import MigrationStatus, StepStatus
from app.models.json import JSON, EventPayload
from app.repositories import migrations as repo
from app.repositories.migrations import Effect

S = MigrationStatus


class InvalidTransition(Conflict):
    code = "invalid-transition"
    title = "Invalid state transition"


class StaleEpoch(Conflict):
    """A worker wrote with an epoch older than the migration's: another worker owns it."""

    code = "stale-epoch"
    title = "Stale epoch"


class Action(StrEnum):
    run = "run"  # API: start, or restart after a failure or cancel
    claim = "claim"  # worker: take ownership (bumps the epoch, takes the lease)
    complete = "complete"  # worker
    fail = "fail"  # worker
    cancel = "cancel"  # API: immediate before a worker has it, requested after
    #: API: cancel a migration whose steps already changed something (a snapshot, the
    #: power state) but which no worker holds right now (released, or lease expired):
    #: a worker must claim it to unwind, so it goes to cancelling, not cancelled.
    cancel_started = "cancel_started"
    finish_cancel = "finish_cancel"  # worker: cleanup done after a cancel request
    release = "release"  # worker: give the migration back (shutdown) without a verdict


@dataclass(frozen=True, slots=True)
class Transition:
    """One named transition: its legal moves and what it does besides moving status."""

    action: Action
    #: source status -> (target status, event type written)
    moves: Mapping[MigrationStatus, tuple[MigrationStatus, str]]
    effects: frozenset[Effect] = frozenset()
    #: Only the holder of the current epoch may apply it (worker transitions).
    fenced: bool = False
    #: Takes ownership: allowed only when no live lease exists.
    claims: bool = False
    #: Resets unfinished steps for a new attempt (see :func:`resume_reset`).
    resets_steps: bool = False

    @property
    def sources(self) -> tuple[MigrationStatus, ...]:
        return tuple(self.moves)


def _t(
    action: Action,
    moves: Mapping[MigrationStatus, tuple[MigrationStatus, str]],
    *effects: Effect,
    fenced: bool = False,
    claims: bool = False,
    resets_steps: bool = False,
) -> Transition:
    return Transition(action, moves, frozenset(effects), fenced, claims, resets_steps)


E = Effect
TRANSITIONS: Mapping[Action, Transition] = {
    t.action: t
    for t in (
        _t(
            Action.run,
            {
                S.pending: (S.queued, "migration.queued"),
                S.failed: (S.queued, "migration.queued"),
                S.cancelled: (S.queued, "migration.queued"),
            },
            E.bump_attempt,
            E.clear_error,
            E.clear_cancel,
            E.reset_clock,
            resets_steps=True,
        ),
        # A lease that expired (its worker died) makes running/cancelling claimable again.
        _t(
            Action.claim,
            {
                S.queued: (S.running, "migration.started"),
                S.running: (S.running, "migration.reclaimed"),
                S.cancelling: (S.cancelling, "migration.reclaimed"),
            },
            E.bump_epoch,
            E.take_lease,
            E.start_clock,
            claims=True,
        ),
        _t(
            Action.complete,
            {S.running: (S.completed, "migration.completed")},
            E.drop_lease,
            fenced=True,
        ),
        _t(
            Action.fail,
            {
                S.running: (S.failed, "migration.failed"),
                S.cancelling: (S.failed, "migration.failed"),
            },
            E.set_error,
            E.drop_lease,
            fenced=True,
        ),
        _t(
            Action.cancel,
            {
                S.pending: (S.cancelled, "migration.cancelled"),
                S.queued: (S.cancelled, "migration.cancelled"),
                S.running: (S.cancelling, "migration.cancel_requested"),
            },
            E.request_cancel,
        ),
        _t(
            Action.cancel_started,
            {
                S.queued: (S.cancelling, "migration.cancel_requested"),
                S.running: (S.cancelling, "migration.cancel_requested"),
            },
            E.request_cancel,
        ),
        _t(
            Action.finish_cancel,
            {S.cancelling: (S.cancelled, "migration.cancelled")},
            E.drop_lease,
            fenced=True,
        ),
        _t(
            Action.release,
            {
                S.running: (S.queued, "migration.released"),
                S.cancelling: (S.cancelling, "migration.released"),
            },
            E.drop_lease,
            fenced=True,
        ),
    )
}

#: Statuses in which a migration may be deleted: nobody is working on it.
DELETABLE = frozenset({S.pending, S.completed, S.failed, S.cancelled})


@dataclass(frozen=True, slots=True)
class Lease:
    owner: str
    seconds: int


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a migration failed; stored as a problem-like document in ``error``."""

    title: str
    detail: str
    code: str = "migration-failed"
    step: str | None = None
    retryable: bool = False

    def as_json(self) -> JSON:
        return {
            "type": f"https://vmigrate.dev/problems/{self.code}",
            "title": self.title,
            "detail": self.detail,
            "step": self.step,
            "retryable": self.retryable,
        }

    @classmethod
    def from_error(cls, exc: AppError, step: str | None = None) -> Failure:
        return cls(exc.title, exc.message, exc.code, step, exc.retryable)


@dataclass(frozen=True, slots=True)
class Applied:
    action: Action
    previous: MigrationStatus
    status: MigrationStatus
    event_type: str
    event_seq: int
    epoch: int
    attempt: int
    version: int


async def apply(
    session: AsyncSession,
    migration_id: uuid.UUID,
    tenant: str,
    action: Action,
    *,
    epoch: int | None = None,
    lease: Lease | None = None,
    failure: Failure | None = None,
    payload: EventPayload | None = None,
) -> Applied:
    """Apply ``action`` in the caller's transaction, or raise; never half of it.

    ``epoch`` is required for fenced (worker) transitions and guards any other one it
    is given to. Raises :class:`NotFound` (no such migration for this tenant),
    :class:`StaleEpoch`, or :class:`InvalidTransition` naming the current status and
    the statuses the action is allowed from.
    """
    t = TRANSITIONS[action]
    if t.fenced and epoch is None:
        raise ValueError(f"{action} is a worker transition: pass the epoch you hold")
    if t.claims and lease is None:
        raise ValueError(f"{action} takes the lease: pass one")
    if Effect.set_error in t.effects and failure is None:
        raise ValueError(f"{action} records why: pass a failure")
    moved = await repo.move(
        session,
        migration_id,
        tenant,
        moves={src: dst for src, (dst, _) in t.moves.items()},
        effects=t.effects,
        epoch=epoch,
        lease_must_be_free=t.claims,
        lease_owner=lease.owner if lease else None,
        lease_seconds=lease.seconds if lease else None,
        error=failure.as_json() if failure else None,
    )
    if moved is None:
        raise await _refusal(session, migration_id, tenant, t, epoch)
    event_type = t.moves[moved.previous][1]
    body: JSON = {
        "action": action.value,
        "from": moved.previous.value,
        "to": moved.status.value,
        "attempt": moved.attempt,
    }
    if failure is not None:
        body["error"] = failure.as_json()
    body.update(payload or {})
    await repo.insert_event(session, tenant, migration_id, moved.event_seq, event_type, body)
    if t.resets_steps:
        await _reset_for_resume(session, migration_id)
    return Applied(
        action,
        moved.previous,
        moved.status,
        event_type,
        moved.event_seq,
        moved.epoch,
        moved.attempt,
        moved.version,
    )


async def append_event(
    session: AsyncSession,
    migration_id: uuid.UUID,
    tenant: str,
    type_: str,
    payload: EventPayload | None = None,
    *,
    epoch: int | None = None,
) -> int:
    """Record a non-transition event (created, step finished, ...); returns its seq.

    Numbered by the same ``event_seq`` counter as transitions, so the event log has no
    gaps or duplicates however writers interleave. With ``epoch``, a stale worker's
    event is refused like its transitions.
    """
    seq = await repo.next_event_seq(session, migration_id, tenant, epoch)
    if seq is None:
        current = await repo.state(session, migration_id, tenant)
        if current is None:
            raise NotFound(f"no migration {migration_id}")
        raise StaleEpoch(
            f"epoch {epoch} is stale: migration {migration_id} is at epoch {current.epoch}"
        )
    await repo.insert_event(session, tenant, migration_id, seq, type_, dict(payload or {}))
    return seq


async def _refusal(
    session: AsyncSession,
    migration_id: uuid.UUID,
    tenant: str,
    t: Transition,
    epoch: int | None,
) -> AppError:
    """Explain why the guarded UPDATE matched nothing."""
    current = await repo.state(session, migration_id, tenant)
    if current is None:
        return NotFound(f"no migration {migration_id}")
    allowed = ", ".join(s.value for s in t.sources)
    extra: JSON = {
        "current_status": current.status.value,
        "allowed_from": [s.value for s in t.sources],
    }
    if epoch is not None and current.epoch != epoch:
        return StaleEpoch(
            f"epoch {epoch} is stale: migration {migration_id} is at epoch "
            f"{current.epoch}; another worker owns it",
            extra=extra,
        )
    if current.status not in t.moves:
        return InvalidTransition(
            f"cannot {t.action} a migration that is {current.status}; "
            f"{t.action} is allowed from: {allowed}",
            extra=extra,
        )
    if t.claims and current.leased:
        return InvalidTransition(
            f"cannot {t.action}: the migration is leased by {current.lease_owner} until "
            f"{current.lease_expires_at:%Y-%m-%dT%H:%M:%SZ}",
            extra=extra,
        )
    return InvalidTransition(  # it moved between our UPDATE and this read
        f"cannot {t.action}: the migration changed concurrently (now {current.status}); "
        "read it again",
        extra=extra,
    )


async def _reset_for_resume(session: AsyncSession, migration_id: uuid.UUID) -> None:
    """Apply :func:`~app.engines.plans.resume_reset` to the migration's step rows."""
    rows = await repo.steps(session, migration_id)
    states = [StepState(r.position, r.name, r.cleanup, StepStatus(r.status)) for r in rows]
    reset, void = resume_reset(states)
    await repo.reset_steps(session, migration_id, reset)
    if void:
        await repo.clear_checkpoint(session, migration_id)
