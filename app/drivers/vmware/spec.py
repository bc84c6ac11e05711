"""The VMware platform's declaration (see :class:`~app.drivers.kit.spec.DriverSpec`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.drivers.kit.connection import CloudConnection
from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.vmware.capabilities import CAPABILITIES
from app.drivers.vmware.models import VspherePlacement, VsphereSettings
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import PasswordCredentials
from app.models.schemas.clouds import KindSchema

if TYPE_CHECKING:
    from app.drivers.vmware.driver import VmwareDriver


def _driver(conn: CloudConnection) -> VmwareDriver:
    from app.drivers.vmware.driver import VmwareDriver  # pyvmomi only when used

    return VmwareDriver.from_connection(conn)


SPEC = DriverSpec(
    platform="VMware vSphere",
    kinds=(
        KindSchema(CloudKind.vmware, "Vmware", VsphereSettings, PasswordCredentials),
        KindSchema(CloudKind.esxi, "Esxi", VsphereSettings, PasswordCredentials),
    ),
    roles=frozenset({Role.hypervisor_source, Role.hypervisor_destination}),
    placement=VspherePlacement,
    capabilities=CAPABILITIES,
    source=_driver,
    destination=_driver,
    endpoint_fields=("host", "port"),
)
