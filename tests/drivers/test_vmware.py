"""The VMware driver against a real govmomi vCenter simulator (``vcsim`` fixture).

Everything goes through the driver API. The simulator is shared by the session, so
each test uses its own VM (or creates one) and puts power states back as it found
them: ``tests/infra/test_vcsim.py`` expects the model VMs powered on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from app.dataplane.convert import convert
from app.drivers.base import (
    CloudAuthError,
    CloudStateError,
    CloudTlsError,
    CloudUnavailable,
    DestinationDriver,
    ImportDisk,
    ImportSpec,
    PowerState,
    ServerLookup,
    ShutdownMethod,
    SourceDriver,
)
from app.drivers.capabilities import IMPORT_FORMATS, MATRIX
from app.drivers.kit.connection import CloudConnection
from app.drivers.registry import SPECS, destination_driver, source_driver
from app.drivers.vmware.capabilities import CAPABILITIES as VMWARE_CAPABILITIES
from app.drivers.vmware.driver import VmwareDriver, VmwareOptions
from app.drivers.vmware.models import VspherePlacement, VsphereSettings
from app.drivers.vmware.spec import SPEC as VMWARE_SPEC
from app.errors import AppError, InvalidInput, NotFound
from app.formats.base import SequentialSink
from app.formats.digest import digest_extents, digest_file
from app.formats.io import BytesSink, BytesSource, FileSink, FileSource
from app.formats.registry import create_writer, open_reader
from app.models.enums import CloudKind, ImageFormat
from app.models.schemas.cloud_fields import PasswordCredentials
from app.transports.http import HttpDownload
from tests.infra.vcsim import Vcsim, find_vm, make_test_pki

pytest.importorskip("pyVmomi")

KiB, MiB = 1024, 1024 * 1024
FAST = VmwareOptions(http_timeout=30.0, task_timeout=60.0, lease_ready_timeout=30.0,
                     lease_progress_interval=0.05, shutdown_poll=0.05)


def vsphere(vcsim: Vcsim, **changes: Any) -> VsphereSettings:
    fields: dict[str, Any] = {
        "host": vcsim.host, "port": vcsim.port, "ca_bundle": vcsim.ca_bundle.read_text(),
        "datacenter": vcsim.datacenter,
    }
    fields.update(changes)
    return VsphereSettings(**fields)


def creds(vcsim: Vcsim, password: str | None = None) -> PasswordCredentials:
    return PasswordCredentials.model_validate(
        {"username": vcsim.username, "password": password or vcsim.password}
    )


def make_driver(vcsim: Vcsim, kind: CloudKind = CloudKind.vmware, **changes: Any) -> VmwareDriver:
    return VmwareDriver(kind, vsphere(vcsim, **changes), creds(vcsim), FAST)


@pytest.fixture
async def driver(vcsim: Vcsim) -> AsyncIterator[VmwareDriver]:
    async with make_driver(vcsim) as d:
        yield d


def disk_with_holes(path: Path, size: int, seed: int) -> Path:
    """Random data in about half of the 256 KiB blocks, an unaligned run, holes elsewhere."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, 256 * KiB):
            if rng.random() < 0.5:
                f.seek(offset + rng.randrange(0, 64 * KiB))
                f.write(rng.randbytes(rng.randrange(1, 128 * KiB)))
        f.seek(size // 3 + 7)
        f.write(b"unaligned" * 100)
    return path


async def to_stream_optimized(raw: Path, out: Path) -> Path:
    source = FileSource(raw)
    reader = await open_reader(source, "raw")
    sink = FileSink(out)
    try:
        await convert(reader, create_writer("vmdk", sink, reader.virtual_size))
    finally:
        await sink.close()
        await reader.close()
    return out


async def as_off(driver: VmwareDriver, server_id: str) -> PowerState:
    """Record the power state and power off; the caller restores it."""
    before = await driver.power_state(server_id)
    await driver.shutdown(server_id, grace=0)
    return before


# --- interface and capabilities --------------------------------------------------------


def test_driver_satisfies_both_protocols(vcsim: Vcsim) -> None:
    d = make_driver(vcsim)
    source: SourceDriver = d
    destination: DestinationDriver = d
    assert source.capabilities is destination.capabilities is VMWARE_CAPABILITIES


def test_the_api_matrix_is_derived_from_the_spec(vcsim: Vcsim) -> None:
    assert VMWARE_SPEC in SPECS
    for kind in VMWARE_SPEC.kind_names:
        assert IMPORT_FORMATS[kind] == VMWARE_CAPABILITIES.import_formats
        for role in VMWARE_SPEC.roles:
            assert MATRIX.allows(role, kind)
    assert ImageFormat.vmdk in VMWARE_CAPABILITIES.export_formats
    assert not VMWARE_CAPABILITIES.export_while_running
    # The registry builds this driver for both kinds and both roles.
    conn = CloudConnection(id=uuid.uuid4(), kind=CloudKind.esxi, settings=vsphere(vcsim),
                           credentials=creds(vcsim))
    assert isinstance(source_driver(conn), VmwareDriver)
    assert isinstance(destination_driver(conn), VmwareDriver)


# --- validate ---------------------------------------------------------------------------


async def test_validate_finds_the_vm_every_way(driver: VmwareDriver) -> None:
    info = await driver.validate_source(ServerLookup(name="DC0_H0_VM0"))
    assert info.name == "DC0_H0_VM0"
    assert info.id.startswith("vm-")
    (disk,) = info.disks
    assert disk.capacity == 1 * MiB
    assert disk.path == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
    assert info.uuid
    for ref in (ServerLookup(id=info.id), ServerLookup(id=info.uuid),
                ServerLookup(id="DC0/vm/DC0_H0_VM0")):
        assert (await driver.validate_source(ref)).id == info.id, ref


@pytest.mark.parametrize("ref", [ServerLookup(name="no-such-vm"), ServerLookup(id="vm-987654"),
                                 ServerLookup(id="DC0/vm/no-such-vm"),
                                 ServerLookup(id="00000000-1111-2222-3333-444444444444")])
async def test_unknown_vm_is_a_permanent_not_found_naming_it(
    driver: VmwareDriver, ref: ServerLookup
) -> None:
    with pytest.raises(NotFound) as info:
        await driver.validate_source(ref)
    assert not info.value.retryable
    assert str(ref.id or ref.name) in str(info.value)


async def test_an_id_of_no_known_shape_is_invalid_input(driver: VmwareDriver) -> None:
    with pytest.raises(InvalidInput, match="moref"):
        await driver.validate_source(ServerLookup(id="not a vm id"))


@pytest.mark.parametrize("kind", [CloudKind.vmware, CloudKind.esxi])
async def test_wrong_password_is_an_auth_error_without_the_password(
    vcsim: Vcsim, kind: CloudKind
) -> None:
    secret = "Wr0ng-Secret-Value!"
    bad = VmwareDriver(kind, vsphere(vcsim), creds(vcsim, secret), FAST)
    with pytest.raises(CloudAuthError) as info:
        await bad.connect()
    err = info.value
    assert not err.retryable
    assert vcsim.username in str(err)
    assert vcsim.host in str(err)
    assert "vCenter" in str(err) if kind is CloudKind.vmware else "ESXi host" in str(err)
    rendered = "".join(traceback.format_exception(err))
    assert secret not in rendered
    assert vcsim.password not in rendered
    assert secret not in repr(err.extra)


async def test_untrusted_certificate_is_a_tls_error_with_its_thumbprint(
    vcsim: Vcsim, tmp_path: Path
) -> None:
    other = make_test_pki(tmp_path, name="some other CA")
    untrusting = make_driver(vcsim, ca_bundle=other.ca_cert.read_text())
    with pytest.raises(CloudTlsError) as info:
        await untrusting.connect()
    assert not info.value.retryable
    assert info.value.thumbprint == vcsim.thumbprint
    assert vcsim.thumbprint in str(info.value)
    assert info.value.extra == {"thumbprint": vcsim.thumbprint}
    assert "unable to get local issuer certificate" in str(info.value)
    assert "the cloud's CA bundle" in str(info.value)


async def test_pinned_thumbprint_is_trusted_and_a_wrong_pin_is_not(vcsim: Vcsim) -> None:
    async with make_driver(vcsim, ca_bundle=None, tls_fingerprint=vcsim.thumbprint) as pinned:
        assert (await pinned.validate_source(ServerLookup(name="DC0_H0_VM0"))).disks
    wrong = "AB:" * 31 + "CD"
    with pytest.raises(CloudTlsError) as info:
        await make_driver(vcsim, ca_bundle=None, tls_fingerprint=wrong).connect()
    assert info.value.thumbprint == vcsim.thumbprint


async def test_verification_can_be_switched_off_explicitly(vcsim: Vcsim) -> None:
    async with make_driver(vcsim, ca_bundle=None, verify_tls=False) as insecure:
        assert (await insecure.validate_source(ServerLookup(name="DC0_H0_VM0"))).disks


async def test_nothing_listening_is_retryable(vcsim: Vcsim) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CloudUnavailable) as info:
        await make_driver(vcsim, port=port).connect()
    assert info.value.retryable


