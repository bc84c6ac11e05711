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
from app.models.schemas.specs import StoredSpec, load_spec

H, IE, LS = MigrationType.hypervisor, MigrationType.image_extract, MigrationType.live_stream
ALL = frozenset(Flag)


@pytest.mark.parametrize(
    ("type_", "mode", "flags", "names"),
    [
        (H, HypervisorMode.store, ALL, ["validate", "power_off", "snapshot", "transfer",
                                        "check_image", "store", "discard_staged", "remove_snapshot",
                                        "restore_power"]),
        (H, HypervisorMode.store, {Flag.verify, Flag.from_vm}, ["validate", "snapshot", "transfer",
                                                                "check_image",
                                                  "store", "discard_staged",
                                                  "remove_snapshot"]),
        (H, HypervisorMode.new, ALL, ["validate", "power_off", "snapshot", "transfer",
                                      "check_image", "provision", "verify", "discard_staged",
                                      "remove_snapshot", "restore_power"]),
        (H, HypervisorMode.new, {Flag.power_off, Flag.from_vm}, ["validate", "power_off",
                                                                 "snapshot",
                                                   "transfer", "check_image", "provision",
                                                   "discard_staged", "remove_snapshot",
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
        n for n in names if n.startswith(("remove_", "restore_", "discard_"))]


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
    assert [s.name for s in plan.unwind({"validate", "power_off", "snapshot", "transfer"})] == [
        "discard_staged", "remove_snapshot", "restore_power"]
    assert [s.name for s in plan.unwind({"validate", "power_off", "snapshot"})] == [
        "remove_snapshot", "restore_power"]
    assert [s.name for s in plan.unwind({"validate", "power_off"})] == ["restore_power"]
    assert plan.unwind({"validate"}) == ()
    # in plan order, cleanup steps are already newest-first, so success and unwind agree
    assert [s.name for s in plan.steps if s.cleanup] == [
        "discard_staged", "remove_snapshot", "restore_power"]


def test_new_vm_leaves_the_source_off_on_success() -> None:
    store = plan_for(H, HypervisorMode.store, ALL).success_path()
    new = plan_for(H, HypervisorMode.new, ALL).success_path()
    assert "restore_power" in [s.name for s in store]
    assert "restore_power" not in [s.name for s in new]
    assert "restore_power" in [s.name for s in plan_for(H, HypervisorMode.new, ALL).unwind(
        {"power_off"})]


_CLOUD = "2b0c6c8e-52a4-4b8e-9d0e-0d3e6f1c9a10"
_SSH = {"host": "h1.example.com", "username": "root", "password_set": True,
        "private_key_set": False}


def _spec(type_: str, **parts: object) -> StoredSpec:
    """A stored (secret-free) spec as the API writes it, validated like a worker does."""
    base: dict[str, object] = {"type": type_}
    if type_ != "conversion":
        base["name"] = "m"
    if type_ == "hypervisor":
        base.update(mode="store", platform="linux",
                    source={"cloud_id": _CLOUD, "server": {"name": "vm"},
                            "password_set": False})
    elif type_ == "live_stream":
        base.update(source={**_SSH, "cloud_id": _CLOUD, "server": {"name": "vm"},
                            "device": "/dev/vg0/root"})
    elif type_ == "image_extract":
        base.update(source={"cloud_id": _CLOUD, "server": {"name": "vm"},
                            "host": "win.example.com", "username": "admin",
                            "snapshot_path": "D:\\staging", "password_set": True})
    return load_spec({**base, **parts})


_EXISTING = {**_SSH, "kind": "existing", "device": "/dev/sdb"}


@pytest.mark.parametrize(
    ("spec", "flags"),
    [
        (_spec("hypervisor", options={"power_off": True, "verify": False}),
         {Flag.power_off, Flag.from_vm}),
        (_spec("hypervisor", options={"power_off": False, "verify": True}),
         {Flag.verify, Flag.from_vm}),
        (_spec("hypervisor", mode="new", source={"image_id": _CLOUD},
               destination={"cloud_id": _CLOUD}, options={"power_off": True}),
         {Flag.verify}),
        (_spec("live_stream", destination={"kind": "new", "cloud_id": _CLOUD, "plan": "s"},
               options={"verify": False}),
         {Flag.provision}),
        (_spec("live_stream", destination=_EXISTING), {Flag.verify}),
        (_spec("live_stream", destination=_EXISTING, options={"sync": "warm"}),
         {Flag.verify, Flag.warm}),
        (_spec("image_extract", destination={"kind": "cloud", "cloud_id": _CLOUD},
               options={"verify": True}), {Flag.verify, Flag.to_cloud}),
        (_spec("image_extract", destination={"kind": "library"}, options={"verify": False}),
         {Flag.to_library}),
        (_spec("conversion", image_id=_CLOUD, format="raw"), {Flag.verify}),
    ],
)
def test_flags_from_spec(spec: StoredSpec, flags: set[Flag]) -> None:
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
                    ("transfer", False, F), ("check_image", False, P), ("store", False, P),
                    ("remove_snapshot", True, C), ("restore_power", True, C))
    reset, void = resume_reset(steps)
    assert reset == {1, 2, 3, 6, 7}
    assert void


def test_resume_treats_a_failed_cleanup_as_possibly_undone() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("transfer", False, F),
                    ("remove_snapshot", True, F))
    assert resume_reset(steps) == (frozenset({1, 2, 3}), True)


def test_resume_reruns_skipped_steps_after_the_resume_point() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("check_image", False, K),
                    ("store", False, F), ("remove_staging", True, P))
    assert resume_reset(steps) == (frozenset({3}), False)
    steps = _states(("validate", False, C), ("snapshot", False, F), ("check_image", False, K),
                    ("remove_snapshot", True, R))
    assert resume_reset(steps) == (frozenset({1, 2, 3}), False)


def test_resume_when_only_a_cleanup_failed_reruns_only_cleanups() -> None:
    steps = _states(("validate", False, C), ("snapshot", False, C), ("transfer", False, C),
                    ("remove_snapshot", True, F), ("restore_power", True, C))
    assert resume_reset(steps) == (frozenset({3, 4}), False)
