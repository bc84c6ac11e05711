"""Which cloud kinds can play which part in which migration: the capability matrix.

The API consults this before anything runs, so an impossible pair (a Xen cloud as the
destination of an image extract, a live stream onto a new VM in a cloud no driver can
provision in) is a 422 naming the field and the kinds that would work, rather than a
failure an hour into a run. It is data, not code: a driver that gains a capability
registers it (:meth:`CapabilityMatrix.register`) and the API follows.

Choices beyond the letter of the spec:

* ``metapod`` is a hypervisor *source* as well as a destination: it is OpenStack-based,
  so the OpenStack export path applies unchanged.
* "Any cloud" as an image-extract source excludes the ``linux`` kind: that kind is a
  plain SSH host, and image extract works over WinRM on Windows only.
* "Any cloud" as a live-stream source includes ``linux`` (the natural way to name a
  bare Linux host) and every hypervisor or cloud kind whose guests we reach by SSH.
* No kind can yet provision a new live-stream destination: no provisioning driver
  exists. The role is in the matrix with no members, so the API answers with a clear
  422 today and accepts the first kind a driver registers tomorrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum

from app.models.enums import CloudKind, ImageFormat


class Role(StrEnum):
    """A part a cloud plays in a migration."""

    hypervisor_source = "hypervisor_source"
    hypervisor_destination = "hypervisor_destination"
    image_extract_source = "image_extract_source"
    image_extract_destination = "image_extract_destination"
    live_stream_source = "live_stream_source"
    live_stream_new_destination = "live_stream_new_destination"

    @property
    def described(self) -> str:
        """How an error message names the role: "be the source of a hypervisor migration"."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Role, str] = {
    Role.hypervisor_source: "be the source of a hypervisor migration",
    Role.hypervisor_destination: "be the destination of a hypervisor migration (mode new)",
    Role.image_extract_source: "be the source of an image extract",
    Role.image_extract_destination: "be the destination of an image extract",
    Role.live_stream_source: "be the source of a live stream",
    Role.live_stream_new_destination: "provision a new live-stream destination",
}

_HYPERVISOR_SOURCES = (
    CloudKind.vmware, CloudKind.esxi, CloudKind.openstack, CloudKind.metapod, CloudKind.xen,
    CloudKind.nutanix, CloudKind.azure, CloudKind.hyperv,
)
_HYPERVISOR_DESTINATIONS = (
    CloudKind.softlayer, CloudKind.openstack, CloudKind.metapod, CloudKind.xen,
    CloudKind.amazon, CloudKind.vmware, CloudKind.esxi, CloudKind.nutanix, CloudKind.hyperv,
)

#: Formats a mode-``store`` migration can leave in the image library (the spec's list).
STORE_FORMATS: tuple[ImageFormat, ...] = (
    ImageFormat.vhd, ImageFormat.qcow2, ImageFormat.raw, ImageFormat.vmdk,
)

#: Disk formats each destination kind imports, preferred first: the ``convert`` step of a
#: mode-``new`` migration converts to the first format the destination accepts.
IMPORT_FORMATS: Mapping[CloudKind, tuple[ImageFormat, ...]] = {
    CloudKind.vmware: (ImageFormat.vmdk,),
    CloudKind.esxi: (ImageFormat.vmdk,),
    CloudKind.openstack: (ImageFormat.qcow2, ImageFormat.raw),
    CloudKind.metapod: (ImageFormat.qcow2, ImageFormat.raw),
    CloudKind.nutanix: (ImageFormat.qcow2, ImageFormat.raw, ImageFormat.vmdk),
    CloudKind.xen: (ImageFormat.vhd,),
    CloudKind.hyperv: (ImageFormat.vhd,),
    CloudKind.amazon: (ImageFormat.raw, ImageFormat.vmdk, ImageFormat.vhd),
    CloudKind.softlayer: (ImageFormat.vhd,),
}


class CapabilityMatrix:
    """Role -> the cloud kinds that can fill it."""

    def __init__(self, table: Mapping[Role, Iterable[CloudKind]]) -> None:
        self._table: dict[Role, set[CloudKind]] = {role: set() for role in Role}
        for role, kinds in table.items():
            self._table[role].update(kinds)

    def allows(self, role: Role, kind: str) -> bool:
        return kind in self._table[role]

    def kinds(self, role: Role) -> tuple[CloudKind, ...]:
        """The kinds that can fill ``role``, sorted (stable error messages)."""
        return tuple(sorted(self._table[role]))

    def register(self, role: Role, kind: CloudKind) -> None:
        """A driver declares it can fill ``role`` (e.g. provision live-stream targets)."""
        self._table[role].add(kind)

    def copy(self) -> CapabilityMatrix:
        return CapabilityMatrix(self._table)

    def refusal(self, role: Role, kind: str, cloud_name: str) -> str:
        """Why a cloud of ``kind`` cannot fill ``role``, naming the kinds that can."""
        allowed = self.kinds(role)
        head = f"cloud {cloud_name!r} is of kind {kind}, which cannot {role.described}"
        if not allowed:
            return f"{head}; no cloud kind can {role.described} yet"
        return f"{head}; allowed kinds: {', '.join(allowed)}"


def default_matrix() -> CapabilityMatrix:
    """The matrix from the product spec (see the module docstring for the choices)."""
    return CapabilityMatrix({
        Role.hypervisor_source: _HYPERVISOR_SOURCES,
        Role.hypervisor_destination: _HYPERVISOR_DESTINATIONS,
        Role.image_extract_source: [k for k in CloudKind if k is not CloudKind.linux],
        Role.image_extract_destination: (CloudKind.softlayer,),
        Role.live_stream_source: tuple(CloudKind),
        Role.live_stream_new_destination: (),
    })


#: The process-wide matrix; drivers register into it when they are imported.
MATRIX = default_matrix()
