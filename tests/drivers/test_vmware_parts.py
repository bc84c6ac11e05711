"""Pieces of the VMware driver that need no simulator: OVF, error mapping, lease keeping,
streamed upload and TLS helpers."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import httpx
import pytest

pytest.importorskip("pyVmomi")

from pyVmomi import vim, vmodl

from app.drivers.base import (
    CloudAuthError,
    CloudError,
    CloudStateError,
    CloudTlsError,
    CloudUnavailable,
    ServerLookup,
)
from app.drivers.kit.errors import cloud_boundary
from app.drivers.kit.tls import colon_hex, normalise_fingerprint
from app.drivers.vmware.errors import VMWARE
from app.drivers.vmware.lease import LeaseKeeper, device_url
from app.drivers.vmware.ovf import OVF_NS, RASD_NS, OvfDisk, OvfVm, build_ovf
from app.errormap import Boundary, is_verification_failure
from app.errors import AppError, NotFound
from app.formats.base import SequentialSink
from app.transports.http import HttpError, upload

EP = cloud_boundary("vCenter vc.example:443", username="admin@vsphere.local",
                    trust="the cloud's CA bundle", secrets=("hunter2-secret",))


def translate(ep: Boundary, action: str, exc: BaseException) -> AppError:
    return VMWARE.translate(exc, ep, action)


def map_exceptions(ep: Boundary, action: str) -> AbstractContextManager[None]:
    return VMWARE.mapping(ep, action)
FaultFactory = Callable[[], BaseException]


def fault(cls: Any, **fields: Any) -> BaseException:
    made: BaseException = cls(**fields)
    return made


# --- OVF --------------------------------------------------------------------------------


def _items(env: ET.Element) -> list[dict[str, str]]:
    out = []
    for item in env.iter(f"{{{OVF_NS}}}Item"):
        out.append({child.tag.split("}")[1]: child.text or "" for child in item})
    return out


def test_ovf_escapes_names_and_places_disks_on_controllers() -> None:
    disks = tuple(OvfDisk(f"disk-{i}.vmdk", 1000 + i) for i in range(17))
    text = build_ovf(OvfVm(name='a&b <"vm">', cpus=2, memory_mib=512, guest_id=None,
                           firmware="efi", network="VM & Net", disks=disks))
    env = ET.fromstring(text.split("\n", 1)[1])  # noqa: S314 - our own output
    name = env.find(f"{{{OVF_NS}}}VirtualSystem/{{{OVF_NS}}}Name")
    assert name is not None
    assert name.text == 'a&b <"vm">'
    items = _items(env)
    controllers = [i for i in items if i["ResourceType"] == "6"]
    assert [c["InstanceID"] for c in controllers] == ["3", "4"]
    disk_items = [i for i in items if i["ResourceType"] == "17"]
    units = [(d["Parent"], d["AddressOnParent"]) for d in disk_items]
    assert units[:8] == [("3", str(u)) for u in (0, 1, 2, 3, 4, 5, 6, 8)]
    assert units[15:] == [("4", "0"), ("4", "1")]
    for item in items:  # RASD's schema sequence: alphabetical
        assert list(item) == sorted(item)
    capacities = [d.get(f"{{{OVF_NS}}}capacity") for d in env.iter(f"{{{OVF_NS}}}Disk")]
    assert capacities[0] == "1024"  # rounded up to whole KiB
    (nic,) = [i for i in items if i["ResourceType"] == "10"]
    assert nic["Connection"] == "VM & Net"
    assert RASD_NS in text


def test_ovf_refuses_more_disks_than_controllers_hold() -> None:
    disks = tuple(OvfDisk(f"d{i}", 1024) for i in range(61))
    with pytest.raises(ValueError, match="at most 60"):
        build_ovf(OvfVm(name="x", cpus=1, memory_mib=1, guest_id=None, firmware=None,
                        network=None, disks=disks))


# --- error mapping ---------------------------------------------------------------------


def _response(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://vc.example/nfc/x/disk-0.vmdk")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status,
                                                                               request=request))


@pytest.mark.parametrize(("make", "kind", "retryable"), [
    (lambda: fault(vim.fault.InvalidLogin), CloudAuthError, False),
    (lambda: fault(vim.fault.NoPermission, privilegeId="VirtualMachine.Provisioning.Export"),
     CloudAuthError, False),
    (lambda: fault(vim.fault.NotAuthenticated), CloudUnavailable, True),
    (lambda: fault(vmodl.fault.ManagedObjectNotFound), NotFound, False),
    (lambda: fault(vim.fault.InvalidPowerState), CloudStateError, False),
    (lambda: fault(vim.fault.DuplicateName), CloudStateError, False),
    (lambda: fault(vmodl.fault.HostCommunication), CloudUnavailable, True),
    (lambda: fault(vim.fault.HostConnectFault, msg="connection reset"), CloudUnavailable, True),
    (lambda: fault(vim.fault.HostConnectFault,
                   msg="[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
     CloudTlsError, False),
    (lambda: fault(vim.fault.TaskInProgress), CloudUnavailable, True),
    (lambda: fault(vmodl.fault.SystemError, reason="oops"), CloudUnavailable, True),
    (lambda: fault(vim.fault.InsufficientResourcesFault), CloudError, False),
    (lambda: _response(401), CloudAuthError, False),
    (lambda: _response(404), NotFound, False),
    (lambda: _response(503), CloudUnavailable, True),
    (lambda: _response(400), CloudError, False),
    (lambda: httpx.ReadTimeout("slow"), CloudUnavailable, True),
    (lambda: ConnectionResetError(104, "Connection reset by peer"), CloudUnavailable, True),
    (lambda: TimeoutError("timed out"), CloudUnavailable, True),
])
def test_translation(make: FaultFactory, kind: type[Exception], retryable: bool) -> None:
    error = translate(EP, "export the VM", make())
    assert type(error) is kind
    assert error.retryable is retryable


def test_messages_carry_the_platform_text_but_never_a_secret() -> None:
    with pytest.raises(CloudError) as info, map_exceptions(EP, "create a snapshot"):
        raise fault(vim.fault.InsufficientResourcesFault, msg="no space for hunter2-secret")
    text = str(info.value)
    assert "create a snapshot" in text
    assert "vCenter vc.example:443" in text
    assert "no space for ***" in text
    assert "hunter2-secret" not in text

    unset = translate(EP, "read the lease", fault(vmodl.fault.MethodNotFound, method="x"))
    assert str(unset) == "read the lease failed on vCenter vc.example:443: MethodNotFound"

    with pytest.raises(CloudAuthError) as auth, map_exceptions(EP, "log in"):
        raise fault(vim.fault.InvalidLogin, msg="Login failure")
    assert str(auth.value) == (
        "authentication failed for user 'admin@vsphere.local' on vCenter vc.example:443"
    )
    assert auth.value.__cause__ is None
    assert auth.value.__suppress_context__


def test_verification_failures_are_found_through_wrappers() -> None:
    import ssl

    outer = httpx.ConnectError("handshake")
    outer.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert is_verification_failure(outer)
    assert not is_verification_failure(ConnectionResetError())


def test_fingerprint_notations() -> None:
    assert normalise_fingerprint("AB:cd:01") == "abcd01"
    assert colon_hex("abcd01") == "AB:CD:01"


def test_lease_urls_get_the_connected_host() -> None:
    assert device_url("https://*/nfc/52%5Bx%5D/disk-0.vmdk", "10.0.0.5", 8443) == (
        "https://10.0.0.5:8443/nfc/52%5Bx%5D/disk-0.vmdk"
    )
    assert device_url("https://*/nfc/t/disk-0.vmdk", "::1", 443) == (
        "https://[::1]:443/nfc/t/disk-0.vmdk"
    )
    assert device_url("https://esx1/nfc/t/d", "vc", 443) == "https://esx1/nfc/t/d"


def test_server_ref_needs_exactly_one_key() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ServerLookup()
    with pytest.raises(ValueError, match="exactly one"):
        ServerLookup(id="vm-1", name="x")


# --- lease keeping and uploads -----------------------------------------------------------


class FakeLease:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def HttpNfcLeaseProgress(self, percent: int) -> None:
        self.calls.append(("progress", percent))

    def HttpNfcLeaseComplete(self) -> None:
        self.calls.append(("complete", None))

    def HttpNfcLeaseAbort(self, fault: Any = None) -> None:
        self.calls.append(("abort", fault.reason))


async def _call(action: str, fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


async def test_lease_keeper_reports_progress_while_bytes_move_and_ends_once() -> None:
    lease = FakeLease()
    keeper = LeaseKeeper(_call, lease, total=1000, interval=0.01)
    keeper.start()
    keeper.add(500)
    await asyncio.sleep(0.1)
    assert ("progress", 50) in lease.calls
    keeper.add(600)
    await keeper.complete()
    await keeper.abort("too late")  # after the end: nothing more
    assert lease.calls[-2:] == [("progress", 100), ("complete", None)]
    assert all(p <= 99 for k, p in lease.calls[:-2] if k == "progress")

    aborted = FakeLease()
    keeper = LeaseKeeper(_call, aborted, total=1, interval=10)
    keeper.start()
    await keeper.abort("vmigrate: disk unreadable")
    await keeper.abort("again")
    assert aborted.calls == [("abort", "vmigrate: disk unreadable")]


async def test_an_upload_the_server_breaks_off_stops_the_filler() -> None:
    stopped = asyncio.Event()

    async def fill(sink: SequentialSink) -> None:
        try:
            while True:  # would run forever: only cancellation ends it
                await sink.write(b"x" * 65536)
        finally:
            stopped.set()

    class ResetAfterFirstChunk(httpx.AsyncBaseTransport):
        """What a server that gives up mid-body looks like to httpcore: a write error."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            async for _ in request.stream:
                raise httpx.WriteError("[Errno 32] Broken pipe")
            raise AssertionError("no body")

    async with httpx.AsyncClient(transport=ResetAfterFirstChunk()) as client:
        with pytest.raises(CloudUnavailable, match="Broken pipe") as info:
            await upload(client, "https://vc.example/nfc/t/disk-0.vmdk", fill, size=None,
                         headers={}, errors=lambda a: map_exceptions(EP, a),
                         on_bytes=lambda n: None, depth=2)
    assert info.value.retryable
    assert stopped.is_set()


async def test_an_upload_longer_than_declared_fails() -> None:
    async def fill(sink: SequentialSink) -> None:
        await sink.write(b"y" * 100)

    async def handler(request: httpx.Request) -> httpx.Response:
        await request.aread()
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(HttpError, match="more than the declared 10 bytes"):
            await upload(client, "https://vc.example/u", fill, size=10, headers={},
                         errors=lambda a: map_exceptions(EP, a), on_bytes=lambda n: None,
                         depth=2)
