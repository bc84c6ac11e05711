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
Every exception is translated at this boundary (:mod:`app.drivers.vmware_errors`).
TLS: :mod:`app.drivers.tls` (CA bundle, pinned SHA-256, or explicitly none).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import httpx
from pyVim import connect as pyvim_connect
from pyVmomi import vim

from app.drivers import vmware_inventory as inv
from app.drivers import vmware_transfer
from app.drivers.base import (
    CloudAuthError,
    CloudError,
    CloudStateError,
    CloudTlsError,
    CloudUnavailable,
    DiskExport,
    DriverCapabilities,
    ImportDisk,
    ImportSpec,
    PowerState,
    ServerInfo,
    ServerRef,
    ShutdownMethod,
    SnapshotRef,
)
from app.drivers.capabilities import Role
from app.drivers.tls import TlsPolicy, client_context, presented_thumbprint
from app.drivers.vmware_errors import Endpoint, map_exceptions, raise_fault, tls_error
from app.errors import NotFound
from app.models.enums import CloudKind, ImageFormat
from app.models.schemas.clouds import PasswordCredentials, VsphereSettings

if TYPE_CHECKING:
    from app.services.clouds import CloudConnection

log = logging.getLogger(__name__)
T = TypeVar("T")

VMWARE_CAPABILITIES = DriverCapabilities(
    kinds=frozenset({CloudKind.vmware, CloudKind.esxi}),
    roles=frozenset({Role.hypervisor_source, Role.hypervisor_destination}),
    export_formats=(ImageFormat.vmdk, ImageFormat.raw),
    import_formats=(ImageFormat.vmdk,),
    snapshots=True,
    graceful_shutdown=True,
    export_while_running=False,
    resumable_export=False,
)


@dataclass(frozen=True, slots=True)
class VmwareOptions:
    """Timeouts and transfer knobs (the defaults suit a real vCenter)."""

    http_timeout: float = 120.0  # per SOAP request and per NFC read/write
    task_timeout: float = 3600.0  # snapshot removal can take long on big disks
    lease_ready_timeout: float = 600.0
    lease_progress_interval: float = 10.0  # a real lease expires after ~5 min of silence
    shutdown_poll: float = 2.0
    upload_queue_depth: int = 4  # chunks of up to 4 MiB waiting for the socket


