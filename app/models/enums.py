"""Enumerations shared by the ORM, the API schemas and the engines."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal


# Every platform of the product spec. Which of them a deployment accepts, and in which
# roles, is decided by the registered driver specs (app/drivers/registry.py): a kind
# without a driver is refused by the API.
class CloudKind(StrEnum):
    vmware = "vmware"
    esxi = "esxi"
    openstack = "openstack"
    metapod = "metapod"
    xen = "xen"
    nutanix = "nutanix"
    hyperv = "hyperv"
    azure = "azure"
    amazon = "amazon"
    softlayer = "softlayer"
    linux = "linux"


class MigrationType(StrEnum):
    hypervisor = "hypervisor"
    image_extract = "image_extract"
    live_stream = "live_stream"
    #: A library image converted into another format (POST /v1/images/{id}/conversions).
    conversion = "conversion"


class HypervisorMode(StrEnum):
    store = "store"
    new = "new"


class Platform(StrEnum):
    windows = "windows"
    linux = "linux"


class ImageFormat(StrEnum):
    """The disk formats of library images (every format with a reader and a writer)."""

    vhd = "vhd"
    qcow2 = "qcow2"
    raw = "raw"
    vmdk = "vmdk"
    vhdx = "vhdx"


#: The formats a mode-``store`` migration leaves in the library: the product spec's list
#: (a stored image converts to vhdx, like any library image, afterwards).
StoreFormat = Literal[ImageFormat.vhd, ImageFormat.qcow2, ImageFormat.raw, ImageFormat.vmdk]


class MigrationStatus(StrEnum):
    pending = "pending"
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL


class StepStatus(StrEnum):
    pending = "pending"
    running = "running"
    completed = "completed"
    failed = "failed"
    skipped = "skipped"

    def is_done(self) -> bool:
        return self in (StepStatus.completed, StepStatus.skipped)


class ImageStatus(StrEnum):
    creating = "creating"
    ready = "ready"
    failed = "failed"


_TERMINAL = frozenset(
    {MigrationStatus.completed, MigrationStatus.failed, MigrationStatus.cancelled}
)
