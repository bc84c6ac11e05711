"""A minimal OVF 1.0 envelope for ``OvfManager.CreateImportSpec`` / ``ImportVApp``.

The VMware driver creates VMs the way ovftool does: describe the VM in OVF, let
vCenter turn that into an import spec (so vCenter, not this code, decides device
keys, file names and defaults for the host's hardware version), then upload one
streamOptimized VMDK per disk through the import lease.

What the envelope holds, and nothing more: CPUs, memory, guest OS id, firmware, as
many LSI Logic SCSI controllers as the disks need (15 per controller, unit 7 is the
controller's own), the disks as thin streamOptimized files ``disk-N.vmdk``, and one
vmxnet3 NIC when a network is named. Built with ElementTree so names are escaped.
Item children are in alphabetical order, as the CIM RASD schema's sequence requires
(vCenter validates descriptors against it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

HW_VERSION = "vmx-13"  # ESXi 6.5 and later
DISKS_PER_CONTROLLER = 15
MAX_CONTROLLERS = 4
DEFAULT_GUEST = "otherGuest64"

for _prefix, _ns in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS), ("vmw", VMW_NS)):
    ET.register_namespace(_prefix, _ns)


@dataclass(frozen=True, slots=True)
class OvfDisk:
    file_name: str  # the References href; matched back through fileItem.path
    capacity: int  # bytes, rounded up to whole KiB (vSphere's unit)
    size: int | None = None  # encoded bytes, when known


@dataclass(frozen=True, slots=True)
class OvfVm:
    name: str
    cpus: int
    memory_mib: int
    guest_id: str | None
    firmware: str | None
    network: str | None  # the OVF network name; mapped to a vSphere network on import
    disks: tuple[OvfDisk, ...]


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _sub(parent: ET.Element, ns: str, tag: str, text: str | None = None,
         attrs: dict[str, str] | None = None) -> ET.Element:
    el = ET.SubElement(parent, _q(ns, tag), attrs or {})
    if text is not None:
        el.text = text
    return el


def _item(parent: ET.Element, fields: dict[str, str]) -> None:
    item = _sub(parent, OVF_NS, "Item")
    for name in sorted(fields):
        _sub(item, RASD_NS, name, fields[name])


def round_capacity(capacity: int) -> int:
    """vSphere sizes disks in KiB: round up (the tail reads as zeros)."""
    return -(-capacity // 1024) * 1024


def build_ovf(vm: OvfVm) -> str:
    """The OVF descriptor text for ``vm`` (raises ``ValueError`` for too many disks)."""
    if len(vm.disks) > DISKS_PER_CONTROLLER * MAX_CONTROLLERS:
        raise ValueError(
            f"{len(vm.disks)} disks: at most {DISKS_PER_CONTROLLER * MAX_CONTROLLERS} supported"
        )
    env = ET.Element(_q(OVF_NS, "Envelope"))
    refs = _sub(env, OVF_NS, "References")
    disk_section = _sub(env, OVF_NS, "DiskSection")
    _sub(disk_section, OVF_NS, "Info", "Virtual disks")
    for i, disk in enumerate(vm.disks):
        attrs = {_q(OVF_NS, "id"): f"file{i}", _q(OVF_NS, "href"): disk.file_name}
        if disk.size is not None:
            attrs[_q(OVF_NS, "size")] = str(disk.size)
        _sub(refs, OVF_NS, "File", attrs=attrs)
        _sub(disk_section, OVF_NS, "Disk", attrs={
            _q(OVF_NS, "diskId"): f"vmdisk{i}",
            _q(OVF_NS, "fileRef"): f"file{i}",
            _q(OVF_NS, "capacity"): str(round_capacity(disk.capacity)),
            _q(OVF_NS, "capacityAllocationUnits"): "byte",
            _q(OVF_NS, "format"): STREAM_OPTIMIZED,
        })
    if vm.network is not None:
        net_section = _sub(env, OVF_NS, "NetworkSection")
        _sub(net_section, OVF_NS, "Info", "Logical networks")
        net = _sub(net_section, OVF_NS, "Network", attrs={_q(OVF_NS, "name"): vm.network})
        _sub(net, OVF_NS, "Description", f"The {vm.network} network")

    system = _sub(env, OVF_NS, "VirtualSystem", attrs={_q(OVF_NS, "id"): vm.name})
    _sub(system, OVF_NS, "Info", "A virtual machine migrated by vmigrate")
    _sub(system, OVF_NS, "Name", vm.name)
    os_section = _sub(system, OVF_NS, "OperatingSystemSection", attrs={
        _q(OVF_NS, "id"): "1", _q(VMW_NS, "osType"): vm.guest_id or DEFAULT_GUEST,
    })
    _sub(os_section, OVF_NS, "Info", "The guest operating system")

    hw = _sub(system, OVF_NS, "VirtualHardwareSection")
    _sub(hw, OVF_NS, "Info", "Virtual hardware requirements")
    sys_el = _sub(hw, OVF_NS, "System")
    for tag, text in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                      ("VirtualSystemIdentifier", vm.name), ("VirtualSystemType", HW_VERSION)):
        _sub(sys_el, VSSD_NS, tag, text)
    _item(hw, {"AllocationUnits": "hertz * 10^6", "ElementName": f"{vm.cpus} virtual CPU(s)",
               "InstanceID": "1", "ResourceType": "3", "VirtualQuantity": str(vm.cpus)})
    _item(hw, {"AllocationUnits": "byte * 2^20", "ElementName": f"{vm.memory_mib} MB of memory",
               "InstanceID": "2", "ResourceType": "4", "VirtualQuantity": str(vm.memory_mib)})
    next_id = 3
    controllers = -(-len(vm.disks) // DISKS_PER_CONTROLLER) if vm.disks else 1
    controller_ids = []
    for bus in range(controllers):
        _item(hw, {"Address": str(bus), "ElementName": f"SCSI controller {bus}",
                   "InstanceID": str(next_id), "ResourceSubType": "lsilogic",
                   "ResourceType": "6"})
        controller_ids.append(next_id)
        next_id += 1
    for i in range(len(vm.disks)):
        bus, slot = divmod(i, DISKS_PER_CONTROLLER)
        unit = slot if slot < 7 else slot + 1  # unit 7 is the SCSI controller itself
        _item(hw, {"AddressOnParent": str(unit), "ElementName": f"Hard disk {i + 1}",
                   "HostResource": f"ovf:/disk/vmdisk{i}", "InstanceID": str(next_id),
                   "Parent": str(controller_ids[bus]), "ResourceType": "17"})
        next_id += 1
    if vm.network is not None:
        _item(hw, {"AddressOnParent": "7", "AutomaticAllocation": "true",
                   "Connection": vm.network, "ElementName": "Network adapter 1",
                   "InstanceID": str(next_id), "ResourceSubType": "VmxNet3",
                   "ResourceType": "10"})
    if vm.firmware:
        _sub(hw, VMW_NS, "Config", attrs={
            _q(OVF_NS, "required"): "false", _q(VMW_NS, "key"): "firmware",
            _q(VMW_NS, "value"): vm.firmware,
        })
    body = ET.tostring(env, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'
