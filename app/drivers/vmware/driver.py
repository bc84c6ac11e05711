"""The VMware driver: vCenter (kind ``vmware``) and standalone ESXi hosts (``esxi``).

Source and destination of hypervisor migrations, through pyvmomi (SOAP) for control
and HttpNfcLease URLs (HTTPS) for the disk bytes:

* validate: find the VM by name, moref (``vm-123``; ``123`` on ESXi), instance or BIOS
  UUID, or inventory path; read its disks.
* power: graceful guest shutdown (``ShutdownGuest``) with a timeout, then
  ``PowerOffVM``; power on; restore the recorded state.
* snapshots: created and removed by name (idempotent), disks only, not quiesced (the
  VM is off by then in the disruptive flow).
* export: ``ExportVm`` needs the VM powered off; each disk is streamed from its lease
  URL. A real vCenter sends a streamOptimized VMDK; vcsim sends the backing file as it
  is (a raw disk in the tests), so the first bytes decide: VMDK sparse magic ``KDMV``
  means ``vmdk`` (read with the streamOptimized reader, sequentially), anything else
  ``raw``. Each :class:`~app.drivers.base.DiskStream` says which.
* import: OVF descriptor -> ``CreateImportSpec`` -> ``ImportVApp`` -> one
  streamOptimized VMDK POST per disk -> ``HttpNfcLeaseComplete``; on failure the lease
  is aborted and the half-created VM destroyed.

Blocking pyvmomi calls run in threads (``asyncio.to_thread``); pyvmomi's SOAP stub has
its own connection pool and lock, so concurrent calls from several threads are safe.
The session life cycle, calls in threads, error mapping (:mod:`.errors`, which extends
the shared network table), polling and the power/snapshot rules come from the kit
(:mod:`app.drivers.kit`); this module holds only the vSphere calls.
TLS: :mod:`app.drivers.kit.tls` (CA bundle, pinned SHA-256, or explicitly none).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any, ClassVar, Self

import httpx
from pyVim import connect as pyvim_connect
from pyVmomi import vim

from app.drivers.base import (
    CloudAuthError,
    CloudStateError,
    CloudTlsError,
    DiskExport,
    DriverCapabilities,
    ImportDisk,
    ImportSpec,
    PowerState,
    ServerInfo,
    ServerLookup,
    SnapshotRef,
)
from app.drivers.kit.connection import CloudConnection
from app.drivers.kit.errors import cloud_boundary
from app.drivers.kit.power import PowerOps
from app.drivers.kit.session import DriverSession, poll
from app.drivers.kit.tls import TlsPolicy, client_context, presented_thumbprint
from app.drivers.vmware import inventory as inv
from app.drivers.vmware import transfer
from app.drivers.vmware.capabilities import CAPABILITIES, KINDS
from app.drivers.vmware.errors import VMWARE, raise_fault
from app.drivers.vmware.models import VsphereSettings
from app.errormap import ErrorTable, untrusted
from app.errors import NotFound
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import PasswordCredentials
from app.transports.http import http_client

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VmwareOptions:
    """Timeouts and transfer knobs (the defaults suit a real vCenter)."""

    http_timeout: float = 120.0  # per SOAP request and per NFC read/write
    task_timeout: float = 3600.0  # snapshot removal can take long on big disks
    lease_ready_timeout: float = 600.0
    lease_progress_interval: float = 10.0  # a real lease expires after ~5 min of silence
    shutdown_poll: float = 2.0
    upload_queue_depth: int = 4  # chunks of up to 4 MiB waiting for the socket


class VmwareDriver(PowerOps, DriverSession):
    """One session with a vCenter or an ESXi host; use ``async with``."""

    capabilities: ClassVar[DriverCapabilities] = CAPABILITIES
    errors_table: ClassVar[ErrorTable] = VMWARE

    def __init__(self, kind: CloudKind, settings: VsphereSettings,
                 credentials: PasswordCredentials | None,
                 options: VmwareOptions | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"the VMware driver does not serve kind {kind}")
        if credentials is None:
            raise CloudAuthError(f"no credentials are stored for {kind} {settings.host}")
        self.kind = kind
        self.settings = settings
        self.options = options or VmwareOptions()
        self.shutdown_poll = self.options.shutdown_poll
        self._username = credentials.username
        self._password = credentials.password
        self.policy = TlsPolicy(settings.verify_tls, settings.ca_bundle, settings.tls_fingerprint)
        label = "vCenter" if kind is CloudKind.vmware else "ESXi host"
        super().__init__(cloud_boundary(
            f"{label} {settings.host}:{settings.port}", username=credentials.username,
            trust=self.policy.describe(), secrets=(credentials.password.get_secret_value(),),
        ))
        self._si: Any = None
        self._clients: dict[tuple[str, int], httpx.AsyncClient] = {}
        self._cookie: str | None = None

    @classmethod
    def from_connection(cls, conn: CloudConnection, options: VmwareOptions | None = None) -> Self:
        """Build from a :class:`~app.drivers.kit.connection.CloudConnection`."""
        settings, creds = conn.settings, conn.credentials
        if not isinstance(settings, VsphereSettings) or not (
            creds is None or isinstance(creds, PasswordCredentials)
        ):
            raise ValueError(f"cloud {conn.id} is not a vSphere cloud")
        return cls(conn.kind, settings, creds, options)

    # --- session ----------------------------------------------------------------------

    @property
    def content(self) -> Any:
        if self._si is None:
            raise RuntimeError("the VMware driver is not connected")
        return self._si.content

    async def _open(self) -> None:
        host, port = self.settings.host, self.settings.port
        try:
            with self.errors("connect"):
                context = await asyncio.to_thread(
                    client_context, self.policy, host, port, self.options.http_timeout
                )
            password = self._password.get_secret_value()
            smart_connect: Any = pyvim_connect.SmartConnect
            self._si = await self.call("log in", lambda: smart_connect(
                host=host, port=port, user=self._username, pwd=password, sslContext=context,
                httpConnectionTimeout=self.options.http_timeout,
            ))
        except CloudTlsError as exc:
            if exc.thumbprint is not None:
                raise
            thumbprint = await asyncio.to_thread(presented_thumbprint, host, port)
            raise untrusted(self.boundary, exc, thumbprint) from None
        cookie = SimpleCookie(str(self._si._stub.cookie or ""))
        if (morsel := cookie.get("vmware_soap_session")) is not None:
            self._cookie = f"vmware_soap_session={morsel.value}"
            self.boundary = self.boundary.with_secrets(morsel.value)
        self._clients[(host, port)] = self._http_client(context)
        log.info("connected to %s as %s", self.boundary.where, self._username)

    def _http_client(self, context: Any) -> httpx.AsyncClient:
        return http_client(context, timeout=self.options.http_timeout)

    async def _close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        si, self._si = self._si, None
        if si is not None:
            await asyncio.to_thread(pyvim_connect.Disconnect, si)

    async def transfer_client(
        self, url: str, thumbprint: str | None
    ) -> tuple[httpx.AsyncClient, dict[str, str]]:
        """The HTTP client and headers for a lease URL (after ``*`` substitution).

        The vCenter itself: the session's client and cookie. Another host (an ESXi
        host behind vCenter): trusted by the lease's SHA-1 ``sslThumbprint`` (vCenter
        vouches for it over the verified session), else by the cloud's CA policy; the
        session cookie is never sent there.
        """
        parts = httpx.URL(url)
        key = (parts.host, parts.port or 443)
        main = (self.settings.host, self.settings.port)
        headers = {"Cookie": self._cookie} if key == main and self._cookie else {}
        if key not in self._clients:
            policy = TlsPolicy(self.policy.verify, self.policy.ca_bundle,
                               thumbprint if self.policy.verify else None)
            with self.errors(f"trust transfer host {key[0]}"):
                context = await asyncio.to_thread(client_context, policy, *key)
            self._clients[key] = self._http_client(context)
        return self._clients[key], headers

    async def wait_task(self, action: str, task: Any) -> Any:
        """Poll a task to its end; returns ``info.result`` (or True when it has none)
        or raises its fault translated."""
        content = self.content

        async def done() -> Any:
            state, error, result = await self.call(action, lambda: inv.task_state(content, task))
            if state == "success":
                return True if result is None else result
            if state == "error":
                raise_fault(self.boundary, action, error)
            return None

        return await poll(done, what=f"{action} on {self.boundary.where}",
                          limit=self.options.task_timeout)

    async def vm(self, server_id: str) -> Any:
        content, si = self.content, self._si
        return await self.call("find the VM", lambda: inv.vm_by_moref(si, content, server_id,
                                                                         self.boundary))

    async def facts(self, vm: Any) -> inv.VmFacts:
        content = self.content
        return await self.call("read the VM", lambda: inv.read_vm(content, vm, self.boundary))

    # --- the kit's primitives -------------------------------------------------------------

    async def _read_power(self, server_id: str) -> PowerState:
        vm, content = await self.vm(server_id), self.content
        return await self.call("read the power state", lambda: inv.power_state(content, vm))

    async def _request_guest_shutdown(self, server_id: str) -> None:
        vm = await self.vm(server_id)
        await self.call("shut the guest down", lambda: vm.ShutdownGuest())

    async def _hard_power_off(self, server_id: str) -> None:
        vm = await self.vm(server_id)
        await self.wait_task("power off the VM",
                             await self.call("power off the VM", lambda: vm.PowerOffVM_Task()))

    async def _hard_power_on(self, server_id: str) -> None:
        vm = await self.vm(server_id)
        await self.wait_task("power on the VM",
                             await self.call("power on the VM", lambda: vm.PowerOnVM_Task()))

    async def _list_snapshots(self, server_id: str) -> Sequence[SnapshotRef]:
        return (await self.facts(await self.vm(server_id))).snapshots

    async def _take_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        vm = await self.vm(server_id)
        task = await self.call("create a snapshot", lambda: vm.CreateSnapshot_Task(
            name=name, description="vmigrate migration snapshot", memory=False, quiesce=False))
        snapshot = await self.wait_task("create a snapshot", task)
        return SnapshotRef(id=str(snapshot._moId), name=name)

    async def _delete_snapshot(self, server_id: str, snapshot: SnapshotRef) -> None:
        snapshot_class: Any = vim.vm.Snapshot
        snap = snapshot_class(snapshot.id, self._si._stub)
        remove = functools.partial(snap.RemoveSnapshot_Task, removeChildren=False,
                                   consolidate=True)
        await self.wait_task("remove the snapshot", await self.call("remove the snapshot", remove))

    # --- source -----------------------------------------------------------------------

    async def validate_source(self, ref: ServerLookup) -> ServerInfo:
        content, si = self.content, self._si
        vm = await self.call("find the VM", lambda: inv.find_vm(si, content, ref, self.boundary))
        return (await self.facts(vm)).info

    def export_disks(self, server_id: str,
                     snapshot: SnapshotRef | None) -> AbstractAsyncContextManager[DiskExport]:
        return transfer.export_disks(self, server_id, snapshot)

    # --- destination ------------------------------------------------------------------

    async def import_vm(self, spec: ImportSpec, disks: Sequence[ImportDisk]) -> ServerInfo:
        return await transfer.import_vm(self, spec, disks)

    async def destroy_vm(self, ref: ServerLookup, *, marker: str) -> bool:
        content, si = self.content, self._si
        where = self.boundary.where
        try:
            vm = await self.call("find the VM",
                                 lambda: inv.find_vm(si, content, ref, self.boundary))
            facts = await self.facts(vm)
        except NotFound:
            return False
        if facts.marker != marker:
            raise CloudStateError(
                f"VM {facts.info.name!r} ({facts.info.id}) on {where} was not "
                f"created by this migration (marker {facts.marker!r}); not destroying it"
            )
        try:
            if facts.info.power_state is not PowerState.off:
                await self.shutdown(facts.info.id, grace=0)
            await self.wait_task("destroy the VM",
                                 await self.call("destroy the VM", lambda: vm.Destroy_Task()))
        except NotFound:
            return False
        return True
