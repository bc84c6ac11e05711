"""The hypervisor-to-hypervisor engine: ``store`` into the image library, or ``new``
(provision a VM on a target); and the library conversion engine built from its steps.

Steps (see :mod:`app.engines.plans`) and what each leaves in its step result (typed
models in :mod:`app.engines.hypervisor_results`), which later steps and a resumed
attempt on another worker read back:

- ``validate``: find the server and read its disks (and, for ``new``, check the
  destination accepts our credentials). Changes nothing.
- ``power_off``: record the power state, shut the guest down (graceful, then hard).
- ``snapshot``: a snapshot named after the migration (found again by name).
- ``transfer``: stream every disk from the source through the pipeline (zero
  detection, ``vmd1`` digest of the source bytes, throttle) into a staging file,
  converted on the fly into the format the migration needs: the library format for
  ``store``, the destination's import format for ``new``. A disk finished by an earlier
  attempt is not transferred again; a disk interrupted mid-stream restarts (the
  platform's export stream cannot resume), which the step reports as an event. A
  library image (conversions, re-provisioning) is a random-access file: an interrupted
  conversion into ``raw`` resumes at the last durable offset (see
  :meth:`_StagingEngine._transfer_image`).
- ``check_image``: read every staged image back with its format reader and recompute
  the digest: the converted image must hold exactly the source's disk.
- ``store``: publish the staged images into the library (atomic per image) and record
  them with their lineage.
- ``provision``: import a VM with those disks on the destination (all or nothing).
- ``verify``: read the new VM's disks back from the destination and compare digests.
- cleanup: ``discard_staged`` (staging files), ``remove_snapshot``, ``restore_power``
  (only the ones whose work started; see ``Plan.unwind``).

Each cloud is logged into once per run: the engine holds its driver sessions
(:class:`~app.engines.sessions.DriverSessions`) from the first step that needs them
until the runner calls :meth:`Engine.aclose <app.engines.runner.Engine.aclose>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from app.dataplane.convert import Converter, ConvertOptions
from app.dataplane.core import TransferProgress
from app.drivers import registry as drivers
from app.drivers.base import (
    DiskExport,
    ImportDisk,
    ImportSpec,
    ServerLookup,
)
from app.drivers.kit.connection import CloudConnection
from app.engines.clouds import open_cloud
from app.engines.deps import EngineDeps
from app.engines.hypervisor_results import (
    CheckedImage,
    CheckImageResult,
    DiscardStagedResult,
    Disk,
    PartialDisk,
    PowerOffResult,
    ProvisionResult,
    RemoveSnapshotResult,
    RestorePowerResult,
    SnapshotResult,
    StagedDisk,
    StoreResult,
    TransferCheckpoint,
    TransferResult,
    ValidateResult,
    VerifyResult,
)
from app.engines.retry import TRANSIENT_TYPES
from app.engines.runner import Engine, MigrationRun, StepContext, StepResult
from app.engines.sessions import DriverSessions
from app.errors import AppError, NotFound
from app.formats import raw
from app.formats.base import (
    ImageReader,
    ImageWriter,
    RandomAccessSource,
    SequentialSink,
    WriterOptions,
)
from app.formats.digest import digest_extents
from app.formats.io import FileSink, FileSource
from app.formats.registry import create_writer, open_reader
from app.models.db import VirtualImage
from app.models.enums import HypervisorMode, ImageFormat, ImageStatus
from app.models.schemas.migrations import HypervisorSourceOut, LibraryImageSource
from app.models.schemas.specs import ConversionSpec, HypervisorSpec
from app.repositories import images as images_repo
from app.storage.base import StagedImage

log = logging.getLogger(__name__)

_COPY_CHUNK = 4 * 1024 * 1024
#: Destination fields that are not placement (the rest go to the driver's placement model).
_NOT_PLACEMENT = {"cloud_id", "server_name"}
#: A library conversion asks the writer to make its output durable after this many
#: data bytes, so a resumed conversion redoes at most about this much.
_CONVERSION_CHECKPOINT_BYTES = 32 * 1024 * 1024
#: Output formats whose staged file an interrupted conversion can continue. Only the raw
#: writer resumes (its output is the disk itself, durable up to an offset); the qcow2,
#: streamOptimized vmdk and vhd writers place tables, grain directories and the BAT as
#: they go and finish them at the end, so a partial file cannot be appended to: an
#: interrupted conversion into those formats starts again (and says so in an event).
RESUMABLE_OUTPUTS = frozenset({ImageFormat.raw})


class DigestMismatch(AppError):
    """A copy's digest differs from its source's."""

    code = "integrity-mismatch"
    title = "The copy does not match the source"


@dataclasses.dataclass(frozen=True, slots=True)
class Lineage:
    """Where stored images came from (the lineage columns of their library rows)."""

    migration_id: uuid.UUID
    cloud_id: uuid.UUID | None = None
    server: str | None = None
    parent_id: uuid.UUID | None = None


class _StagingEngine(Engine):
    """Steps shared by the hypervisor and conversion engines: a library image source,
    staging files, check_image, store and discard_staged."""

    platform = "hypervisor"

    def __init__(self, run: MigrationRun, deps: EngineDeps) -> None:
        self.run = run
        self.deps = deps
        self.marker = f"vmigrate-{run.id}"

    # --- dispatch ----------------------------------------------------------------------

    async def run_step(self, ctx: StepContext) -> StepResult | None:
        step: Callable[[StepContext], Awaitable[StepResult]] = getattr(
            self, f"_{ctx.step.name}")
        return await step(ctx)

    # --- hooks of the two engines -------------------------------------------------------

    def _image_id(self) -> uuid.UUID | None:
        """The library image to read instead of a VM, if any."""
        raise NotImplementedError

    def _throttle(self) -> int | None:
        raise NotImplementedError

    def _lineage(self) -> Lineage:
        raise NotImplementedError

    # --- results of earlier steps -----------------------------------------------------

    def _validated(self) -> ValidateResult:
        return self.run.result_of("validate", ValidateResult)

    def _transferred(self) -> TransferResult:
        return self.run.result_of("transfer", TransferResult)

    def _staged(self, index: int) -> StagedImage:
        return self.deps.store.stage(f"{self.run.id}-disk{index}", stable=True)

    # --- a library image as the source (conversions, re-provisioning) ------------------

    async def _image(self) -> VirtualImage:
        image_id = self._image_id()
        if image_id is None:
            raise NotFound("this migration reads no library image")
        async with self.deps.db.session() as session:
            image = await images_repo.get_image(session, self.run.tenant, image_id)
        if image is None or not image.location:
            raise NotFound(f"library image {image_id} is gone")
        return image

    async def _validate_image(self, target_format: ImageFormat) -> ValidateResult:
        image = await self._image()
        return ValidateResult(server_id=None, server_name=image.name,
                              target_format=target_format,
                              disks=(Disk(key=str(image.id), label="disk",
                                          capacity=image.virtual_size),))

    async def _transfer_image(self, ctx: StepContext) -> TransferResult:
        """Convert the library image into its staging file.

        The source is a random-access file, so an interrupted conversion into a format
        that can be continued (:data:`RESUMABLE_OUTPUTS`) resumes at the offset its
        writer last made durable. Nothing below that offset is written again; raw and
        qcow2 sources are read only from there (:meth:`ImageReader.skip_below`; other
        source formats are decoded again from the start); and the source digest is not
        recomputed: ``check_image`` reads the whole output back and compares it with
        the library record's digest. Into other formats it starts again from byte 0.
        """
        image = await self._image()
        (disk,) = self._validated().disks
        fmt = self._validated().target_format
        staged = self._staged(0)
        start = self._resume_offset(disk, fmt, staged)
        source = _CountingSource(await self.deps.store.open(image.location or ""))
        try:
            reader = await open_reader(source, image.format)
            # Raw and qcow2 readers then leave the data below ``start`` unread.
            skipping = reader.skip_below(start) if start else False
            done = await self._convert_into(ctx, reader, disk, staged, fmt, self._throttle(),
                                            0, disk.capacity, start=start,
                                            expected_digest=image.digest)
        finally:
            await source.close()
        if start:
            await ctx.event("migration.transfer.resumed", {
                "disk": disk.label, "offset": start, "source_bytes_read": source.bytes_read,
                "skipped_reading": skipping})
        if done.digest != image.digest:
            raise DigestMismatch(f"image {image.id} reads back as {done.digest}, its "
                                 f"record says {image.digest}")
        return TransferResult(disks=(done,))

    def _resume_offset(self, disk: Disk, fmt: ImageFormat, staged: StagedImage) -> int:
        checkpoint = self.run.checkpoint_as(TransferCheckpoint)
        partial = checkpoint.partial if checkpoint is not None else None
        if (partial is not None and partial.key == disk.key and partial.format == fmt
                and fmt in RESUMABLE_OUTPUTS and staged.path.exists()
                and 0 < partial.offset < disk.capacity):
            return partial.offset
        return 0

    # --- conversion into staging -------------------------------------------------------

    async def _convert_into(self, ctx: StepContext, reader: ImageReader, disk: Disk,
                            staged: StagedImage, fmt: ImageFormat, throttle: int | None,
                            base: int, total: int, *, start: int = 0,
                            expected_digest: str | None = None) -> StagedDisk:
        """Convert one disk into its staging file in ``fmt``; the digest is the source's.

        ``start`` > 0 continues a staged output that is durable below it (resumable
        formats only); then ``expected_digest`` (the source's, known beforehand) stands
        in for the digest of the part not read again.
        """
        if staged.path.exists() and not start:
            await ctx.event("migration.transfer.restarted", {
                "disk": disk.label, "reason": self._restart_reason(fmt)})
        sink = FileSink(staged.path, create=not start)
        resumable = fmt in RESUMABLE_OUTPUTS
        try:
            writer: ImageWriter
            if start:
                writer = raw.create_writer(sink, reader.virtual_size, WriterOptions(),
                                           resume_from=start)
            else:
                writer = create_writer(fmt, sink, reader.virtual_size,
                                       WriterOptions(subformat=_subformat(fmt)))
            async with _Reporter(ctx, disk.key, fmt, base, total, start,
                                 checkpoints=resumable) as report:
                result = await Converter(reader, writer, ConvertOptions(
                    throttle_bps=throttle, on_progress=report.progress, resume_from=start,
                    digest=not start, on_checkpoint=report.durable if resumable else None,
                    checkpoint_every=_CONVERSION_CHECKPOINT_BYTES if resumable else None,
                )).run()
        finally:
            await sink.close()
        digest = result.digest if result.digest is not None else expected_digest
        if digest is None:
            raise AppError(f"disk {disk.label}: no digest for the converted image")
        await ctx.event("migration.disk.transferred", {
            "disk": disk.label, "bytes": disk.capacity, "data_bytes": result.data_bytes,
            "seconds": round(result.duration, 3), "digest": digest,
            "resumed_from": result.resumed_from})
        return StagedDisk(key=disk.key, label=disk.label, capacity=disk.capacity, format=fmt,
                          staged=staged.key, digest=digest, virtual_size=result.virtual_size)

    def _restart_reason(self, fmt: ImageFormat) -> str:
        if fmt not in RESUMABLE_OUTPUTS:
            return (f"a partial {fmt.value} image cannot be continued (its tables are "
                    "written as it grows); converting it again from the start")
        return "no durable checkpoint for this disk; converting it again from the start"

    # --- check_image, store ------------------------------------------------------------

    async def _check_image(self, ctx: StepContext) -> CheckImageResult:
        """Read each converted image back: it must be the source disk, byte for byte."""
        checked = []
        for index, disk in enumerate(self._transferred().disks):
            source = FileSource(self._staged(index).path)
            try:
                size = source.size
                reader = await open_reader(source, disk.format.value)
                digest = await digest_extents(reader.extents(), reader.virtual_size)
            finally:
                await source.close()
            if digest != disk.digest:
                raise DigestMismatch(f"disk {disk.label}: the {disk.format.value} image has "
                                     f"digest {digest}, the source stream {disk.digest}")
            checked.append(CheckedImage(label=disk.label, digest=digest, size=size))
        return CheckImageResult(disks=tuple(checked))

    def _image_name(self, server_name: str, disk_label: str) -> str:
        """The library name of a stored disk: ``<server>-<disk>``."""
        return f"{server_name}-{disk_label}".replace(" ", "-")[:255]

    async def _store(self, ctx: StepContext) -> StoreResult:
        server_name = self._validated().server_name
        ids = []
        for index, disk in enumerate(self._transferred().disks):
            image_id = uuid.uuid5(uuid.UUID(self.run.id), disk.key)
            async with self.deps.db.session() as session:
                if await images_repo.get_image(session, self.run.tenant, image_id):
                    ids.append(image_id)  # stored by an earlier attempt
                    continue
            staged = self._staged(index)
            size = await (staged.publish() if staged.path.exists()
                          else self.deps.store.size(staged.key))
            lineage = self._lineage()
            async with self.deps.db.session() as session:
                created = await images_repo.add_image(session, VirtualImage(
                    id=image_id, tenant=self.run.tenant, status=ImageStatus.ready,
                    name=self._image_name(server_name, disk.label),
                    format=disk.format.value, virtual_size=disk.virtual_size, size=size,
                    digest=disk.digest, location=staged.key,
                    migration_id=lineage.migration_id, cloud_id=lineage.cloud_id,
                    server=lineage.server, parent_id=lineage.parent_id))
            ids.append(image_id)
            await ctx.event("image.created", created)
        return StoreResult(images=tuple(ids))

    # --- cleanup ----------------------------------------------------------------------

    async def _discard_staged(self, ctx: StepContext) -> DiscardStagedResult:
        removed = 0
        for index in range(len(self._validated().disks)):
            staged = self._staged(index)
            if staged.path.exists():
                await staged.discard()
                removed += 1
        return DiscardStagedResult(removed=removed)


class HypervisorEngine(_StagingEngine):
    def __init__(self, run: MigrationRun, deps: EngineDeps) -> None:
        super().__init__(run, deps)
        self.spec = run.spec_as(HypervisorSpec)
        self.mode = run.mode or HypervisorMode.store
        self.sessions = DriverSessions(self._source_connection, self._destination_connection)

    async def step_failed(self, ctx: StepContext, exc: BaseException) -> None:
        if isinstance(exc, TRANSIENT_TYPES) or (isinstance(exc, AppError) and exc.retryable):
            await self.sessions.reset()  # the retry logs in again

    async def aclose(self) -> None:
        await self.sessions.aclose()

    # --- connections ------------------------------------------------------------------

    def _vm_source(self) -> HypervisorSourceOut:
        if not isinstance(self.spec.source, HypervisorSourceOut):
            raise AppError("this migration reads a library image, not a VM")
        return self.spec.source

    async def _connection(self, cloud_id: uuid.UUID, *, source: bool) -> CloudConnection:
        async with self.deps.db.session() as session:
            conn = await open_cloud(session, self.deps.box, self.run.tenant, cloud_id)
        self.platform = conn.kind.value
        if not source:
            return conn
        # The wizard's Host / Remote Port / Username / Password override the cloud's.
        src = self._vm_source()
        password = self.run.secrets.source.password
        return drivers.with_source_overrides(
            conn, host=src.host, port=src.port, username=src.username,
            password=password.get_secret_value() if password is not None else None)

    async def _source_connection(self) -> CloudConnection:
        return await self._connection(self._vm_source().cloud_id, source=True)

    async def _destination_connection(self) -> CloudConnection:
        if self.spec.destination is None:
            raise AppError("this migration has no destination cloud")
        return await self._connection(self.spec.destination.cloud_id, source=False)

    # --- the hooks --------------------------------------------------------------------

    def _image_id(self) -> uuid.UUID | None:
        src = self.spec.source
        return src.image_id if isinstance(src, LibraryImageSource) else None

    def _throttle(self) -> int | None:
        return self.spec.options.throttle_bytes_per_second

    def _lineage(self) -> Lineage:
        return Lineage(uuid.UUID(self.run.id), cloud_id=self._vm_source().cloud_id,
                       server=self._validated().server_name)

    def _server_id(self) -> str:
        server_id = self._validated().server_id
        if server_id is None:
            raise AppError("this migration has no source server")
        return server_id

    # --- forward steps ----------------------------------------------------------------

    async def _target_format(self) -> ImageFormat:
        if self.mode is HypervisorMode.new:
            dst = await self.sessions.destination()  # also proves the credentials work
            return type(dst).capabilities.import_formats[0]
        return self.spec.format or ImageFormat.qcow2

    async def _validate(self, ctx: StepContext) -> ValidateResult:
        if self._image_id() is not None:
            return await self._validate_image(await self._target_format())
        ref = self._vm_source().server
        src = await self.sessions.source()
        info = await src.validate_source(ServerLookup(id=ref.id, name=ref.name))
        if not info.disks:
            raise AppError(f"server {info.name} has no disks to migrate")
        return ValidateResult(
            server_id=info.id, server_name=info.name, power_state=info.power_state,
            cpus=info.cpus, memory_mib=info.memory_mib, guest_id=info.guest_id,
            firmware=info.firmware, target_format=await self._target_format(),
            disks=tuple(Disk.of(d) for d in info.disks))

    async def _power_off(self, ctx: StepContext) -> PowerOffResult:
        server_id = self._server_id()
        src = await self.sessions.source()
        before = await src.power_state(server_id)
        method = await src.shutdown(server_id,
                                    grace=self.deps.settings.vm_shutdown_grace_seconds)
        await ctx.event("migration.source.powered_off", {"method": method.value,
                                                          "was": before.value})
        return PowerOffResult(power_state=before, method=method)

    async def _snapshot(self, ctx: StepContext) -> SnapshotResult:
        src = await self.sessions.source()
        snap = await src.create_snapshot(self._server_id(), self.marker)
        await ctx.event("migration.snapshot.created", {"snapshot": snap.name})
        return SnapshotResult(snapshot=snap.name, snapshot_id=snap.id)

    async def _transfer(self, ctx: StepContext) -> TransferResult:
        if self._image_id() is not None:
            return await self._transfer_image(ctx)
        validated = self._validated()
        disks, fmt = validated.disks, validated.target_format
        checkpoint = self.run.checkpoint_as(TransferCheckpoint) or TransferCheckpoint()
        done = dict(checkpoint.transferred)
        total = sum(d.capacity for d in disks)
        src = await self.sessions.source()
        snap = await src.find_snapshot(self._server_id(), self.marker)
        async with src.export_disks(self._server_id(), snap) as export:
            base = 0
            for index, disk in enumerate(disks):
                staged = self._staged(index)
                if disk.key in done and staged.path.exists():
                    base += disk.capacity
                    continue
                done[disk.key] = await self._transfer_disk(
                    ctx, export, disk, staged, fmt, base, total)
                await ctx.checkpoint(TransferCheckpoint(transferred=done))
                base += disk.capacity
        await ctx.progress(total, total, force=True)
        return TransferResult(disks=tuple(done[d.key] for d in disks))

    def _restart_reason(self, fmt: ImageFormat) -> str:
        if self._image_id() is not None:
            return super()._restart_reason(fmt)
        return ("the platform's export stream cannot resume mid-disk; transferring it "
                "again from the start")

    async def _transfer_disk(self, ctx: StepContext, export: DiskExport, disk: Disk,
                             staged: StagedImage, fmt: ImageFormat, base: int,
                             total: int) -> StagedDisk:
        stream = await export.open(disk.info())
        try:
            reader = await open_reader(stream.source, stream.format.value,
                                       virtual_size=disk.capacity)
            return await self._convert_into(ctx, reader, disk, staged, fmt, self._throttle(),
                                            base, total)
        finally:
            await stream.close()

    async def _provision(self, ctx: StepContext) -> ProvisionResult:
        dest, server = self.spec.destination, self._validated()
        if dest is None:
            raise AppError("mode new needs a destination")
        name = dest.server_name or server.server_name
        sizes = [d.size for d in self.run.result_of("check_image", CheckImageResult).disks]
        disks = [ImportDisk(capacity=d.capacity, label=d.label,
                            content=_file_filler(self._staged(i).path), size=sizes[i])
                 for i, d in enumerate(self._transferred().disks)]
        spec = ImportSpec(
            name=name, marker=self.marker, cpus=server.cpus or 1,
            memory_mib=server.memory_mib or 1024, guest_id=server.guest_id,
            firmware=server.firmware, power_on=False,
            placement=drivers.parse_placement(
                (await self._destination_connection()).kind,
                dest.model_dump(exclude=_NOT_PLACEMENT, exclude_none=True)))
        dst = await self.sessions.destination()
        # A dead worker may have left a half-imported VM: remove it (only ours).
        await dst.destroy_vm(ServerLookup(name=name), marker=self.marker)
        created = await dst.import_vm(spec, disks)
        await ctx.event("migration.vm.provisioned", {"server_id": created.id, "name": name})
        return ProvisionResult(server_id=created.id, server_name=created.name)

    async def _verify(self, ctx: StepContext) -> VerifyResult:
        """Read the new VM's disks back from the destination and compare digests."""
        expected = [d.digest for d in self._transferred().disks]
        new_id = self.run.result_of("provision", ProvisionResult).server_id
        dst = await self.sessions.destination_reader()
        info = await dst.validate_source(ServerLookup(id=new_id))
        got = []
        async with dst.export_disks(new_id, None) as export:
            for disk in info.disks:
                stream = await export.open(disk)
                try:
                    reader = await open_reader(stream.source, stream.format.value,
                                               virtual_size=disk.capacity)
                    got.append(await digest_extents(reader.extents(), reader.virtual_size))
                finally:
                    await stream.close()
        if got != expected:
            raise DigestMismatch(f"the new VM's disks have digests {got}, the source's "
                                 f"{expected}")
        return VerifyResult(digests=tuple(got))

    # --- cleanup ----------------------------------------------------------------------

    async def _remove_snapshot(self, ctx: StepContext) -> RemoveSnapshotResult:
        server_id = self.run.maybe_result_of("validate", ValidateResult)
        if server_id is None or server_id.server_id is None:
            return RemoveSnapshotResult(removed=False)
        src = await self.sessions.source()
        return RemoveSnapshotResult(
            removed=await src.remove_snapshot(server_id.server_id, self.marker))

    async def _restore_power(self, ctx: StepContext) -> RestorePowerResult:
        before = self.run.maybe_result_of("power_off", PowerOffResult)
        validated = self.run.maybe_result_of("validate", ValidateResult)
        if before is None or validated is None or validated.server_id is None:
            return RestorePowerResult(restored=None)
        src = await self.sessions.source()
        await src.restore_power(validated.server_id, before.power_state)
        return RestorePowerResult(restored=before.power_state)


class ConversionEngine(_StagingEngine):
    """A library image into another format: the hypervisor steps without a hypervisor."""

    platform = "library"

    def __init__(self, run: MigrationRun, deps: EngineDeps) -> None:
        super().__init__(run, deps)
        self.spec = run.spec_as(ConversionSpec)

    def _image_id(self) -> uuid.UUID | None:
        return self.spec.image_id

    def _throttle(self) -> int | None:
        return self.spec.options.throttle_bytes_per_second

    def _lineage(self) -> Lineage:
        return Lineage(uuid.UUID(self.run.id), parent_id=self.spec.image_id)

    def _image_name(self, server_name: str, disk_label: str) -> str:
        # The conversion's name (the request's, or "<image> to <format>") names the image.
        return self.spec.image_name or super()._image_name(server_name, disk_label)

    async def _validate(self, ctx: StepContext) -> ValidateResult:
        return await self._validate_image(self.spec.format)

    async def _transfer(self, ctx: StepContext) -> TransferResult:
        return await self._transfer_image(ctx)


def _subformat(fmt: ImageFormat) -> str | None:
    return {ImageFormat.vmdk: "streamOptimized", ImageFormat.vhd: "dynamic"}.get(fmt)


class _CountingSource:
    """A library file read by a conversion, counting the bytes read (reported when a
    conversion resumes: what it did not have to read again shows)."""

    def __init__(self, source: RandomAccessSource) -> None:
        self._source = source
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._source.size

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await self._source.read_at(offset, length)
        self.bytes_read += len(data)
        return data

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        return await self._source.data_ranges()

    async def close(self) -> None:
        await self._source.close()


def _file_filler(path: Path) -> Callable[[SequentialSink], Awaitable[None]]:
    """Upload a staged image's bytes as they are (already in the import format)."""

    async def fill(sink: SequentialSink) -> None:
        source = FileSource(path)
        try:
            offset = 0
            while offset < source.size:
                data = await source.read_at(offset, _COPY_CHUNK)
                await sink.write(data)
                offset += len(data)
        finally:
            await source.close()

    return fill


class _Reporter:
    """Bridges the pipeline's synchronous callbacks (progress, durable offsets) to the
    step's persisted progress and checkpoint, at most once a second, from a task of its
    own so the pipeline never waits on the database."""

    INTERVAL = 1.0

    def __init__(self, ctx: StepContext, key: str, fmt: ImageFormat, base: int, total: int,
                 start: int, *, checkpoints: bool) -> None:
        self.ctx = ctx
        self.key = key
        self.fmt = fmt
        self.base = base
        self.total = total
        self.checkpoints = checkpoints
        self._done: int | None = None
        self._durable = self._saved = start
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def progress(self, p: TransferProgress) -> None:
        self._done = p.bytes_done
        self._wake.set()

    def durable(self, offset: int) -> None:
        self._durable = max(self._durable, offset)
        self._wake.set()

    async def _flush(self) -> None:
        if self.checkpoints and self._durable > self._saved:
            self._saved = self._durable
            previous = self.ctx.migration.checkpoint_as(TransferCheckpoint)
            await self.ctx.checkpoint(TransferCheckpoint(
                transferred=previous.transferred if previous else {},
                partial=PartialDisk(key=self.key, format=self.fmt, offset=self._durable)))
        if self._done is not None:
            await self.ctx.progress(self.base + self._done, self.total)

    async def _pump(self) -> None:
        last = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait = last + self.INTERVAL - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last = time.monotonic()
            await self._flush()

    async def __aenter__(self) -> _Reporter:
        self._task = asyncio.create_task(self._pump(), name="transfer-progress")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.checkpoints and exc[0] is not None:
            # What became durable before a failure is still worth keeping.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flush())


def hypervisor_engine(deps: EngineDeps) -> Callable[[MigrationRun], Engine]:
    def build(run: MigrationRun) -> Engine:
        return HypervisorEngine(run, deps)

    return build


def conversion_engine(deps: EngineDeps) -> Callable[[MigrationRun], Engine]:
    def build(run: MigrationRun) -> Engine:
        return ConversionEngine(run, deps)

    return build


__all__ = [
    "RESUMABLE_OUTPUTS",
    "ConversionEngine",
    "DigestMismatch",
    "HypervisorEngine",
    "conversion_engine",
    "hypervisor_engine",
]
