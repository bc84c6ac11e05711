"""vSphere inventory look-ups for the VMware driver: blocking pyvmomi code, run in threads.

Everything here is synchronous and is called by :mod:`app.drivers.vmware` through
``asyncio.to_thread`` inside ``map_exceptions``. Look-ups use a ContainerView and one
``RetrievePropertiesEx`` for the names (paged), rather than touching ``obj.name`` once
per object, because a real vCenter has thousands of VMs and every attribute read is a
SOAP round trip. pyVmomi is typed loosely, so managed objects are ``Any`` here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from app.drivers.base import DiskInfo, PowerState, ServerInfo, ServerLookup, SnapshotRef
from app.drivers.vmware.models import VspherePlacement
from app.errormap import Boundary
from app.errors import InvalidInput, NotFound

#: extraConfig key holding the marker of a VM this service created (see destroy_vm).
MARKER_KEY = "vmigrate.marker"

# vCenter morefs are "vm-123"; a standalone ESXi host numbers its VMs "123".
_MOREF = re.compile(r"^(vm-)?\d+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_POWER = {
    "poweredOn": PowerState.on,
    "poweredOff": PowerState.off,
    "suspended": PowerState.suspended,
}


def collect(
    content: Any, root: Any, vimtype: Any, paths: list[str]
) -> list[tuple[Any, dict[str, Any]]]:
    """Objects of ``vimtype`` under ``root`` (recursive) with the properties ``paths``."""
    pc: Any = vmodl.query.PropertyCollector
    view = content.viewManager.CreateContainerView(root, [vimtype], True)
    try:
        traversal = pc.TraversalSpec(
            name="view", path="view", skip=False, type=vim.view.ContainerView
        )
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[traversal])],
            propSet=[pc.PropertySpec(type=vimtype, pathSet=paths)],
        )
        out: list[tuple[Any, dict[str, Any]]] = []
        result = content.propertyCollector.RetrievePropertiesEx([spec], pc.RetrieveOptions())
        while result is not None:
            for item in result.objects:
                out.append((item.obj, {p.name: p.val for p in item.propSet}))
            if not result.token:
                break
            result = content.propertyCollector.ContinueRetrievePropertiesEx(result.token)
        return out
    finally:
        view.Destroy()


def properties(content: Any, obj: Any, paths: list[str]) -> dict[str, Any]:
    """Several properties of one object in one round trip (unset ones are absent)."""
    pc: Any = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=obj)],
        propSet=[pc.PropertySpec(type=type(obj), pathSet=paths)],
    )
    props: dict[str, Any] = {}
    for item in content.propertyCollector.RetrieveContents([spec]) or []:
        props.update({p.name: p.val for p in item.propSet})
    return props


def task_state(content: Any, task: Any) -> tuple[str, Any, Any]:
    """``(info.state, info.error, info.result)`` of a task, without fetching all of
    ``info`` (pyvmomi cannot decode some TaskInfo objects vcsim returns)."""
    props = properties(content, task, ["info.state", "info.error", "info.result"])
    return str(props.get("info.state")), props.get("info.error"), props.get("info.result")


def vm_by_moref(si: Any, content: Any, moref: str, ep: Boundary) -> Any:
    """The VM with this moref; ``NotFound`` naming it when there is none."""
    vm_class: Any = vim.VirtualMachine
    vm = vm_class(moref, si._stub)
    try:
        properties(content, vm, ["name"])
    except vmodl.fault.ManagedObjectNotFound:
        raise NotFound(f"no VM with id {moref!r} on {ep.where}") from None
    return vm


def find_vm(si: Any, content: Any, ref: ServerLookup, ep: Boundary) -> Any:
    """Resolve a :class:`ServerRef`: name, moref, instance/BIOS UUID or inventory path.

    Raises ``NotFound`` naming the VM, ``InvalidInput`` for an ambiguous name or an id
    of no known shape.
    """
    if ref.name is not None:
        hits = [
            obj for obj, props in collect(content, content.rootFolder, vim.VirtualMachine, ["name"])
            if props.get("name") == ref.name
        ]
        if not hits:
            raise NotFound(f"no VM named {ref.name!r} on {ep.where}")
        if len(hits) > 1:
            ids = ", ".join(sorted(str(h._moId) for h in hits))
            raise InvalidInput(
                f"{len(hits)} VMs are named {ref.name!r} on {ep.where} ({ids}): give its id"
            )
        return hits[0]
    assert ref.id is not None
    ident = ref.id.strip()
    if _MOREF.match(ident):
        return vm_by_moref(si, content, ident, ep)
    index = content.searchIndex
    if _UUID.match(ident):
        vm = index.FindByUuid(None, ident, True, True) or index.FindByUuid(None, ident, True, False)
        if vm is None:
            raise NotFound(f"no VM with UUID {ident!r} on {ep.where}")
        return vm
    if "/" in ident:
        vm = index.FindByInventoryPath(ident)
        if vm is None or not isinstance(vm, vim.VirtualMachine):
            raise NotFound(f"no VM at inventory path {ident!r} on {ep.where}")
        return vm
    raise InvalidInput(
        f"VM id {ident!r}: expected a moref (vm-123), an instance UUID or an inventory "
        "path (datacenter/vm/folder/name)"
    )


@dataclass(frozen=True, slots=True)
class VmFacts:
    """A VM as read once: the public :class:`ServerInfo` plus what only the driver needs."""

    info: ServerInfo
    #: disk key -> "<ControllerType><bus>:<unit>", the tail of a lease device URL's key.
    slots: dict[str, str]
    marker: str | None
    snapshots: tuple[SnapshotRef, ...]


def _walk_snapshots(nodes: Any) -> list[SnapshotRef]:
    out: list[SnapshotRef] = []
    for node in nodes or []:
        out.append(SnapshotRef(id=str(node.snapshot._moId), name=str(node.name)))
        out.extend(_walk_snapshots(node.childSnapshotList))
    return out


def _disks(devices: list[Any]) -> tuple[tuple[DiskInfo, ...], dict[str, str]]:
    by_key = {d.key: d for d in devices}
    disks: list[DiskInfo] = []
    slots: dict[str, str] = {}
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        capacity = int(getattr(d, "capacityInBytes", 0) or 0) or int(d.capacityInKB) * 1024
        key = str(d.key)
        label = str(d.deviceInfo.label) if d.deviceInfo is not None else f"disk {key}"
        disks.append(
            DiskInfo(key=key, label=label, capacity=capacity,
                     path=getattr(d.backing, "fileName", None))
        )
        controller = by_key.get(d.controllerKey)
        if controller is not None:
            kind = type(controller).__name__.rsplit(".", 1)[-1]
            slots[key] = f"{kind}{controller.busNumber}:{d.unitNumber or 0}"
    return tuple(disks), slots


def read_vm(content: Any, vm: Any, ep: Boundary) -> VmFacts:
    """Everything the driver needs about a VM, in one PropertyCollector call."""
    props = properties(content, vm, ["name", "runtime.powerState", "config", "snapshot"])
    config = props.get("config")
    name = str(props.get("name"))
    if config is None:
        raise InvalidInput(f"VM {name!r} ({vm._moId}) on {ep.where} is inaccessible (no config)")
    disks, slots = _disks(list(config.hardware.device))
    marker = next(
        (str(o.value) for o in config.extraConfig or [] if o.key == MARKER_KEY), None
    )
    snapshot = props.get("snapshot")
    info = ServerInfo(
        id=str(vm._moId),
        name=name,
        power_state=_POWER.get(str(props.get("runtime.powerState")), PowerState.unknown),
        disks=disks,
        uuid=config.instanceUuid,
        cpus=config.hardware.numCPU,
        memory_mib=config.hardware.memoryMB,
        guest_id=config.guestId,
        firmware=config.firmware,
    )
    snaps = tuple(_walk_snapshots(snapshot.rootSnapshotList)) if snapshot is not None else ()
    return VmFacts(info=info, slots=slots, marker=marker, snapshots=snaps)


def power_state(content: Any, vm: Any) -> PowerState:
    state = properties(content, vm, ["runtime.powerState"]).get("runtime.powerState")
    return _POWER.get(str(state), PowerState.unknown)


# --- placement for ImportVApp ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Resolved placement: the managed objects ImportVApp and CreateImportSpec need."""

    datacenter: Any
    pool: Any
    folder: Any
    datastore: Any
    host: Any | None
    network: Any | None


