"""Which driver serves which cloud kind. One line per platform as drivers land."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from app.drivers.base import DestinationDriver, SourceDriver
from app.errors import InvalidInput
from app.models.enums import CloudKind
from app.services.clouds import CloudConnection

if TYPE_CHECKING:
    from app.drivers.vmware import VmwareDriver


class NoDriver(InvalidInput):
    code = "no-driver"
    title = "No driver for this cloud kind"


def _vmware(conn: CloudConnection) -> VmwareDriver:
    from app.drivers.vmware import VmwareDriver

    return VmwareDriver.from_connection(conn)


_SOURCES: dict[CloudKind, Callable[[CloudConnection], SourceDriver]] = {
    CloudKind.vmware: _vmware, CloudKind.esxi: _vmware,
}
_DESTINATIONS: dict[CloudKind, Callable[[CloudConnection], DestinationDriver]] = {
    CloudKind.vmware: _vmware, CloudKind.esxi: _vmware,
}


def _missing(conn: CloudConnection, role: str, kinds: Iterable[CloudKind]) -> NoDriver:
    return NoDriver(f"vmigrate has no {role} driver for {conn.kind} clouds yet "
                    f"(available: {', '.join(sorted(k.value for k in kinds))})")


def source_driver(conn: CloudConnection) -> SourceDriver:
    """A (not yet connected) driver reading VMs from this cloud; raises :class:`NoDriver`."""
    factory = _SOURCES.get(conn.kind)
    if factory is None:
        raise _missing(conn, "source", _SOURCES)
    return factory(conn)


def destination_driver(conn: CloudConnection) -> DestinationDriver:
    """A (not yet connected) driver provisioning VMs on this cloud; raises :class:`NoDriver`."""
    factory = _DESTINATIONS.get(conn.kind)
    if factory is None:
        raise _missing(conn, "destination", _DESTINATIONS)
    return factory(conn)
