"""Plans per type and mode, flag filtering, unwind order and the resume rule (pure)."""

from __future__ import annotations

import pytest

from app.engines.plans import (
    PLANS,
    UNDOES,
    Flag,
    StepState,
    flags_from_spec,
    plan_for,
    resume_reset,
)
from app.models.enums import HypervisorMode, MigrationType, StepStatus

H, IE, LS = MigrationType.hypervisor, MigrationType.image_extract, MigrationType.live_stream
ALL = frozenset(Flag)


@pytest.mark.parametrize(
    ("type_", "mode", "flags", "names"),
    [
        (H, HypervisorMode.store, ALL, ["validate", "power_off", "snapshot", "export", "convert",
                                        "store", "remove_exports", "remove_snapshot",
                                        "restore_power"]),
        (H, HypervisorMode.store, {Flag.verify, Flag.from_vm}, ["validate", "snapshot", "export",
                                                                "convert",
                                                  "store", "remove_exports",
                                                  "remove_snapshot"]),
        (H, HypervisorMode.new, ALL, ["validate", "power_off", "snapshot", "export", "convert",
                                      "provision", "verify", "remove_exports",
                                      "remove_snapshot", "restore_power"]),
        (H, HypervisorMode.new, {Flag.power_off, Flag.from_vm}, ["validate", "power_off",
                                                                 "snapshot",
                                                   "export", "convert", "provision",
                                                   "remove_exports", "remove_snapshot",
                                                   "restore_power"]),
        (IE, None, {Flag.to_library}, ["validate", "snapshot", "transfer", "store",
                                       "remove_staging"]),
        (IE, None, {Flag.to_cloud}, ["validate", "snapshot", "transfer", "import",
                                     "remove_staging"]),
        (LS, None, {Flag.verify}, ["validate", "snapshot", "transfer", "verify",
                                   "remove_snapshot"]),
        (LS, None, {Flag.provision}, ["validate", "provision", "snapshot", "transfer",
                                      "remove_snapshot"]),
    ],
)
def test_plan_steps(type_: MigrationType, mode: HypervisorMode | None, flags: set[Flag],
                    names: list[str]) -> None:
    plan = plan_for(type_, mode, flags)
    assert list(plan.names) == names
    assert [s.name for s in plan.steps if s.cleanup] == [
        n for n in names if n.startswith(("remove_", "restore_"))]


def test_cleanup_undoes_the_same_steps_in_every_plan() -> None:
    for steps in PLANS.values():
        for s in steps:
            if s.cleanup:
                assert s.undoes == UNDOES[s.name]
                assert all(u in {x.name for x in steps} for u in s.undoes)
            else:
                assert not s.undoes


def test_unwind_runs_cleanup_newest_acquisition_first() -> None:
    plan = plan_for(H, HypervisorMode.store, ALL)
    assert [s.name for s in plan.unwind({"validate", "power_off", "snapshot", "export"})] == [
        "remove_exports", "remove_snapshot", "restore_power"]
    assert [s.name for s in plan.unwind({"validate", "power_off", "snapshot"})] == [
        "remove_snapshot", "restore_power"]
    assert [s.name for s in plan.unwind({"validate", "power_off"})] == ["restore_power"]
    assert plan.unwind({"validate"}) == ()
    # in plan order, cleanup steps are already newest-first, so success and unwind agree
    assert [s.name for s in plan.steps if s.cleanup] == [
        "remove_exports", "remove_snapshot", "restore_power"]


def test_new_vm_leaves_the_source_off_on_success() -> None:
    store = plan_for(H, HypervisorMode.store, ALL).success_path()
    new = plan_for(H, HypervisorMode.new, ALL).success_path()
    assert "restore_power" in [s.name for s in store]
    assert "restore_power" not in [s.name for s in new]
    assert "restore_power" in [s.name for s in plan_for(H, HypervisorMode.new, ALL).unwind(
        {"power_off"})]


@pytest.mark.parametrize(
    ("spec", "flags"),
    [
        ({"type": "hypervisor", "options": {"power_off": True, "verify": False}},
         {Flag.power_off, Flag.from_vm}),
        ({"type": "hypervisor", "options": {"power_off": False, "verify": True}},
         {Flag.verify, Flag.from_vm}),
        ({"type": "hypervisor", "source": {"image_id": "x"}, "options": {"power_off": True}},
         {Flag.verify}),
        ({"type": "live_stream", "destination": {"kind": "new"}, "options": {"verify": False}},
         {Flag.provision}),
        ({"type": "live_stream", "destination": {"kind": "existing"}}, {Flag.verify}),
        ({"type": "live_stream", "destination": {"kind": "existing"},
          "options": {"sync": "warm"}}, {Flag.verify, Flag.warm}),
        ({"type": "image_extract", "destination": {"kind": "cloud"},
          "options": {"verify": True}}, {Flag.verify, Flag.to_cloud}),
        ({"type": "image_extract", "destination": {"kind": "library"},
          "options": {"verify": False}}, {Flag.to_library}),
    ],
)
def test_flags_from_spec(spec: dict[str, object], flags: set[Flag]) -> None:
    assert flags_from_spec(spec) == flags


def _states(*rows: tuple[str, bool, StepStatus]) -> list[StepState]:
    return [StepState(i, name, cleanup, status) for i, (name, cleanup, status) in enumerate(rows)]


P, R, C, F, K = (StepStatus.pending, StepStatus.running, StepStatus.completed,
                 StepStatus.failed, StepStatus.skipped)


def test_resume_fresh_attempt_resets_nothing() -> None:
    steps = _states(("validate", False, P), ("snapshot", False, P),
                    ("remove_snapshot", True, P))
    assert resume_reset(steps) == (frozenset(), False)


def test_resume_at_failed_step_when_nothing_was_undone() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("transfer", False, F),
                    ("verify", False, P), ("remove_snapshot", True, P))
    assert resume_reset(steps) == (frozenset({2}), False)


def test_resume_before_a_step_a_cleanup_undid() -> None:
    steps = _states(("validate", False, C), ("power_off", False, C), ("snapshot", False, C),
                    ("export", False, F), ("convert", False, P), ("store", False, P),
                    ("remove_snapshot", True, C), ("restore_power", True, C))
    reset, void = resume_reset(steps)
    assert reset == {1, 2, 3, 6, 7}
    assert void


def test_resume_treats_a_failed_cleanup_as_possibly_undone() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("transfer", False, F),
                    ("remove_snapshot", True, F))
    assert resume_reset(steps) == (frozenset({1, 2, 3}), True)


def test_resume_reruns_skipped_steps_after_the_resume_point() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("convert", False, K),
                    ("store", False, F), ("remove_staging", True, P))
    assert resume_reset(steps) == (frozenset({3}), False)
    steps = _states(("validate", False, C), ("snapshot", False, F), ("convert", False, K),
                    ("remove_snapshot", True, R))
    assert resume_reset(steps) == (frozenset({1, 2, 3}), False)


def test_resume_when_only_a_cleanup_failed_reruns_only_cleanups() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("transfer", False, C),
                    ("remove_snapshot", True, F), ("restore_power", True, C))
    assert resume_reset(steps) == (frozenset({3, 4}), False)