def _named(content: Any, root: Any, vimtype: Any, name: str, what: str, where: str) -> Any:
    found = [(o, p.get("name")) for o, p in collect(content, root, vimtype, ["name"])]
    hits = [o for o, n in found if n == name]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        known = ", ".join(sorted({str(n) for _, n in found})[:20]) or "none"
        raise InvalidInput(f"no {what} named {name!r} in {where} (there are: {known})")
    raise InvalidInput(f"{len(hits)} {what}s are named {name!r} in {where}: name a unique one")


def _only(content: Any, root: Any, vimtype: Any, what: str, where: str, field: str) -> Any:
    found = collect(content, root, vimtype, ["name"])
    if len(found) == 1:
        return found[0][0]
    names = ", ".join(sorted(str(p.get("name")) for _, p in found)) or "none"
    raise InvalidInput(f"{where} has {len(found)} {what}s ({names}): choose one with {field}")


def _folder(content: Any, dc: Any, path: str, where: str) -> Any:
    """A VM folder by path below the datacenter's vm folder ("a/b"), or by unique name."""
    if "/" in path.strip("/"):
        dc_name = properties(content, dc, ["name"]).get("name")
        folder = content.searchIndex.FindByInventoryPath(f"{dc_name}/vm/{path.strip('/')}")
        if folder is None or not isinstance(folder, vim.Folder):
            raise InvalidInput(f"no VM folder {path!r} in {where}")
        return folder
    return _named(content, dc.vmFolder, vim.Folder, path.strip("/"), "folder", where)