# --- power and snapshots ---------------------------------------------------------------


async def test_shutdown_power_on_and_restore(driver: VmwareDriver) -> None:
    vm = (await driver.validate_source(ServerLookup(name="DC0_C0_RP0_VM0"))).id
    await driver.power_on(vm)
    try:
        assert await driver.shutdown(vm, grace=5) is ShutdownMethod.guest
        assert await driver.power_state(vm) is PowerState.off
        assert await driver.shutdown(vm, grace=5) is ShutdownMethod.already_off
        await driver.power_on(vm)
        await driver.power_on(vm)  # idempotent
        assert await driver.power_state(vm) is PowerState.on
        assert await driver.shutdown(vm, grace=0) is ShutdownMethod.power_off
        await driver.restore_power(vm, PowerState.on)
        assert await driver.power_state(vm) is PowerState.on
        await driver.restore_power(vm, PowerState.off)
        assert await driver.power_state(vm) is PowerState.off
    finally:
        await driver.power_on(vm)


async def test_snapshots_are_idempotent_by_name(driver: VmwareDriver) -> None:
    vm = (await driver.validate_source(ServerLookup(name="DC0_H0_VM0"))).id
    name = "vmigrate-test-snapshot"
    first = await driver.create_snapshot(vm, name)
    try:
        assert first.id.startswith("snapshot-")
        assert await driver.create_snapshot(vm, name) == first  # a resumed run
        assert await driver.find_snapshot(vm, name) == first
    finally:
        assert await driver.remove_snapshot(vm, name)
    assert not await driver.remove_snapshot(vm, name)
    assert await driver.find_snapshot(vm, name) is None
    assert not await driver.remove_snapshot("vm-987654", name)  # VM gone: nothing to do


