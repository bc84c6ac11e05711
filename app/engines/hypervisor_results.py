"""What each step of the hypervisor and conversion engines records: typed, frozen
models, stored as the step rows' ``result`` (shown by the API) and read back by later
steps and resumed attempts with ``migration.result_of(step, Model)``."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict

from app.drivers.base import DiskInfo, PowerState, ShutdownMethod
from app.engines.runner import Checkpoint, StepResult
from app.models.enums import ImageFormat


class Disk(BaseModel):
    """One disk of the source server (or the library image), as validate found it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    label: str
    capacity: int
    path: str | None = None

    @classmethod
    def of(cls, info: DiskInfo) -> Disk:
        return cls(key=info.key, label=info.label, capacity=info.capacity, path=info.path)

    def info(self) -> DiskInfo:
        return DiskInfo(key=self.key, label=self.label, capacity=self.capacity, path=self.path)


class ValidateResult(StepResult):
    """The server (or library image) to migrate and the format its disks become."""

    server_id: str | None
    server_name: str
    power_state: PowerState | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    guest_id: str | None = None
    firmware: str | None = None
    target_format: ImageFormat
    disks: tuple[Disk, ...]


class PowerOffResult(StepResult):
    power_state: PowerState  # before the step: what restore_power goes back to
    method: ShutdownMethod


class SnapshotResult(StepResult):
    snapshot: str
    snapshot_id: str


class StagedDisk(BaseModel):
    """One disk converted into its staging file; ``digest`` is the source's."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    label: str
    capacity: int
    format: ImageFormat
    staged: str  # the staging key
    digest: str
    virtual_size: int


class TransferResult(StepResult):
    disks: tuple[StagedDisk, ...]


class CheckedImage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    label: str
    digest: str
    size: int  # bytes of the staged image file


class CheckImageResult(StepResult):
    disks: tuple[CheckedImage, ...]


class StoreResult(StepResult):
    images: tuple[uuid.UUID, ...]


class ProvisionResult(StepResult):
    server_id: str
    server_name: str


class VerifyResult(StepResult):
    digests: tuple[str, ...]


class DiscardStagedResult(StepResult):
    removed: int


class RemoveSnapshotResult(StepResult):
    removed: bool


class RestorePowerResult(StepResult):
    restored: PowerState | None


class PartialDisk(BaseModel):
    """A disk whose conversion was interrupted: everything below ``offset`` of its
    staged ``format`` output is durable (only formats that can be continued)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    format: ImageFormat
    offset: int


class TransferCheckpoint(Checkpoint):
    """The transfer step's resume point: disks done, and the one under way."""

    transferred: dict[str, StagedDisk] = {}
    partial: PartialDisk | None = None


__all__ = [
    "CheckImageResult",
    "CheckedImage",
    "DiscardStagedResult",
    "Disk",
    "PartialDisk",
    "PowerOffResult",
    "ProvisionResult",
    "RemoveSnapshotResult",
    "RestorePowerResult",
    "SnapshotResult",
    "StagedDisk",
    "StoreResult",
    "TransferCheckpoint",
    "TransferResult",
    "ValidateResult",
    "VerifyResult",
]