def resolve_placement(
    content: Any, placement: VspherePlacement, default_datacenter: str | None, ep: Boundary
) -> Target:
    """Turn placement names into managed objects; ``InvalidInput`` names what is wrong.

    Compute: a cluster, or a host (standalone or in the cluster), or a resource pool,
    else the datacenter's only compute resource. Datastore: by name, else the one with
    the most free space among those of the compute resource. Folder: the datacenter's
    VM folder unless named. Network: only when named.
    """
    dc_name = placement.datacenter or default_datacenter
    if dc_name:
        dc = _named(content, content.rootFolder, vim.Datacenter, dc_name, "datacenter", ep.where)
    else:
        dc = _only(content, content.rootFolder, vim.Datacenter, "datacenter", ep.where,
                   "datacenter")
    where = f"datacenter {properties(content, dc, ['name']).get('name')!r} on {ep.where}"
    host = None
    if placement.host:
        host = _named(content, dc.hostFolder, vim.HostSystem, placement.host, "host", where)
    if placement.cluster:
        compute = _named(content, dc.hostFolder, vim.ClusterComputeResource, placement.cluster,
                         "cluster", where)
        if host is not None and host.parent != compute:
            raise InvalidInput(f"host {placement.host!r} is not in cluster {placement.cluster!r}")
    elif host is not None:
        compute = host.parent
    elif placement.resource_pool:
        compute = None
    else:
        compute = _only(content, dc.hostFolder, vim.ComputeResource, "cluster or host", where,
                        "cluster or host")
    if placement.resource_pool:
        root = compute.resourcePool if compute is not None else dc.hostFolder
        pool = _named(content, root, vim.ResourcePool, placement.resource_pool, "resource pool",
                      where)
        compute = compute or pool.owner
    else:
        pool = compute.resourcePool
    if placement.datastore:
        datastore = _named(content, dc.datastoreFolder, vim.Datastore, placement.datastore,
                           "datastore", where)
    else:
        candidates = [
            (ds, properties(content, ds, ["summary.freeSpace", "summary.accessible"]))
            for ds in (host.datastore if host is not None else compute.datastore)
        ]
        usable = [(ds, p) for ds, p in candidates if p.get("summary.accessible", True)]
        if not usable:
            raise InvalidInput(f"no accessible datastore for the chosen compute in {where}")
        datastore = max(usable, key=lambda item: int(item[1].get("summary.freeSpace") or 0))[0]
    folder = _folder(content, dc, placement.folder, where) if placement.folder else dc.vmFolder
    network = (
        _named(content, dc.networkFolder, vim.Network, placement.network, "network", where)
        if placement.network else None
    )
    return Target(datacenter=dc, pool=pool, folder=folder, datastore=datastore, host=host,
                  network=network)


def name_taken(content: Any, folder: Any, name: str) -> bool:
    """Whether the folder already holds an entity called ``name``."""
    return content.searchIndex.FindChild(folder, name) is not None
