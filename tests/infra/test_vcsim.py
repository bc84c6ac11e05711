"""The vcsim test stand-in does what a pyvmomi VMware driver will need (see ``vcsim.py``)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.infra import vcsim_fixtures
from tests.infra.vcsim import Vcsim, colon_hex, find_vm, make_test_pki, wait_for_task

try:
    from pyVmomi import vim
except ImportError:  # pragma: no cover - depends on the environment
    if os.environ.get("CI"):
        raise  # a CI machine must have pyvmomi: fail loudly rather than skip
    pytest.skip("pyvmomi is not installed (pip install pyvmomi)", allow_module_level=True)

STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"
POWER = vim.VirtualMachine.PowerState

# pyVmomi's stubs make every property Optional; these tests use Any for managed objects.


@pytest.fixture
def si(vcsim: Vcsim) -> Iterator[Any]:
    with vcsim.connect() as service_instance:
        yield service_instance


def vm_named(si: Any, name: str) -> Any:
    return find_vm(si, name)


def disks_of(vm: Any) -> list[Any]:
    return [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def wait_for_lease(lease: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lease.state == vim.HttpNfcLease.State.initializing:
        assert time.monotonic() < deadline, "lease still initializing"
        time.sleep(0.05)
    assert lease.state == vim.HttpNfcLease.State.ready, lease.error


def power(si: Any, vm: Any, state: str) -> None:
    if vm.runtime.powerState != state:
        on = state == POWER.poweredOn
        wait_for_task(si, vm.PowerOnVM_Task() if on else vm.PowerOffVM_Task())
    assert vm.runtime.powerState == state


# -- TLS ------------------------------------------------------------------------------


def test_connects_with_tls_verified_against_test_ca(vcsim: Vcsim) -> None:
    with vcsim.connect() as service_instance:
        si: Any = service_instance
        about = si.RetrieveContent().about
        assert about.apiType == "VirtualCenter"
        assert si.content.sessionManager.currentSession.userName == vcsim.username

    pem = ssl.get_server_certificate((vcsim.host, vcsim.port))
    served = x509.load_pem_x509_certificate(pem.encode())
    assert colon_hex(served.fingerprint(hashes.SHA256())) == vcsim.thumbprint

    with vcsim.http_client() as client:
        assert client.get(f"{vcsim.base_url}/about").status_code == 200


def test_wrong_ca_is_rejected(vcsim: Vcsim, tmp_path: Path) -> None:
    other = make_test_pki(tmp_path, name="some other CA")
    context = ssl.create_default_context(cafile=str(other.ca_cert))
    from pyVim import connect

    smart_connect: Any = connect.SmartConnect
    with pytest.raises(ssl.SSLCertVerificationError):
        smart_connect(
            host=vcsim.host,
            port=vcsim.port,
            user=vcsim.username,
            pwd=vcsim.password,
            sslContext=context,
        )
    with (
        httpx.Client(verify=context, trust_env=False) as client,
        pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        client.get(f"{vcsim.base_url}/about")


def test_wrong_password_is_rejected(vcsim: Vcsim) -> None:
    from pyVim import connect

    smart_connect: Any = connect.SmartConnect
    with pytest.raises(vim.fault.InvalidLogin):
        smart_connect(
            host=vcsim.host,
            port=vcsim.port,
            user=vcsim.username,
            pwd="wrong",
            sslContext=vcsim.ssl_context(),
        )


# -- inventory, snapshots, power ---------------------------------------------------------


def test_finds_vms_and_their_disks(si: Any) -> None:
    vm = vm_named(si, "DC0_H0_VM0")
    disks = disks_of(vm)
    assert len(disks) == 1
    assert disks[0].backing.fileName == "[LocalDS_0] DC0_H0_VM0/disk1.vmdk"
    assert disks[0].capacityInKB == 1024


def test_snapshot_create_revert_remove(si: Any) -> None:
    vm = vm_named(si, "DC0_H0_VM0")
    task = vm.CreateSnapshot_Task(
        name="vmigrate", description="before export", memory=False, quiesce=False
    )
    snapshot = wait_for_task(si, task)
    assert isinstance(snapshot, vim.vm.Snapshot)
    assert vm.snapshot.currentSnapshot == snapshot
    assert [s.name for s in vm.snapshot.rootSnapshotList] == ["vmigrate"]

    wait_for_task(si, snapshot.RevertToSnapshot_Task())
    wait_for_task(si, snapshot.RemoveSnapshot_Task(removeChildren=False))
    assert vm.snapshot is None or not vm.snapshot.rootSnapshotList


def test_power_off_and_on(si: Any) -> None:
    vm = vm_named(si, "DC0_C0_RP0_VM0")
    assert vm.runtime.powerState == POWER.poweredOn
    power(si, vm, POWER.poweredOff)
    power(si, vm, POWER.poweredOn)


# -- ExportVm ----------------------------------------------------------------------------


def test_export_vm_downloads_the_disk_bytes(vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    data = os.urandom(1 << 20) + bytes(2 << 20) + b"tail" * 1000
    source = tmp_path / "disk.bin"
    source.write_bytes(data)
    backing = vcsim.upload_disk("DC0_H0_VM1", source)
    assert backing == "[LocalDS_0] DC0_H0_VM1/disk1.vmdk"
    assert vcsim.read_datastore_file(backing) == data

    vm = vm_named(si, "DC0_H0_VM1")
    power(si, vm, POWER.poweredOff)
    lease = vm.ExportVm()
    wait_for_lease(lease)
    (device,) = lease.info.deviceUrl
    assert device.disk
    assert device.targetId == "disk-0.vmdk"
    assert device.url.startswith("https://*/nfc/")
    assert device.sslThumbprint == vcsim.thumbprint_sha1
    assert lease.info.totalDiskCapacityInKB == 1024

    url = vcsim.lease_url(device.url)
    with vcsim.http_client() as client:
        got = bytearray()
        with client.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(data))
            for chunk in response.iter_bytes():
                got += chunk
        assert bytes(got) == data
        ranged = client.get(url, headers={"Range": "bytes=1048576-1048579"})
        assert ranged.status_code == 206
        assert ranged.content == data[1 << 20 : (1 << 20) + 4]
    lease.HttpNfcLeaseProgress(percent=100)
    lease.HttpNfcLeaseComplete()

    with vcsim.http_client() as client:  # the lease is gone once completed
        assert client.get(url).status_code == 404


def test_export_vm_refuses_a_powered_on_vm(si: Any) -> None:
    vm = vm_named(si, "DC0_C0_RP0_VM1")
    power(si, vm, POWER.poweredOn)
    with pytest.raises(vim.fault.InvalidPowerState):
        vm.ExportVm()


# -- ImportVApp --------------------------------------------------------------------------

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
    <File ovf:id="file1" ovf:href="{name}-disk1.vmdk" ovf:size="{size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="{capacity_mib}"
        ovf:capacityAllocationUnits="byte * 2^20"
        ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>64 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>64</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def stream_optimized_vmdk(tmp_path: Path, capacity_mib: int) -> Path:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        vcsim_fixtures.require("streamOptimized VMDK", ["qemu-img (apt-get install qemu-utils)"])
        raise AssertionError("unreachable")
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(capacity_mib << 20)
        f.write(os.urandom(256 << 10))
        f.seek(3 << 20)
        f.write(b"vmigrate" * 4096)
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(
        [
            qemu_img,
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(raw),
            str(vmdk),
        ],
        check=True,
        timeout=60,
    )
    return vmdk


def test_import_vapp_uploads_a_stream_optimized_vmdk(vcsim: Vcsim, si: Any, tmp_path: Path) -> None:
    vmdk = stream_optimized_vmdk(tmp_path, capacity_mib=4)
    data = vmdk.read_bytes()
    assert data[:4] == b"KDMV"

    content: Any = si.RetrieveContent()
    datacenter = next(e for e in content.rootFolder.childEntity if isinstance(e, vim.Datacenter))
    cluster: Any = next(
        e for e in datacenter.hostFolder.childEntity if isinstance(e, vim.ClusterComputeResource)
    )
    datastore = datacenter.datastore[0]
    name = "imported-vm"
    params = cast(Any, vim.OvfManager).CreateImportSpecParams(entityName=name)
    result = content.ovfManager.CreateImportSpec(
        ovfDescriptor=OVF.format(name=name, size=len(data), capacity_mib=4),
        resourcePool=cluster.resourcePool,
        datastore=datastore,
        cisp=params,
    )
    assert not result.error, result.error
    (item,) = result.fileItem

    lease = cluster.resourcePool.ImportVApp(spec=result.importSpec, folder=datacenter.vmFolder)
    wait_for_lease(lease)
    (device,) = [d for d in lease.info.deviceUrl if d.importKey == item.deviceId]
    assert device.disk

    with vcsim.http_client() as client:
        response = client.post(
            vcsim.lease_url(device.url),
            content=data,
            headers={"Content-Type": STREAM_VMDK, "Content-Length": str(len(data))},
        )
    assert response.status_code == 200
    lease.HttpNfcLeaseProgress(percent=100)
    lease.HttpNfcLeaseComplete()

    vm = vm_named(si, name)
    (disk,) = disks_of(vm)
    assert disk.backing.fileName == f"[{datastore.name}] {name}/disk-0.vmdk"
    assert disk.capacityInKB == 4 * 1024
    assert vcsim.read_datastore_file(disk.backing.fileName) == data


def test_task_faults_are_raised(si: Any) -> None:
    vm = vm_named(si, "DC0_C0_RP0_VM1")
    power(si, vm, POWER.poweredOn)
    with pytest.raises(vim.fault.InvalidPowerState):
        wait_for_task(si, vm.PowerOnVM_Task())
