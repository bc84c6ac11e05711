"""What a step reads of its run, typed: stored results and checkpoints come back as their
models, a missing or unreadable one is an error naming the step, secrets come apart
from the sealed form without showing in reprs."""

from __future__ import annotations

import pytest

from app.engines.runner import (
    Checkpoint,
    MigrationRun,
    MissingResult,
    Recorded,
    StepResult,
    StepRow,
    WrongSpec,
)
from app.models.enums import MigrationType
from app.models.schemas.specs import ConversionSpec, HypervisorSpec, MigrationSecrets, load_spec


class Found(StepResult):
    server: str
    disks: tuple[int, ...]


class Offset(Checkpoint):
    offset: int


def _run(*steps: StepRow, checkpoint: Checkpoint | Recorded | None = None) -> MigrationRun:
    spec = load_spec({"type": "conversion", "image_id": "6f1d1a8e-3a55-4b0a-9a43-96d6a1f4c2b7",
                      "format": "raw"})
    return MigrationRun(id="m1", tenant="t", type=MigrationType.conversion, mode=None,
                        spec=spec, secrets=MigrationSecrets(), checkpoint=checkpoint,
                        attempt=1, steps=list(steps))


def test_a_stored_result_reads_back_as_its_model() -> None:
    stored = Recorded.model_validate({"server": "vm-1", "disks": [1, 2]})
    run = _run(StepRow(0, "validate", False, "completed", stored))
    found = run.result_of("validate", Found)
    assert found == Found(server="vm-1", disks=(1, 2))
    assert run.row("validate").result is found  # typed once, kept


def test_missing_or_unreadable_results_name_the_step() -> None:
    run = _run(StepRow(0, "validate", False, "pending"),
               StepRow(1, "snapshot", False, "completed", Recorded.model_validate({"x": 1})))
    assert run.maybe_result_of("validate", Found) is None
    with pytest.raises(MissingResult, match="validate"):
        run.result_of("validate", Found)
    with pytest.raises(MissingResult, match="snapshot"):
        run.result_of("snapshot", Found)


def test_checkpoint_of_another_kind_is_no_checkpoint() -> None:
    assert _run(checkpoint=Recorded.model_validate({"offset": 5})).checkpoint_as(
        Offset) == Offset(offset=5)
    assert _run(checkpoint=Recorded.model_validate({"exported": {}})).checkpoint_as(
        Offset) is None
    assert _run().checkpoint_as(Offset) is None


def test_spec_as_refuses_another_type() -> None:
    run = _run()
    assert isinstance(run.spec_as(ConversionSpec), ConversionSpec)
    with pytest.raises(WrongSpec):
        run.spec_as(HypervisorSpec)


def test_secrets_from_their_sealed_paths() -> None:
    secrets = MigrationSecrets.from_paths({"source.password": "s3cret-pw",
                                           "destination.private_key": "KEY"})
    assert secrets.source.password is not None
    assert secrets.source.password.get_secret_value() == "s3cret-pw"
    assert secrets.destination.private_key is not None
    assert secrets.destination.password is None
    assert "s3cret-pw" not in repr(secrets)
    assert "s3cret-pw" not in str(secrets.model_dump())
