"""Export and import of VM disks through HttpNfcLeases (the VMware driver's data path).

Kept apart from :mod:`app.drivers.vmware.driver` (session, power, snapshots) because this is
where the lease life cycle lives: get a lease, keep it alive while bytes move, and end
it exactly once: complete on success, abort on any failure or cancellation. An aborted
import also destroys the VM the lease created (a real vCenter does that on abort; vcsim
does not, and an explicit destroy is harmless where the VM is already gone).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from pyVmomi import vim

from app.drivers.base import (
    CloudError,
    CloudStateError,
    DiskExport,
    DiskInfo,
    DiskStream,
    ImportDisk,
    ImportSpec,
    PowerState,
    ServerInfo,
    ServerLookup,
    SnapshotRef,
)
from app.drivers.kit.transfer import (
    PROBE_BYTES,
    disk_filler,
    probe_stream_format,
    remove_partial,
)
from app.drivers.vmware import inventory as inv
from app.drivers.vmware.errors import fault_text
from app.drivers.vmware.lease import STREAM_VMDK, LeaseKeeper, device_url, wait_ready
from app.drivers.vmware.models import VspherePlacement
from app.drivers.vmware.ovf import OvfDisk, OvfVm, build_ovf
from app.errors import InvalidInput, NotFound
from app.models.enums import ImageFormat
from app.transports.http import HttpDownload, upload

if TYPE_CHECKING:
    from app.drivers.vmware.driver import VmwareDriver


log = logging.getLogger(__name__)


def _reason(driver: VmwareDriver, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return driver.boundary.scrub(f"vmigrate: {text}")


# --- export ---------------------------------------------------------------------------


def _match_devices(vm_id: str, facts: inv.VmFacts, devices: Sequence[Any]) -> dict[str, Any]:
    """Disk key -> lease device URL entry.

    vCenter keys disk URLs ``/<vm moref>/<Controller><bus>:<unit>``; disks whose key
    does not match take the remaining disk URLs in device order.
    """
    disk_devices = [d for d in devices if d.disk]
    by_key = {str(d.key): d for d in disk_devices}
    out: dict[str, Any] = {}
    for disk in facts.info.disks:
        slot = facts.slots.get(disk.key)
        if slot is not None and (dev := by_key.get(f"/{vm_id}/{slot}")) is not None:
            out[disk.key] = dev
    rest = [d for d in disk_devices if all(d is not v for v in out.values())]
    for disk in [d for d in facts.info.disks if d.key not in out]:
        if not rest:
            raise CloudError(f"the export lease of {vm_id} has no URL for {disk.label}")
        out[disk.key] = rest.pop(0)
    return out


class VmwareExport:
    """The :class:`~app.drivers.base.DiskExport` of one ExportVm lease."""

    def __init__(self, driver: VmwareDriver, disks: Sequence[DiskInfo], devices: dict[str, Any],
                 keeper: LeaseKeeper) -> None:
        self._driver = driver
        self._disks = tuple(disks)
        self._devices = devices
        self._keeper = keeper
        self._streams: list[HttpDownload] = []

    @property
    def disks(self) -> Sequence[DiskInfo]:
        return self._disks

    async def open(self, disk: DiskInfo) -> DiskStream:
        device = self._devices.get(disk.key)
        if device is None:
            raise NotFound(f"disk {disk.label!r} ({disk.key}) is not part of this export")
        settings = self._driver.settings
        url = device_url(str(device.url), settings.host, settings.port)
        client, headers = await self._driver.transfer_client(url, device.sslThumbprint or None)
        stream = HttpDownload(client, url, headers=headers, errors=self._driver.errors,
                              on_bytes=self._keeper.add, fallback_size=disk.capacity)
        self._streams.append(stream)
        try:
            head = await stream.start(PROBE_BYTES)
        except BaseException:
            await stream.close()
            raise
        fmt = probe_stream_format(head, self._driver.capabilities.export_formats)
        return DiskStream(info=disk, format=fmt, source=stream, size=stream.content_length)

    async def close_all(self) -> None:
        for stream in self._streams:
            await stream.close()


@asynccontextmanager
async def export_disks(driver: VmwareDriver, server_id: str,
                       snapshot: SnapshotRef | None) -> AsyncIterator[DiskExport]:
    """See :meth:`app.drivers.base.SourceDriver.export_disks`.

    ExportVm exports the VM's current state and needs it powered off; ``snapshot``,
    when given, must still exist (it is the recovery point of the migration).
    """
    vm = await driver.vm(server_id)
    facts = await driver.facts(vm)
    name = f"VM {facts.info.name!r} ({server_id})"
    if facts.info.power_state is not PowerState.off:
        raise CloudStateError(
            f"{name} is powered {facts.info.power_state}: ExportVm needs it powered off "
            "(shut it down first)"
        )
    if snapshot is not None and all(s.id != snapshot.id for s in facts.snapshots):
        raise NotFound(f"snapshot {snapshot.name!r} of {name} no longer exists")
    lease = await driver.call("start the export", lambda: vm.ExportVm())
    options = driver.options
    keeper = LeaseKeeper(driver.call, lease, 1, options.lease_progress_interval)
    export: VmwareExport | None = None
    try:
        info = await wait_ready(driver.call, driver.errors, lease, options.lease_ready_timeout)
        devices = _match_devices(server_id, facts, list(info.deviceUrl or []))
        total = int(info.totalDiskCapacityInKB or 0) * 1024
        keeper = LeaseKeeper(driver.call, lease, total, options.lease_progress_interval)
        keeper.start()
        export = VmwareExport(driver, facts.info.disks, devices, keeper)
        yield export
    except BaseException as exc:
        if export is not None:
            await export.close_all()
        await keeper.abort(_reason(driver, exc))
        raise
    assert export is not None
    await export.close_all()
    await keeper.complete()


# --- import ---------------------------------------------------------------------------


def placement_of(spec: ImportSpec) -> VspherePlacement:
    """The spec's placement as vSphere's model (refusing fields vSphere does not have)."""
    if isinstance(spec.placement, VspherePlacement):
        return spec.placement
    try:
        return VspherePlacement.model_validate(spec.placement.model_dump(exclude_none=True))
    except ValueError as exc:
        raise InvalidInput(f"not a vSphere placement: {exc}") from None


def _import_spec_params(spec: ImportSpec, placement: VspherePlacement, target: inv.Target) -> Any:
    manager: Any = vim.OvfManager
    mapping = (
        [manager.NetworkMapping(name=placement.network, network=target.network)]
        if target.network is not None else []
    )
    return manager.CreateImportSpecParams(
        entityName=spec.name, diskProvisioning="thin", networkMapping=mapping
    )


async def import_vm(driver: VmwareDriver, spec: ImportSpec,
                    disks: Sequence[ImportDisk]) -> ServerInfo:
    """See :meth:`app.drivers.base.DestinationDriver.import_vm`."""
    content, ep, options = driver.content, driver.boundary, driver.options
    placement = placement_of(spec)
    fillers = [disk_filler(d, ImageFormat.vmdk) for d in disks]
    target = await driver.call("resolve the placement", lambda: inv.resolve_placement(
        content, placement, driver.settings.datacenter, ep))
    if await driver.call("check the VM name",
                         lambda: inv.name_taken(content, target.folder, spec.name)):
        raise CloudStateError(f"the target folder on {ep.where} already holds {spec.name!r}")
    files = [f"disk-{i}.vmdk" for i in range(len(disks))]
    descriptor = build_ovf(OvfVm(
        name=spec.name, cpus=spec.cpus, memory_mib=spec.memory_mib, guest_id=spec.guest_id,
        firmware=spec.firmware, network=placement.network if target.network else None,
        disks=tuple(OvfDisk(f, d.capacity, d.size) for f, d in zip(files, disks, strict=True)),
    ))
    params = _import_spec_params(spec, placement, target)
    result = await driver.call("prepare the import", lambda: content.ovfManager.CreateImportSpec(
        ovfDescriptor=descriptor, resourcePool=target.pool, datastore=target.datastore,
        cisp=params))
    if result.error:
        texts = "; ".join(e.localizedMessage or fault_text(e.fault) for e in result.error)
        raise CloudError(f"{ep.where} rejected the VM description: {texts}")
    for warning in result.warning or []:
        log.warning("import of %s: %s", spec.name, warning.localizedMessage)
    import_spec = result.importSpec
    config = import_spec.configSpec
    option: Any = vim.option.OptionValue
    config.extraConfig = [*(config.extraConfig or []),
                          option(key=inv.MARKER_KEY, value=spec.marker)]
    item_file = {str(i.deviceId): str(i.path) for i in result.fileItem or []}
    lease = await driver.call("start the import", lambda: target.pool.ImportVApp(
        spec=import_spec, folder=target.folder, host=target.host))
    keeper = LeaseKeeper(driver.call, lease, 1, options.lease_progress_interval)
    entity: Any = None
    try:
        info = await wait_ready(driver.call, driver.errors, lease, options.lease_ready_timeout)
        entity = info.entity
        by_file = {item_file.get(str(d.importKey)): d for d in info.deviceUrl or []}
        missing = [f for f in files if f not in by_file]
        if missing:
            raise CloudError(f"the import lease has no upload URL for {', '.join(missing)}")
        total = sum(d.size or d.capacity for d in disks)
        keeper = LeaseKeeper(driver.call, lease, total, options.lease_progress_interval)
        keeper.start()
        for name, disk, fill in zip(files, disks, fillers, strict=True):
            device = by_file[name]
            url = device_url(str(device.url), driver.settings.host, driver.settings.port)
            client, headers = await driver.transfer_client(url, device.sslThumbprint or None)
            await upload(client, url, fill, size=disk.size, headers=headers,
                         content_type=STREAM_VMDK, errors=driver.errors, on_bytes=keeper.add,
                         depth=options.upload_queue_depth)
        await keeper.complete()
    except BaseException as exc:
        await keeper.abort(_reason(driver, exc))
        ref = ServerLookup(id=str(entity._moId)) if entity is not None else ServerLookup(
            name=spec.name)
        await remove_partial(driver, ref, marker=spec.marker, name=spec.name)
        raise
    vm_id = str(entity._moId)
    if spec.power_on:
        await driver.power_on(vm_id)
    return (await driver.facts(entity)).info
