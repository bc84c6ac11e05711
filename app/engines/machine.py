"""The migration state machines, as data, and the one function that moves state.

Two levels:

* **Status** (``pending, queued, running, cancelling, completed, failed, cancelled``),
  shared by every type: :data:`TRANSITIONS` maps each :class:`Action` to its moves
  (source status -> target status and event type) and its side effects. Everything
  that changes a migration's status - the API's run and cancel, a worker's claim,
  complete or fail - goes through :func:`apply`, which is one guarded ``UPDATE``
  plus the event row in the caller's transaction. A move the table does not allow,
  or one made with a stale epoch, matches no row and raises; it never overwrites.
* **Plan**: inside ``running``, an ordered tuple of steps per type and mode
  (:func:`plan_for`), filtered by flags from the spec. Cleanup steps release what
  earlier steps acquired (snapshot, power state, staging image); after a failure or
  cancel they run newest-acquisition first (:meth:`Plan.unwind`). Each step is a
  row, so a restart resumes at the first unfinished step.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AppError, Conflict, NotFound
from app.models.enums import HypervisorMode, MigrationStatus, MigrationType, StepStatus
from app.repositories import migrations as repo
from app.repositories.migrations import Effect

S = MigrationStatus
JSON = dict[str, Any]


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
    payload: Mapping[str, Any] | None = None,
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
    payload: Mapping[str, Any] | None = None,
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


# --- plans --------------------------------------------------------------------------


class Flag(StrEnum):
    """Spec-derived switches that include or drop plan steps."""

    power_off = "power_off"  # hypervisor: power the source off for a consistent image
    verify = "verify"  # compare the destination against the source digest
    provision = "provision"  # live stream onto a new VM
    to_library = "to_library"  # image extract into the virtual image library
    to_cloud = "to_cloud"  # image extract imported into a cloud (SoftLayer)


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    cleanup: bool = False
    #: Steps whose effect this cleanup reverses (it runs after a failure once any of
    #: them has started, and a re-run must redo them).
    undoes: tuple[str, ...] = ()
    only_if: Flag | None = None
    #: Cleanup that also runs at the end of a successful run (else only on unwind).
    on_success: bool = True


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def unwind(self, started: Collection[str]) -> tuple[Step, ...]:
        """Cleanup steps to run after a failure or cancel, given the steps that
        started: only those undoing something that happened, newest first."""
        position = {s.name: i for i, s in enumerate(self.steps) if not s.cleanup}
        needed = [c for c in self.steps if c.cleanup and any(u in started for u in c.undoes)]
        return tuple(
            sorted(
                needed,
                key=lambda c: -max((position[u] for u in c.undoes if u in position), default=-1),
            )
        )

    def success_path(self) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if not s.cleanup or s.on_success)


_VALIDATE = Step("validate")
_POWER_OFF = Step("power_off", only_if=Flag.power_off)
_SNAPSHOT = Step("snapshot")
_REMOVE_SNAPSHOT = Step("remove_snapshot", cleanup=True, undoes=("snapshot",))
_VERIFY = Step("verify", only_if=Flag.verify)


def _restore_power(on_success: bool) -> Step:
    return Step(
        "restore_power",
        cleanup=True,
        undoes=("power_off",),
        only_if=Flag.power_off,
        on_success=on_success,
    )


PlanKey = tuple[MigrationType, HypervisorMode | None]

PLANS: Mapping[PlanKey, tuple[Step, ...]] = {
    # Power is restored after a store; after a move to a new VM the source stays off
    # on success (cutover: two live copies would fight over addresses).
    (MigrationType.hypervisor, HypervisorMode.store): (
        _VALIDATE,
        _POWER_OFF,
        _SNAPSHOT,
        Step("export"),
        Step("convert"),
        Step("store"),
        _REMOVE_SNAPSHOT,
        _restore_power(on_success=True),
    ),
    (MigrationType.hypervisor, HypervisorMode.new): (
        _VALIDATE,
        _POWER_OFF,
        _SNAPSHOT,
        Step("export"),
        Step("convert"),
        Step("provision"),
        _VERIFY,
        _REMOVE_SNAPSHOT,
        _restore_power(on_success=False),
    ),
    # The snapshot step writes a VSS-consistent image to the staging path.
    (MigrationType.image_extract, None): (
        _VALIDATE,
        _SNAPSHOT,
        Step("transfer"),
        Step("store", only_if=Flag.to_library),
        Step("import", only_if=Flag.to_cloud),
        Step("remove_staging", cleanup=True, undoes=("snapshot",)),
    ),
    # Provision before the LVM snapshot: a snapshot held while a VM boots wastes COW space.
    (MigrationType.live_stream, None): (
        _VALIDATE,
        Step("provision", only_if=Flag.provision),
        _SNAPSHOT,
        Step("transfer"),
        _VERIFY,
        _REMOVE_SNAPSHOT,
    ),
}

#: cleanup step name -> the steps it undoes (the same in every plan).
UNDOES: Mapping[str, tuple[str, ...]] = {
    s.name: s.undoes for steps in PLANS.values() for s in steps if s.cleanup
}


def plan_for(type_: MigrationType, mode: HypervisorMode | None, flags: Collection[Flag]) -> Plan:
    """The steps of one migration: flagged-off steps dropped, and with them the
    cleanup steps that would undo only them."""
    kept = [s for s in PLANS[(type_, mode)] if s.only_if is None or s.only_if in flags]
    names = {s.name for s in kept if not s.cleanup}
    return Plan(tuple(s for s in kept if not s.cleanup or any(u in names for u in s.undoes)))


def flags_from_spec(spec: Mapping[str, Any]) -> frozenset[Flag]:
    """The plan flags of a stored (secret-free) migration spec."""
    options: Mapping[str, Any] = spec.get("options") or {}
    destination: Mapping[str, Any] = spec.get("destination") or {}
    flags = set()
    if spec.get("type") == MigrationType.hypervisor and options.get("power_off", True):
        flags.add(Flag.power_off)
    if options.get("verify", True):
        flags.add(Flag.verify)
    kind = destination.get("kind")
    if spec.get("type") == MigrationType.live_stream and kind == "new":
        flags.add(Flag.provision)
    if spec.get("type") == MigrationType.image_extract:
        flags.add(Flag.to_cloud if kind == "cloud" else Flag.to_library)
    return frozenset(flags)


@dataclass(frozen=True, slots=True)
class StepState:
    position: int
    name: str
    cleanup: bool
    status: StepStatus


def resume_reset(steps: Sequence[StepState]) -> tuple[frozenset[int], bool]:
    """Which step rows a new attempt resets to ``pending``, and whether the transfer
    checkpoint is void.

    The attempt resumes at the first unfinished work step - unless a cleanup that ran
    (or started: it may have got far) undid an earlier one (the snapshot is gone), in
    which case it resumes at the earliest undone step. Everything from there on, and
    every cleanup step (cleanups are idempotent), goes back to ``pending``; completed
    steps before it stay completed. When all work was done (only a cleanup failed),
    only the cleanups run again. Redoing a completed step voids the checkpoint: its
    bytes came from a state that is gone.
    """
    work = [s for s in steps if not s.cleanup]
    at = {s.name: s.position for s in work}
    starts = [s.position for s in work if not s.status.is_done()][:1]
    if starts:
        for c in steps:
            if c.cleanup and c.status in (StepStatus.running, StepStatus.completed,
                                          StepStatus.failed):
                starts += [at[name] for name in UNDOES.get(c.name, ()) if name in at]
    reset = {c.position for c in steps if c.cleanup and c.status is not StepStatus.pending}
    if starts:
        resume = min(starts)
        reset |= {s.position for s in work
                  if s.position >= resume and s.status is not StepStatus.pending}
    void = any(s.position in reset and s.status is StepStatus.completed for s in work)
    return frozenset(reset), void


async def _reset_for_resume(session: AsyncSession, migration_id: uuid.UUID) -> None:
    rows = await repo.steps(session, migration_id)
    states = [StepState(r.position, r.name, r.cleanup, StepStatus(r.status)) for r in rows]
    reset, void = resume_reset(states)
    await repo.reset_steps(session, migration_id, reset)
    if void:
        await repo.clear_checkpoint(session, migration_id)
