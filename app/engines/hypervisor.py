"""The hypervisor-to-hypervisor engine: ``store`` into the image library, or ``new``
(provision a VM on a target).

Steps (see :mod:`app.engines.plans`) and what each leaves in its step result, which
later steps and a resumed attempt on another worker read back:

- ``validate``: connect to the source cloud, find the server, read its disks (and,
  for ``new``, check the destination accepts our credentials). Changes nothing.
- ``power_off``: record the power state, shut the guest down (graceful, then hard).
- ``snapshot``: a snapshot named after the migration (found again by name).
- ``export``: stream every disk from the source through the pipeline (zero detection,
  ``vmd1`` digest of the source bytes, throttle) into a staging file, converted on the
  fly into the format the migration needs: the library format for ``store``, the
  destination's import format for ``new``. A disk finished by an earlier attempt is
  not exported again; a disk interrupted mid-stream restarts (the platform's export
  stream cannot resume), which the step reports as an event.
- ``convert``: read every staged image back with its format reader and recompute the
  digest: the converted image must hold exactly the source's disk.
- ``store``: publish the staged images into the library (atomic per image) and record
  them with their lineage.
- ``provision``: import a VM with those disks on the destination (all or nothing).
- ``verify``: export the new VM's disks from the destination and compare digests.
- cleanup: ``remove_exports`` (staging files), ``remove_snapshot``,
  ``restore_power`` (only the ones whose work started; see ``Plan.unwind``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app.drivers import registry as drivers
from app.drivers.base import (
    DestinationDriver,
    DiskInfo,
    ImportDisk,
    ImportSpec,
    Placement,
    PowerState,
    ServerRef,
    SourceDriver,
)
from app.engines.pipeline import Converter, Progress
from app.engines.registry import EngineDeps
from app.engines.runner import Engine, JSONDict, MigrationView, StepContext
from app.errors import AppError, NotFound
from app.formats.base import ImageReader, SequentialSink, WriterOptions
from app.formats.digest import digest_extents
from app.formats.io import FileSink, FileSource
from app.formats.registry import create_writer, open_reader
from app.models.db import VirtualImage
from app.models.enums import HypervisorMode, ImageStatus
from app.models.schemas.clouds import PasswordCredentials, VsphereSettings
from app.repositories import images as images_repo
from app.services.clouds import CloudConnection, open_cloud
from app.storage.base import StagedImage

log = logging.getLogger(__name__)

_COPY_CHUNK = 4 * 1024 * 1024


class IntegrityError(AppError):
    code = "integrity-mismatch"
    title = "The copy does not match the source"


class HypervisorEngine(Engine):
    platform = "hypervisor"

    def __init__(self, view: MigrationView, deps: EngineDeps) -> None:
        self.view = view
        self.deps = deps
        self.spec = view.spec
        self.mode = HypervisorMode(view.mode or "store")
        self.marker = f"vmigrate-{view.id}"

    # --- dispatch ----------------------------------------------------------------------

    async def run_step(self, ctx: StepContext) -> JSONDict | None:
        step: Callable[[StepContext], Any] = getattr(self, f"_{ctx.step.name}")
        result: JSONDict | None = await step(ctx)
        return result

    async def run_cleanup(self, ctx: StepContext, outcome: str) -> JSONDict | None:
        return await self.run_step(ctx)

    # --- connections ------------------------------------------------------------------

    async def _connection(self, cloud_id: str, *, source: bool) -> CloudConnection:
        async with self.deps.db.session() as session:
            conn = await open_cloud(session, self.deps.box, self.view.tenant, uuid.UUID(cloud_id))
        self.platform = conn.kind.value
        if not source:
            return conn
        # The wizard's Host / Remote Port / Username / Password override the cloud's.
        src = self.spec["source"]
        settings, creds = conn.settings, conn.credentials
        if isinstance(settings, VsphereSettings) and (src.get("host") or src.get("port")):
            settings = settings.model_copy(update={
                k: v for k, v in (("host", src.get("host")), ("port", src.get("port"))) if v})
        password = self.view.secrets.get("source.password")
        if src.get("username") and password:
            creds = PasswordCredentials(username=src["username"], password=SecretStr(password))
        return dataclasses.replace(conn, settings=settings, credentials=creds)

    @contextlib.asynccontextmanager
    async def _source(self) -> AsyncIterator[SourceDriver]:
        conn = await self._connection(self.spec["source"]["cloud_id"], source=True)
        async with drivers.source_driver(conn) as driver:
            yield driver

    @contextlib.asynccontextmanager
    async def _destination(self) -> AsyncIterator[DestinationDriver]:
        conn = await self._connection(self.spec["destination"]["cloud_id"], source=False)
        async with drivers.destination_driver(conn) as driver:
            yield driver

    def _server(self) -> JSONDict:
        return self.view.result_of("validate")

    def _disks(self) -> list[DiskInfo]:
        return [DiskInfo(**d) for d in self._server().get("disks", [])]

    # --- forward steps ----------------------------------------------------------------

    async def _target_format(self) -> str:
        if self.mode is HypervisorMode.new:
            async with self._destination() as dst:  # also proves the credentials work
                return type(dst).capabilities.import_formats[0].value
        return str(self.spec.get("format") or "qcow2")

    # A library image as the source (re-provisioning, and library conversions) -------

    def _image_id(self) -> str | None:
        return (self.spec.get("source") or {}).get("image_id")

    async def _image(self) -> VirtualImage:
        async with self.deps.db.session() as session:
            image = await images_repo.get_image(session, self.view.tenant,
                                                uuid.UUID(str(self._image_id())))
        if image is None or not image.location:
            raise NotFound(f"library image {self._image_id()} is gone")
        return image

    async def _validate_image(self) -> JSONDict:
        image = await self._image()
        return {"server_id": None, "server_name": image.name,
                "target_format": await self._target_format(),
                "disks": [dataclasses.asdict(DiskInfo(key=str(image.id), label="disk",
                                                      capacity=image.virtual_size))]}

    async def _export_image(self, ctx: StepContext) -> JSONDict:
        image = await self._image()
        (disk,) = self._disks()
        source = await self.deps.store.open(image.location or "")
        try:
            reader = await open_reader(source, image.format)
            done = await self._convert_into(
                ctx, reader, disk, self._staged(0), self._server()["target_format"],
                (self.spec.get("options") or {}).get("throttle_bytes_per_second"),
                0, disk.capacity)
        finally:
            await source.close()
        if done["digest"] != image.digest:
            raise IntegrityError(f"image {image.id} reads back as {done['digest']}, its "
                                 f"record says {image.digest}")
        return {"disks": [done]}

    # --- forward steps (continued) ------------------------------------------------------

    async def _validate(self, ctx: StepContext) -> JSONDict:
        if self._image_id() is not None:
            return await self._validate_image()
        ref = self.spec["source"]["server"]
        async with self._source() as src:
            info = await src.validate_source(ServerRef(id=ref.get("id"), name=ref.get("name")))
        if not info.disks:
            raise AppError(f"server {info.name} has no disks to migrate")
        target_format = await self._target_format()
        return {
            "server_id": info.id, "server_name": info.name, "power_state": info.power_state,
            "cpus": info.cpus, "memory_mib": info.memory_mib, "guest_id": info.guest_id,
            "firmware": info.firmware, "target_format": target_format,
            "disks": [dataclasses.asdict(d) for d in info.disks],
        }

    async def _power_off(self, ctx: StepContext) -> JSONDict:
        server_id = self._server()["server_id"]
        async with self._source() as src:
            before = await src.power_state(server_id)
            method = await src.shutdown(server_id,
                                        grace=self.deps.settings.vm_shutdown_grace_seconds)
        await ctx.event("migration.source.powered_off", {"method": method.value,
                                                          "was": before.value})
        return {"power_state": before.value, "method": method.value}

    async def _snapshot(self, ctx: StepContext) -> JSONDict:
        async with self._source() as src:
            snap = await src.create_snapshot(self._server()["server_id"], self.marker)
        await ctx.event("migration.snapshot.created", {"snapshot": snap.name})
        return {"snapshot": snap.name, "snapshot_id": snap.id}

    def _staged(self, index: int) -> StagedImage:
        return self.deps.store.stage(f"{self.view.id}-disk{index}", stable=True)

    async def _export(self, ctx: StepContext) -> JSONDict:
        if self._image_id() is not None:
            return await self._export_image(ctx)
        disks = self._disks()
        fmt = self._server()["target_format"]
        done: dict[str, JSONDict] = dict((ctx.migration.checkpoint or {}).get("exported", {}))
        total = sum(d.capacity for d in disks)
        throttle = (self.spec.get("options") or {}).get("throttle_bytes_per_second")
        async with self._source() as src:
            snap = await src.find_snapshot(self._server()["server_id"], self.marker)
            async with src.export_disks(self._server()["server_id"], snap) as export:
                base = 0
                for index, disk in enumerate(disks):
                    staged = self._staged(index)
                    if disk.key in done and staged.path.exists():
                        base += disk.capacity
                        continue
                    if staged.path.exists():
                        await ctx.event("migration.export.restarted", {
                            "disk": disk.label, "reason": "the platform's export stream "
                            "cannot resume mid-disk; exporting it again from the start"})
                    done[disk.key] = await self._export_disk(
                        ctx, export, disk, staged, fmt, throttle, base, total)
                    await ctx.checkpoint({"exported": done})
                    base += disk.capacity
        await ctx.progress(total, total, force=True)
        return {"disks": [done[d.key] for d in disks]}

    async def _export_disk(self, ctx: StepContext, export: Any, disk: DiskInfo,
                           staged: StagedImage, fmt: str, throttle: int | None,
                           base: int, total: int) -> JSONDict:
        stream = await export.open(disk)
        try:
            reader = await open_reader(stream.source, stream.format.value,
                                       virtual_size=disk.capacity)
            return await self._convert_into(ctx, reader, disk, staged, fmt, throttle,
                                            base, total)
        finally:
            await stream.close()

    async def _convert_into(self, ctx: StepContext, reader: ImageReader, disk: DiskInfo,
                            staged: StagedImage, fmt: str, throttle: int | None,
                            base: int, total: int) -> JSONDict:
        """Convert one disk into its staging file in ``fmt``; the digest is the source's."""
        sink = FileSink(staged.path)
        try:
            writer = create_writer(fmt, sink, reader.virtual_size,
                                   WriterOptions(subformat=_subformat(fmt)))
            async with _reporter(ctx, base, total) as report:
                result = await Converter(reader, writer, throttle_bps=throttle,
                                         on_progress=report).run()
        finally:
            await sink.close()
        await ctx.event("migration.disk.exported", {
            "disk": disk.label, "bytes": disk.capacity, "data_bytes": result.data_bytes,
            "seconds": round(result.duration, 3), "digest": result.digest})
        return {"key": disk.key, "label": disk.label, "capacity": disk.capacity,
                "format": fmt, "staged": staged.key, "digest": result.digest,
                "virtual_size": result.virtual_size}

    async def _convert(self, ctx: StepContext) -> JSONDict:
        """Read each converted image back: it must be the source disk, byte for byte."""
        checked = []
        for index, disk in enumerate(self.view.result_of("export")["disks"]):
            source = FileSource(self._staged(index).path)
            try:
                size = source.size
                reader = await open_reader(source, disk["format"])
                digest = await digest_extents(reader.extents(), reader.virtual_size)
            finally:
                await source.close()
            if digest != disk["digest"]:
                raise IntegrityError(f"disk {disk['label']}: the {disk['format']} image has "
                                     f"digest {digest}, the source stream {disk['digest']}")
            checked.append({"label": disk["label"], "digest": digest, "size": size})
        return {"disks": checked}

    def _image_name(self, server: JSONDict, disk: JSONDict) -> str:
        return f"{server['server_name']}-{disk['label']}".replace(" ", "-")[:255]

    def _lineage(self) -> JSONDict:
        """Where stored images came from (the columns of their library rows)."""
        return {"migration_id": uuid.UUID(self.view.id),
                "cloud_id": uuid.UUID(self.spec["source"]["cloud_id"]),
                "server": self._server()["server_name"], "parent_id": None}

    async def _store(self, ctx: StepContext) -> JSONDict:
        server = self._server()
        ids = []
        for index, disk in enumerate(self.view.result_of("export")["disks"]):
            image_id = uuid.uuid5(uuid.UUID(self.view.id), disk["key"])
            async with self.deps.db.session() as session:
                if await images_repo.get_image(session, self.view.tenant, image_id):
                    ids.append(str(image_id))  # stored by an earlier attempt
                    continue
            staged = self._staged(index)
            size = await (staged.publish() if staged.path.exists()
                          else self.deps.store.size(staged.key))
            async with self.deps.db.session() as session:
                await images_repo.insert_image(session, VirtualImage(
                    id=image_id, tenant=self.view.tenant, status=ImageStatus.ready,
                    name=self._image_name(server, disk),
                    format=disk["format"], virtual_size=disk["virtual_size"], size=size,
                    digest=disk["digest"], location=staged.key, **self._lineage()))
            ids.append(str(image_id))
            await ctx.event("image.created", {"image_id": str(image_id), "disk": disk["label"]})
        return {"images": ids}

    async def _provision(self, ctx: StepContext) -> JSONDict:
        dest, server = self.spec["destination"], self._server()
        name = dest.get("server_name") or server["server_name"]
        sizes = [d["size"] for d in self.view.result_of("convert")["disks"]]
        disks = [ImportDisk(capacity=d["capacity"], label=d["label"],
                            content=_file_filler(self._staged(i).path), size=sizes[i])
                 for i, d in enumerate(self.view.result_of("export")["disks"])]
        spec = ImportSpec(
            name=name, marker=self.marker, cpus=server.get("cpus") or 1,
            memory_mib=server.get("memory_mib") or 1024, guest_id=server.get("guest_id"),
            firmware=server.get("firmware"), power_on=bool(dest.get("power_on", False)),
            placement=Placement(**{f: dest.get(f) for f in (
                "datacenter", "cluster", "host", "resource_pool", "datastore", "folder",
                "network")}))
        async with self._destination() as dst:
            # A dead worker may have left a half-imported VM: remove it (only ours).
            await dst.destroy_vm(ServerRef(name=name), marker=self.marker)
            created = await dst.import_vm(spec, disks)
        await ctx.event("migration.vm.provisioned", {"server_id": created.id, "name": name})
        return {"server_id": created.id, "server_name": created.name}

    async def _verify(self, ctx: StepContext) -> JSONDict:
        """Export the new VM's disks from the destination and compare digests."""
        expected = [d["digest"] for d in self.view.result_of("export")["disks"]]
        new_id = self.view.result_of("provision")["server_id"]
        conn = await self._connection(self.spec["destination"]["cloud_id"], source=False)
        async with drivers.source_driver(conn) as dst:
            info = await dst.validate_source(ServerRef(id=new_id))
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
            raise IntegrityError(f"the new VM's disks have digests {got}, the source's "
                                 f"{expected}")
        return {"digests": got}

    # --- cleanup ----------------------------------------------------------------------

    async def _remove_exports(self, ctx: StepContext) -> JSONDict:
        removed = 0
        for index in range(len(self._disks())):
            staged = self._staged(index)
            if staged.path.exists():
                await staged.discard()
                removed += 1
        return {"removed": removed}

    async def _remove_snapshot(self, ctx: StepContext) -> JSONDict:
        server_id = self._server().get("server_id")
        if server_id is None:
            return {"removed": False}
        async with self._source() as src:
            removed = await src.remove_snapshot(server_id, self.marker)
        return {"removed": removed}

    async def _restore_power(self, ctx: StepContext) -> JSONDict:
        before = self.view.result_of("power_off").get("power_state")
        server_id = self._server().get("server_id")
        if before is None or server_id is None:
            return {"restored": None}
        async with self._source() as src:
            await src.restore_power(server_id, PowerState(before))
        return {"restored": before}


