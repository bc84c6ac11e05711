"""Plans: the ordered steps a migration runs inside ``running``, as data.

Each type and mode has a tuple of steps (:data:`PLANS`), filtered by flags derived
from the spec (:func:`plan_for`, :func:`flags_from_spec`). Cleanup steps release what
earlier steps acquired (snapshot, power state, staging image); after a failure or
cancel they run newest-acquisition first (:meth:`Plan.unwind`). Creating a migration
writes one row per step, so the API shows where it is and a restart resumes at the
first unfinished step; :func:`resume_reset` decides what a new attempt redoes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from app.models.enums import HypervisorMode, MigrationType, StepStatus
from app.models.schemas.migrations import LibraryImageSource
from app.models.schemas.specs import (
    ConversionSpec,
    HypervisorSpec,
    ImageExtractSpec,
    LiveStreamSpec,
    StoredSpec,
)


class Flag(StrEnum):
    """Spec-derived switches that include or drop plan steps."""

    from_vm = "from_vm"  # hypervisor: the source is a VM (not a library image)
    power_off = "power_off"  # hypervisor: power the source off for a consistent image
    verify = "verify"  # compare the destination against the source digest
    provision = "provision"  # live stream onto a new VM
    warm = "warm"  # live stream: delta passes from the running volume before the snapshot
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
#: A library image being re-provisioned has no VM to snapshot.
_VM_SNAPSHOT = Step("snapshot", only_if=Flag.from_vm)
_REMOVE_SNAPSHOT = Step("remove_snapshot", cleanup=True, undoes=("snapshot",))
_VERIFY = Step("verify", only_if=Flag.verify)
#: ``transfer`` streams each disk from the source and converts it on the fly into a
#: staging file; ``check_image`` reads every staged image back with its format reader
#: and checks it holds exactly the source's disk (the digest).
_TRANSFER = Step("transfer")
_CHECK_IMAGE = Step("check_image")
#: Staged images wait in the staging area until stored or provisioned.
_DISCARD_STAGED = Step("discard_staged", cleanup=True, undoes=("transfer",))


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
        _VM_SNAPSHOT,
        _TRANSFER,
        _CHECK_IMAGE,
        Step("store"),
        _DISCARD_STAGED,
        _REMOVE_SNAPSHOT,
        _restore_power(on_success=True),
    ),
    (MigrationType.hypervisor, HypervisorMode.new): (
        _VALIDATE,
        _POWER_OFF,
        _VM_SNAPSHOT,
        _TRANSFER,
        _CHECK_IMAGE,
        Step("provision"),
        _VERIFY,
        _DISCARD_STAGED,
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
    # A library conversion runs the hypervisor steps on a library image: transfer =
    # convert it into staging (resumable into raw), check_image = read it back and
    # check the digest, store = publish.
    (MigrationType.conversion, None): (
        _VALIDATE,
        _TRANSFER,
        _CHECK_IMAGE,
        Step("store"),
        _DISCARD_STAGED,
    ),
    # Provision before the LVM snapshot: a snapshot held while a VM boots wastes COW space.
    # Warm mode copies the running volume first (precopy), so the snapshot lives only for
    # the final delta pass.
    (MigrationType.live_stream, None): (
        _VALIDATE,
        Step("provision", only_if=Flag.provision),
        Step("precopy", only_if=Flag.warm),
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


def flags_from_spec(spec: StoredSpec) -> frozenset[Flag]:
    """The plan flags of a stored (secret-free) migration spec."""
    flags = set()
    if spec.options.verify:
        flags.add(Flag.verify)
    match spec:
        case HypervisorSpec():
            if not isinstance(spec.source, LibraryImageSource):
                flags.add(Flag.from_vm)
                if spec.options.power_off:
                    flags.add(Flag.power_off)
        case LiveStreamSpec():
            if spec.destination.kind == "new":
                flags.add(Flag.provision)
            if spec.options.sync == "warm":
                flags.add(Flag.warm)
        case ImageExtractSpec():
            flags.add(Flag.to_cloud if spec.destination.kind == "cloud" else Flag.to_library)
        case ConversionSpec():
            pass
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