# --- export ---------------------------------------------------------------------------


def count_progress_reports(driver: VmwareDriver, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every pyvmomi call of the driver that succeeded, by action."""
    done: list[str] = []
    original = driver.call

    async def call(action: str, fn: Callable[[], Any]) -> Any:
        result = await original(action, fn)
        done.append(action)
        return result

    monkeypatch.setattr(driver, "call", call)
    return done


async def export_digest(
    driver: VmwareDriver, vm: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[ImageFormat, str, str]:
    """Export the VM's one disk; (format, vmd1 digest, lease URL).

    Reads the first extent, then stalls for several keep-alive intervals, as a slow
    pipeline would: the lease's progress must have been reported meanwhile.
    """
    calls = count_progress_reports(driver, monkeypatch)
    async with driver.export_disks(vm, await driver.find_snapshot(vm, "vmigrate-x")) as export:
        (disk,) = export.disks
        stream = await export.open(disk)
        url = cast(HttpDownload, stream.source).url
        reader = await open_reader(stream.source, stream.format.value)
        extents = reader.extents()
        try:
            first = await anext(extents)
            await asyncio.sleep(10 * FAST.lease_progress_interval)
            assert calls.count("report transfer progress") >= 3

            async def all_extents() -> AsyncIterator[Any]:
                yield first
                async for extent in extents:
                    yield extent

            digest = await digest_extents(all_extents(), reader.virtual_size)
        finally:
            await stream.close()
        return stream.format, digest, url


async def lease_url_gone(vcsim: Vcsim, url: str) -> bool:
    async with httpx.AsyncClient(verify=vcsim.ssl_context(), trust_env=False) as client:
        return (await client.get(url)).status_code == 404


async def test_export_of_a_raw_backed_disk_matches_the_uploaded_bytes(
    vcsim: Vcsim, driver: VmwareDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = disk_with_holes(tmp_path / "disk.raw", 1 * MiB, seed=1)
    vcsim.upload_disk("DC0_H0_VM1", raw)
    vm = (await driver.validate_source(ServerLookup(name="DC0_H0_VM1"))).id
    before = await as_off(driver, vm)
    await driver.create_snapshot(vm, "vmigrate-x")
    try:
        fmt, digest, url = await export_digest(driver, vm, monkeypatch)
    finally:
        await driver.remove_snapshot(vm, "vmigrate-x")
        await driver.restore_power(vm, before)
    assert fmt is ImageFormat.raw  # vcsim serves the backing file as it is
    assert digest == digest_file(raw)
    assert await lease_url_gone(vcsim, url)  # completed


async def test_export_of_a_stream_optimized_disk_is_read_as_vmdk(
    vcsim: Vcsim, driver: VmwareDriver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a real vCenter sends: the stream is probed and read sequentially as VMDK."""
    raw = disk_with_holes(tmp_path / "disk.raw", 5 * MiB + 512, seed=2)
    vcsim.upload_disk("DC0_C0_RP0_VM1", await to_stream_optimized(raw, tmp_path / "so.vmdk"))
    vm = (await driver.validate_source(ServerLookup(name="DC0_C0_RP0_VM1"))).id
    before = await as_off(driver, vm)
    try:
        fmt, digest, _ = await export_digest(driver, vm, monkeypatch)
    finally:
        await driver.restore_power(vm, before)
    assert fmt is ImageFormat.vmdk
    assert digest == digest_file(raw)


async def test_export_refuses_a_running_vm(driver: VmwareDriver) -> None:
    vm = (await driver.validate_source(ServerLookup(name="DC0_C0_RP0_VM1"))).id
    await driver.power_on(vm)
    with pytest.raises(CloudStateError, match="powered off") as info:
        async with driver.export_disks(vm, None):
            pass
    assert not info.value.retryable


async def test_a_failing_consumer_aborts_the_export_lease(
    vcsim: Vcsim, driver: VmwareDriver
) -> None:
    vm = (await driver.validate_source(ServerLookup(name="DC0_H0_VM1"))).id
    before = await as_off(driver, vm)
    urls: list[str] = []

    async def consume_and_break() -> None:
        async with driver.export_disks(vm, None) as export:
            stream = await export.open(export.disks[0])
            urls.append(cast(HttpDownload, stream.source).url)
            assert await stream.source.read(100)
            raise RuntimeError("consumer broke")

    try:
        with pytest.raises(RuntimeError, match="consumer broke"):
            await consume_and_break()
    finally:
        await driver.restore_power(vm, before)
    (url,) = urls
    assert await lease_url_gone(vcsim, url)


# --- import ---------------------------------------------------------------------------


async def stored_digest(vcsim: Vcsim, path: str) -> tuple[bytes, str]:
    """Read an imported disk's datastore file (vcsim keeps the uploaded VMDK as is)."""
    data = vcsim.read_datastore_file(path)
    reader = await open_reader(BytesSource(data), "vmdk")
    return data, await digest_extents(reader.extents(), reader.virtual_size)


def vm_devices(vcsim: Vcsim, name: str) -> tuple[list[str], str | None]:
    """(network names of the NICs, the vmigrate marker) as vSphere itself reports them."""
    from pyVmomi import vim

    with vcsim.connect() as si:
        vm: Any = find_vm(si, name)
        devices: list[Any] = list(vm.config.hardware.device)
        cards: list[Any] = [d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)]
        nics = [c.backing.deviceName for c in cards]
        marker = next((o.value for o in vm.config.extraConfig if o.key == "vmigrate.marker"),
                      None)
        return nics, marker


