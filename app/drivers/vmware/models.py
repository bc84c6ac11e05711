"""vSphere's settings and placement models (shown in the OpenAPI document)."""

from __future__ import annotations

from pydantic import Field

from app.drivers.base import Placement
from app.models.schemas.cloud_fields import Host, Port, Text, TlsOptions


class VsphereSettings(TlsOptions):
    """vCenter (``vmware``) or a standalone ESXi host (``esxi``)."""

    host: Host
    port: Port = 443
    datacenter: Text | None = Field(default=None, description="Default datacenter.")


class VspherePlacement(Placement):
    """Where a VM is created on vSphere, by inventory names; each None means the default:
    the cloud's datacenter (else the only one), the datacenter's only compute resource,
    the datastore with the most free space, the datacenter's VM folder, no NIC."""

    datacenter: Text | None = None
    cluster: Text | None = None
    host: Text | None = None
    resource_pool: Text | None = None
    datastore: Text | None = None
    folder: Text | None = Field(default=None, description="Name or path under the VM folder.")
    network: Text | None = Field(default=None, description="Port group of the one NIC.")
