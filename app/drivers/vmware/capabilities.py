"""What the VMware driver can do: read by its spec and by the driver itself.

A module of its own so that the driver does not import the spec (which builds the
driver lazily): no import cycle inside the package.
"""

from __future__ import annotations

from app.drivers.base import DriverCapabilities
from app.models.enums import CloudKind, ImageFormat

#: The cloud kinds the VMware driver serves: vCenter and standalone ESXi hosts.
KINDS = frozenset({CloudKind.vmware, CloudKind.esxi})

CAPABILITIES = DriverCapabilities(
    export_formats=(ImageFormat.vmdk, ImageFormat.raw),
    import_formats=(ImageFormat.vmdk,),
    snapshots=True,
    graceful_shutdown=True,
    export_while_running=False,  # ExportVm needs the VM powered off
    resumable_export=False,
)