class VmwareDriver:
    """One session with a vCenter or an ESXi host; use ``async with``."""

    capabilities: ClassVar[DriverCapabilities] = VMWARE_CAPABILITIES

    def __init__(self, kind: CloudKind, settings: VsphereSettings,
                 credentials: PasswordCredentials | None,
                 options: VmwareOptions | None = None) -> None:
        if kind not in VMWARE_CAPABILITIES.kinds:
            raise ValueError(f"the VMware driver does not serve kind {kind}")
        if credentials is None:
            raise CloudAuthError(f"no credentials are stored for {kind} {settings.host}")
        self.kind = kind
        self.settings = settings
        self.options = options or VmwareOptions()
        self._username = credentials.username
        self._password = credentials.password
        self.policy = TlsPolicy(settings.verify_tls, settings.ca_bundle, settings.tls_fingerprint)
        self.endpoint = Endpoint(
            label="vCenter" if kind is CloudKind.vmware else "ESXi host",
            host=settings.host, port=settings.port, username=credentials.username,
            trust=self.policy.describe(), secrets=(credentials.password.get_secret_value(),),
        )
        self._si: Any = None
        self._clients: dict[tuple[str, int], httpx.AsyncClient] = {}
        self._cookie: str | None = None

    @classmethod
    def from_connection(cls, conn: CloudConnection, options: VmwareOptions | None = None) -> Self:
        """Build from :func:`app.services.clouds.open_cloud`'s result."""
        settings, creds = conn.settings, conn.credentials
        if not isinstance(settings, VsphereSettings) or not (
            creds is None or isinstance(creds, PasswordCredentials)
        ):
            raise ValueError(f"cloud {conn.id} is not a vSphere cloud")
        return cls(conn.kind, settings, creds, options)

    # --- session ----------------------------------------------------------------------

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        with map_exceptions(self.endpoint, action):
            yield

    async def call(self, action: str, fn: Callable[[], T]) -> T:
        """Run one blocking pyvmomi call in a thread, its errors translated."""
        with self.errors(action):
            return await asyncio.to_thread(fn)

    @property
    def content(self) -> Any:
        if self._si is None:
            raise RuntimeError("the VMware driver is not connected")
        return self._si.content

    async def connect(self) -> None:
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
            raise tls_error(self.endpoint, exc, thumbprint) from None
        cookie = SimpleCookie(str(self._si._stub.cookie or ""))
        if (morsel := cookie.get("vmware_soap_session")) is not None:
            self._cookie = f"vmware_soap_session={morsel.value}"
            self.endpoint = dataclasses.replace(
                self.endpoint, secrets=(*self.endpoint.secrets, morsel.value)
            )
        self._clients[(host, port)] = self._http_client(context)
        log.info("connected to %s as %s", self.endpoint.where, self._username)

    def _http_client(self, verify: Any) -> httpx.AsyncClient:
        timeout = httpx.Timeout(self.options.http_timeout, connect=30.0)
        return httpx.AsyncClient(verify=verify, trust_env=False, timeout=timeout)

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        si, self._si = self._si, None
        if si is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(pyvim_connect.Disconnect, si)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

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
        """Poll a task to its end; returns ``info.result`` or raises its fault."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.task_timeout
        delay = 0.05
        content = self.content
        while True:
            state, error, result = await self.call(action, lambda: inv.task_state(content, task))
            if state == "success":
                return result
            if state == "error":
                raise_fault(self.endpoint, action, error)
            if loop.time() > deadline:
                raise CloudUnavailable(
                    f"{action}: task still {state} after {self.options.task_timeout:.0f} s "
                    f"on {self.endpoint.where}"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def vm(self, server_id: str) -> Any:
        content, si = self.content, self._si
        return await self.call("find the VM", lambda: inv.vm_by_moref(si, content, server_id,
                                                                         self.endpoint))

    async def facts(self, vm: Any) -> inv.VmFacts:
        content = self.content
        return await self.call("read the VM", lambda: inv.read_vm(content, vm, self.endpoint))

    # --- source -----------------------------------------------------------------------

    async def validate_source(self, ref: ServerRef) -> ServerInfo:
        content, si = self.content, self._si
        vm = await self.call("find the VM", lambda: inv.find_vm(si, content, ref, self.endpoint))
        return (await self.facts(vm)).info

    async def power_state(self, server_id: str) -> PowerState:
        vm, content = await self.vm(server_id), self.content
        return await self.call("read the power state", lambda: inv.power_state(content, vm))

    async def shutdown(self, server_id: str, *, grace: float) -> ShutdownMethod:
        vm, content = await self.vm(server_id), self.content
        state = await self.call("read the power state", lambda: inv.power_state(content, vm))
        if state is PowerState.off:
            return ShutdownMethod.already_off
        if state is PowerState.suspended:
            raise CloudStateError(
                f"VM {server_id} is suspended: resume it or power it off first (a power off "
                "would discard its suspended state)"
            )
        if grace > 0:
            try:
                await self.call("shut the guest down", lambda: vm.ShutdownGuest())
            except (CloudError, NotFound) as exc:  # no tools, not supported, raced to off
                log.info("guest shutdown of %s refused (%s); powering off", server_id, exc)
            else:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + grace
                while loop.time() < deadline:
                    now = await self.call("read the power state",
                                          lambda: inv.power_state(content, vm))
                    if now is PowerState.off:
                        return ShutdownMethod.guest
                    await asyncio.sleep(min(self.options.shutdown_poll,
                                            max(deadline - loop.time(), 0)))
                log.info("guest of %s still running after %.0f s; powering off",
                         server_id, grace)
        try:
            await self.wait_task("power off the VM", await self.call(
                "power off the VM", lambda: vm.PowerOffVM_Task()))
        except CloudStateError:
            if await self.power_state(server_id) is not PowerState.off:
                raise
        return ShutdownMethod.power_off

    async def power_on(self, server_id: str) -> None:
        vm = await self.vm(server_id)
        if await self.power_state(server_id) is PowerState.on:
            return
        await self.wait_task("power on the VM",
                             await self.call("power on the VM", lambda: vm.PowerOnVM_Task()))

    async def restore_power(self, server_id: str, state: PowerState) -> None:
        if state is PowerState.on:
            await self.power_on(server_id)
        elif state is PowerState.off and await self.power_state(server_id) is PowerState.on:
            await self.shutdown(server_id, grace=0)

    async def find_snapshot(self, server_id: str, name: str) -> SnapshotRef | None:
        facts = await self.facts(await self.vm(server_id))
        return next((s for s in facts.snapshots if s.name == name), None)

    async def create_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        existing = await self.find_snapshot(server_id, name)
        if existing is not None:
            return existing
        vm = await self.vm(server_id)
        task = await self.call("create a snapshot", lambda: vm.CreateSnapshot_Task(
            name=name, description="vmigrate migration snapshot", memory=False, quiesce=False))
        snapshot = await self.wait_task("create a snapshot", task)
        return SnapshotRef(id=str(snapshot._moId), name=name)

    async def remove_snapshot(self, server_id: str, name: str) -> bool:
        try:
            facts = await self.facts(await self.vm(server_id))
        except NotFound:
            return False  # the VM is gone, and its snapshots with it
        removed = False
        for ref in [s for s in facts.snapshots if s.name == name]:
            snapshot_class: Any = vim.vm.Snapshot
            snap = snapshot_class(ref.id, self._si._stub)
            remove = functools.partial(snap.RemoveSnapshot_Task, removeChildren=False,
                                       consolidate=True)
            try:
                task = await self.call("remove the snapshot", remove)
                await self.wait_task("remove the snapshot", task)
            except NotFound:
                continue  # removed concurrently: that is what we wanted
            removed = True
        return removed

    def export_disks(self, server_id: str,
                     snapshot: SnapshotRef | None) -> AbstractAsyncContextManager[DiskExport]:
        return vmware_transfer.export_disks(self, server_id, snapshot)

    # --- destination ------------------------------------------------------------------

    async def import_vm(self, spec: ImportSpec, disks: Sequence[ImportDisk]) -> ServerInfo:
        return await vmware_transfer.import_vm(self, spec, disks)

    async def destroy_vm(self, ref: ServerRef, *, marker: str) -> bool:
        content, si = self.content, self._si
        try:
            vm = await self.call("find the VM",
                                 lambda: inv.find_vm(si, content, ref, self.endpoint))
            facts = await self.facts(vm)
        except NotFound:
            return False
        if facts.marker != marker:
            raise CloudStateError(
                f"VM {facts.info.name!r} ({facts.info.id}) on {self.endpoint.where} was not "
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

