"""The driver interface: what every platform (VMware, OpenStack, Xen, ...) implements.

A driver is one authenticated session with one cloud. The engines talk to platforms
only through the Protocols here, so a new platform is one new module, not a change to
the engines. The interface is split by role, after coriolis' "one interface per
capability": :class:`SourceDriver` (a VM is read: power, snapshot, export) and
:class:`DestinationDriver` (a VM is provisioned from disk images). A platform that
only plays one part implements only that Protocol; what it can do is declared in its
:class:`~app.drivers.kit.spec.DriverSpec` (kinds, roles, models, formats), from which
the API's capability checks are derived (:mod:`app.drivers.registry`).

Rules every driver follows (see ``docs/drivers.md``):

* Values crossing this boundary are the frozen dataclasses below; never SDK objects,
  never untyped dicts. Servers are named by the platform's own stable id
  (``ServerInfo.id``), a string the engine stores in its checkpoint so a resumed run on
  another worker can carry on.
* Every SDK, HTTP and TLS exception is translated into an :class:`~app.errors.AppError`
  at the driver boundary: :class:`CloudAuthError`, :class:`CloudTlsError`,
  :class:`~app.errors.NotFound`, :class:`CloudStateError` and :class:`CloudError` are
  permanent; :class:`CloudUnavailable` is retryable. Messages carry the platform's
  own error text and never a secret.
* Blocking SDK calls run in threads; byte transfers are async with back-pressure (the
  consumer reads at its pace) and never buffer a whole disk.
* Cleanup operations are idempotent and find what they clean up by a name or marker
  derived from the migration, so a run resumed after a crash can still clean up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import ClassVar, Protocol, Self

from pydantic import BaseModel, ConfigDict

from app.errors import AppError, TransientError
from app.formats.base import ImageReader, SequentialSink, SequentialSource
from app.models.enums import ImageFormat

# --- errors ---------------------------------------------------------------------------


class CloudError(AppError):
    """The cloud refused or failed a request in a way retrying will not fix.

    The message names the operation and quotes the platform's own error text.
    """

    status = 502
    code = "cloud-error"
    title = "The cloud refused the request"


class CloudAuthError(CloudError):
    """Wrong user name or password (or token) for the cloud, or not allowed to act."""

    status = 422
    code = "cloud-auth-failed"
    title = "Authentication with the cloud failed"


class CloudTlsError(CloudError):
    """The cloud's TLS certificate is not trusted under the cloud's TLS settings.

    ``thumbprint`` is the SHA-256 of the certificate the server presented (colon hex,
    vSphere's notation) when it could be read, so the user can compare it out of band
    and pin it (``tls_fingerprint``) or supply the right CA (``ca_bundle``).
    """

    status = 422
    code = "cloud-tls-untrusted"
    title = "The cloud's TLS certificate is not trusted"

    def __init__(self, message: str, *, thumbprint: str | None = None,
                 extra: dict[str, object] | None = None) -> None:
        super().__init__(message, extra=extra)
        if thumbprint:
            self.extra["thumbprint"] = thumbprint

    @property
    def thumbprint(self) -> str | None:
        value = self.extra.get("thumbprint")
        return value if isinstance(value, str) else None


class CloudStateError(CloudError):
    """The object is in the wrong state for the request (e.g. exporting a running VM)."""

    status = 409
    code = "cloud-invalid-state"
    title = "Wrong state on the cloud"


class CloudUnavailable(TransientError):
    """Connection refused/reset, timeout, 5xx, the cloud's own host-communication faults."""

    code = "cloud-unavailable"
    title = "The cloud is temporarily unavailable"


# --- vocabulary -----------------------------------------------------------------------


class PowerState(StrEnum):
    on = "on"
    off = "off"
    suspended = "suspended"
    unknown = "unknown"


class ShutdownMethod(StrEnum):
    """How :meth:`SourceDriver.shutdown` got the server off (recorded in an event)."""

    already_off = "already_off"
    guest = "guest"  # the guest OS shut down when asked
    power_off = "power_off"  # hard power off (no guest tools, or the timeout passed)


@dataclass(frozen=True, slots=True)
class DriverCapabilities:
    """What a driver class can do beyond its roles (those are in its spec).

    ``export_formats`` are the formats an exported disk stream may arrive in (each
    :class:`DiskStream` says which one it is); ``import_formats`` are the formats
    :meth:`DestinationDriver.import_vm` accepts, preferred first (the engine converts to
    the first). ``resumable_export``: a disk stream can be reopened at an offset, so an
    interrupted transfer resumes from its checkpoint instead of restarting.
    """

    export_formats: tuple[ImageFormat, ...] = ()
    import_formats: tuple[ImageFormat, ...] = ()
    snapshots: bool = False
    graceful_shutdown: bool = False
    export_while_running: bool = False
    resumable_export: bool = False


@dataclass(frozen=True, slots=True)
class ServerLookup:
    """A server to look up: by the platform's id, or by its display name (exactly one).

    What an id may be is per platform (VMware: a moref ``vm-123``, an instance UUID, or
    an inventory path ``DC0/vm/folder/name``).
    """

    id: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if (self.id is None) == (self.name is None):
            raise ValueError("a ServerLookup has exactly one of id and name")

    def __str__(self) -> str:
        return f"id {self.id!r}" if self.id is not None else f"name {self.name!r}"


@dataclass(frozen=True, slots=True)
class DiskInfo:
    """One virtual disk of a server. ``key`` is stable for the server's lifetime."""

    key: str
    label: str
    capacity: int  # bytes
    path: str | None = None  # the platform's own location, e.g. "[ds1] vm/vm.vmdk"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What :meth:`SourceDriver.validate_source` learned; ``id`` names it from then on."""

    id: str
    name: str
    power_state: PowerState
    disks: tuple[DiskInfo, ...]
    uuid: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None
    guest_id: str | None = None  # the platform's guest OS identifier, a provisioning hint
    firmware: str | None = None  # "bios" or "efi"


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    id: str
    name: str


@dataclass(slots=True)
class DiskStream:
    """One exported disk as bytes read in order, at the consumer's pace.

    ``format`` is what the bytes are (probed from the stream's first bytes where the
    platform may send more than one), ``size`` the byte length when the server said.
    Open an image reader on it with ``open_reader(stream.source, stream.format)``.
    """

    info: DiskInfo
    format: ImageFormat
    source: SequentialSource
    size: int | None = None

    async def close(self) -> None:
        await self.source.close()


class DiskExport(Protocol):
    """An export in progress (:meth:`SourceDriver.export_disks`)."""

    @property
    def disks(self) -> Sequence[DiskInfo]:
        """The disks this export serves, in the server's order."""
        ...

    async def open(self, disk: DiskInfo) -> DiskStream:
        """Start reading ``disk``. Raises ``NotFound`` (not in this export),
        ``CloudUnavailable``, ``CloudTlsError``, ``CloudError``."""
        ...


#: Writes one disk, encoded in the destination's import format, into the sink and
#: returns when done. The engine passes one of these to run its own pipeline (progress,
#: digest, throttle) straight into the upload.
DiskFiller = Callable[[SequentialSink], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ImportDisk:
    """One disk of a VM to import: its capacity and where its bytes come from.

    ``content`` is an :class:`ImageReader` (the driver converts it to its import format
    itself) or a :data:`DiskFiller`. ``size``, the exact encoded byte length, is known
    only for ready-made images; when None the upload is streamed without a length.
    """

    capacity: int
    content: ImageReader | DiskFiller
    size: int | None = None
    label: str | None = None


class Placement(BaseModel):
    """Where to create a VM, in the destination's own names; None means its default.

    Each platform subclasses it with the fields it understands (VMware:
    ``VspherePlacement``) and names the subclass in its spec; the API refuses a
    destination field the destination's placement model does not have.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ImportSpec:
    """The VM :meth:`DestinationDriver.import_vm` creates.

    ``marker`` (e.g. the migration id) is recorded on the VM so a cleanup can tell the
    VM it created from one that merely has the same name.
    """

    name: str
    marker: str
    placement: Placement = field(default_factory=Placement)
    cpus: int = 1
    memory_mib: int = 1024
    guest_id: str | None = None
    firmware: str | None = None
    power_on: bool = False


# --- the Protocols --------------------------------------------------------------------


class Driver(Protocol):
    """A session with one cloud; use as ``async with driver: ...``."""

    capabilities: ClassVar[DriverCapabilities]

    async def connect(self) -> None:
        """Open the session. Raises ``CloudAuthError``, ``CloudTlsError``,
        ``CloudUnavailable``, ``CloudError``."""
        ...

    async def close(self) -> None:
        """End the session; never raises, safe to call twice."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class SourceDriver(Driver, Protocol):
    """A platform VMs are migrated away from (``hypervisor_source``)."""

    async def validate_source(self, ref: ServerLookup) -> ServerInfo:
        """Find the server and read its disks. Changes nothing.

        Raises ``NotFound`` (naming the server), ``InvalidInput`` (ambiguous name),
        ``CloudAuthError``, ``CloudUnavailable``, ``CloudError``.
        """
        ...

    async def power_state(self, server_id: str) -> PowerState:
        """Raises ``NotFound``, ``CloudUnavailable``, ``CloudError``."""
        ...

    async def shutdown(self, server_id: str, *, grace: float) -> ShutdownMethod:
        """Ask the guest to shut down, wait up to ``grace`` seconds, then power off.

        ``grace`` 0 powers off at once. Idempotent (``already_off``). Raises
        ``NotFound``, ``CloudStateError``, ``CloudUnavailable``, ``CloudError``.
        """
        ...

    async def power_on(self, server_id: str) -> None:
        """Idempotent. Raises ``NotFound``, ``CloudUnavailable``, ``CloudError``."""
        ...

    async def restore_power(self, server_id: str, state: PowerState) -> None:
        """Put the power state recorded before the migration back (on failure/cancel).

        Only ``on`` and ``off`` are restored; others are left alone. Raises like
        :meth:`power_on`.
        """
        ...

    async def create_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        """Snapshot the server (disks only). Returns the existing snapshot when one
        called ``name`` exists already (a resumed run). Raises ``NotFound``,
        ``CloudStateError``, ``CloudUnavailable``, ``CloudError``."""
        ...

    async def find_snapshot(self, server_id: str, name: str) -> SnapshotRef | None:
        """Raises ``NotFound`` (no server), ``CloudUnavailable``, ``CloudError``."""
        ...

    async def remove_snapshot(self, server_id: str, name: str) -> bool:
        """Remove every snapshot called ``name``; False when there was none.

        Idempotent, by name, so a resumed run cleans up what a dead worker made.
        Raises ``CloudUnavailable``, ``CloudError``.
        """
        ...

    def export_disks(
        self, server_id: str, snapshot: SnapshotRef | None
    ) -> AbstractAsyncContextManager[DiskExport]:
        """Export the server's disks (as of ``snapshot`` where the platform can).

        The export is open inside the ``async with``; leaving it normally completes it,
        leaving it by an exception aborts it. Raises ``NotFound``, ``CloudStateError``
        (e.g. running, if :attr:`DriverCapabilities.export_while_running` is False),
        ``CloudUnavailable``, ``CloudError``.
        """
        ...


class DestinationDriver(Driver, Protocol):
    """A platform VMs are provisioned on (``hypervisor_destination``)."""

    async def import_vm(self, spec: ImportSpec, disks: Sequence[ImportDisk]) -> ServerInfo:
        """Create a VM with these disks; power it on if ``spec.power_on``.

        All or nothing: on any failure the half-created VM is removed before the error
        propagates. Raises ``InvalidInput`` (unknown placement names),
        ``CloudStateError`` (name taken), ``CloudUnavailable``, ``CloudError``,
        ``FormatError``/``PipelineError`` from the disk content.
        """
        ...

    async def destroy_vm(self, ref: ServerLookup, *, marker: str) -> bool:
        """Power off and delete a VM that :meth:`import_vm` created with ``marker``.

        False when no such VM exists (idempotent). Raises ``CloudStateError`` when the
        VM exists but does not carry ``marker`` (never delete what we did not make),
        ``CloudUnavailable``, ``CloudError``.
        """
        ...


def filler_from_reader(reader: ImageReader, fmt: ImageFormat) -> DiskFiller:
    """A :data:`DiskFiller` that converts ``reader`` to ``fmt`` through the pipeline.

    For drivers handed an :class:`ImageReader`: the engine's own filler is preferred
    (it reports progress), this one is the plain conversion.
    """

    async def fill(sink: SequentialSink) -> None:
        from app.dataplane.convert import convert
        from app.formats.registry import create_writer

        writer = create_writer(fmt.value, sink, reader.virtual_size)
        await convert(reader, writer)

    return fill