async def test_import_converts_a_raw_image_and_uploads_it(
    vcsim: Vcsim, driver: VmwareDriver, tmp_path: Path
) -> None:
    raw = disk_with_holes(tmp_path / "disk.raw", 3 * MiB, seed=3)
    reader = await open_reader(FileSource(raw), "raw")
    spec = ImportSpec(
        name="vmigrate-import-raw", marker="migration-1", cpus=2, memory_mib=256,
        placement=VspherePlacement(cluster="DC0_C0", datastore="LocalDS_0", network="VM Network"),
        power_on=True,
    )
    try:
        info = await driver.import_vm(spec, [ImportDisk(capacity=reader.virtual_size,
                                                        content=reader)])
    finally:
        await reader.close()
    try:
        assert info.name == spec.name
        assert info.power_state is PowerState.on
        assert (info.cpus, info.memory_mib) == (2, 256)
        (disk,) = info.disks
        assert disk.capacity == 3 * MiB
        assert disk.path == f"[LocalDS_0] {spec.name}/disk-0.vmdk"
        data, digest = await stored_digest(vcsim, disk.path)
        assert data[:4] == b"KDMV"
        assert digest == digest_file(raw)
        nics, marker = vm_devices(vcsim, spec.name)
        assert nics == ["VM Network"]
        assert marker == spec.marker
        with pytest.raises(CloudStateError, match="not created by this migration"):
            await driver.destroy_vm(ServerLookup(id=info.id), marker="another-migration")
    finally:
        assert await driver.destroy_vm(ServerLookup(name=spec.name), marker=spec.marker)
    assert not await driver.destroy_vm(ServerLookup(id=info.id), marker=spec.marker)
    with pytest.raises(NotFound):
        await driver.validate_source(ServerLookup(name=spec.name))