class ConversionEngine(HypervisorEngine):
    """A library image into another format: the hypervisor steps without a hypervisor."""

    platform = "library"

    def _image_id(self) -> str | None:
        return str(self.spec["image_id"])

    async def _target_format(self) -> str:
        return str(self.spec["format"])

    def _image_name(self, server: JSONDict, disk: JSONDict) -> str:
        # The conversion's name (the request's, or "<image> to <format>") names the image.
        return str(self.spec.get("image_name") or super()._image_name(server, disk))

    def _lineage(self) -> JSONDict:
        return {"migration_id": uuid.UUID(self.view.id), "cloud_id": None, "server": None,
                "parent_id": uuid.UUID(str(self._image_id()))}


def _subformat(fmt: str) -> str | None:
    return {"vmdk": "streamOptimized", "vhd": "dynamic"}.get(fmt)


def _file_filler(path: Path) -> Callable[[SequentialSink], Any]:
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


@contextlib.asynccontextmanager
async def _reporter(ctx: StepContext, base: int, total: int
                    ) -> AsyncIterator[Callable[[Progress], None]]:
    """Bridge the pipeline's synchronous progress callback to the step's (async,
    persisted at most once a second) progress, without blocking the pipeline."""
    latest: list[int] = []
    wake = asyncio.Event()

    def report(p: Progress) -> None:
        latest[:] = [p.bytes_done]
        wake.set()

    async def pump() -> None:
        while True:
            await wake.wait()
            wake.clear()
            if latest:
                await ctx.progress(base + latest[0], total)

    task = asyncio.create_task(pump())
    try:
        yield report
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def hypervisor_engine(deps: EngineDeps) -> Callable[[MigrationView], Engine]:
    def build(view: MigrationView) -> Engine:
        return HypervisorEngine(view, deps)

    return build


def conversion_engine(deps: EngineDeps) -> Callable[[MigrationView], Engine]:
    def build(view: MigrationView) -> Engine:
        return ConversionEngine(view, deps)

    return build


__all__ = ["ConversionEngine", "HypervisorEngine", "conversion_engine", "hypervisor_engine"]