async def test_import_with_an_engine_filler_and_a_known_length(
    vcsim: Vcsim, driver: VmwareDriver, tmp_path: Path
) -> None:
    """The engine's path: its own pipeline writes into the upload; Content-Length sent."""
    raw = disk_with_holes(tmp_path / "disk.raw", 2 * MiB, seed=4)
    encoded = BytesSink()
    reader = await open_reader(FileSource(raw), "raw")
    await convert(reader, create_writer("vmdk", encoded, reader.virtual_size))
    await reader.close()
    payload = bytes(encoded.buffer)

    async def fill(sink: SequentialSink) -> None:
        for i in range(0, len(payload), 300 * KiB):
            await sink.write(payload[i : i + 300 * KiB])

    spec = ImportSpec(name="vmigrate-import-filler", marker="migration-2",
                      placement=VspherePlacement(host="DC0_H0"))
    info = await driver.import_vm(
        spec, [ImportDisk(capacity=2 * MiB, content=fill, size=len(payload))]
    )
    try:
        assert info.power_state is PowerState.off
        data, digest = await stored_digest(vcsim, info.disks[0].path or "")
        assert data == payload
        assert digest == digest_file(raw)
    finally:
        await driver.destroy_vm(ServerLookup(id=info.id), marker=spec.marker)


def failing_filler(after: int) -> Callable[[SequentialSink], Awaitable[None]]:
    async def fill(sink: SequentialSink) -> None:
        await sink.write(b"KDMV" + bytes(after))
        raise RuntimeError("source disk unreadable")

    return fill


async def test_a_failed_upload_aborts_the_lease_and_removes_the_vm(
    driver: VmwareDriver, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ImportSpec(name="vmigrate-import-fails", marker="migration-3",
                      placement=VspherePlacement(cluster="DC0_C0"))
    caplog.set_level(logging.INFO, logger="app.drivers")
    with pytest.raises(RuntimeError, match="source disk unreadable"):
        await driver.import_vm(spec, [ImportDisk(capacity=1 * MiB, content=failing_filler(MiB))])
    assert f"removed the partly imported VM {spec.name}" in caplog.text
    assert "abort" not in caplog.text  # the abort itself succeeded
    with pytest.raises(NotFound):
        await driver.validate_source(ServerLookup(name=spec.name))


async def test_import_rejects_unknown_placement_and_taken_names(driver: VmwareDriver) -> None:
    disk = ImportDisk(capacity=MiB, content=failing_filler(0))
    with pytest.raises(InvalidInput, match=r"no datastore named 'nope'.*LocalDS_0"):
        await driver.import_vm(
            ImportSpec(name="vmigrate-never", marker="m",
                       placement=VspherePlacement(cluster="DC0_C0", datastore="nope")), [disk])
    with pytest.raises(InvalidInput, match="choose one with cluster or host"):
        await driver.import_vm(ImportSpec(name="vmigrate-never", marker="m"), [disk])
    with pytest.raises(CloudStateError, match="already holds"):
        await driver.import_vm(
            ImportSpec(name="DC0_H0_VM0", marker="m",
                       placement=VspherePlacement(host="DC0_H0")), [disk])
    with pytest.raises(NotFound):
        await driver.validate_source(ServerLookup(name="vmigrate-never"))


async def test_errors_keep_their_kind_through_the_driver(driver: VmwareDriver) -> None:
    with pytest.raises(AppError) as info:
        await driver.power_state("vm-987654")
    assert isinstance(info.value, NotFound)
