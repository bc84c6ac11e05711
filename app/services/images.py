"""The virtual image library: uploads, reads and removal.

An upload streams to a staging file, is identified and checked by the format readers
(a declared format that disagrees with the bytes is refused), gets its ``vmd1``
digest over the virtual disk, and is then published atomically. Nothing is visible
in the library (row or object) until every check passed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AppError, Conflict, InvalidInput, NotFound
from app.formats.base import Extent, FormatError, RandomAccessSource
from app.formats.digest import digest_extents
from app.formats.io import FileSource
from app.formats.registry import open_reader
from app.models.db import VirtualImage
from app.models.enums import ImageStatus, MigrationType
from app.models.schemas.migrations import MigrationView
from app.repositories import events as events_repo
from app.repositories import images as repo
from app.storage.base import ImageStore, StagedImage

log = logging.getLogger(__name__)


#: Disks are made of sectors: every format but raw says so by construction.
SECTOR = 512


class TooLarge(AppError):
    status = 413
    code = "image-too-large"
    title = "Image too large"


@dataclass(frozen=True, slots=True)
class Inspected:
    format: str
    virtual_size: int
    digest: str


class InspectionTooLong(AppError):
    status = 422
    code = "image-check-timeout"
    title = "Image check took too long"


class ClientGone(AppError):
    status = 499
    code = "client-closed-request"
    title = "Client closed the request"


@dataclass(frozen=True, slots=True)
class CheckBudget:
    """How long checking an upload may take: ``min_seconds``, or longer for a large file
    at ``min_bytes_per_second`` (a file can justify work in proportion to its size)."""

    min_seconds: float = 60.0
    min_bytes_per_second: float = 20 * 1024 * 1024

    def seconds(self, size: int) -> float:
        return max(self.min_seconds, size / self.min_bytes_per_second)


#: Data bytes an image may claim per byte of its file (and per MiB for tiny files).
#: Nothing but compression makes the two differ, and real disks compress a few times;
#: qcow2 checks its compressed clusters itself, this bounds every format.
MAX_CLAIM_RATIO = 256


class ClaimsTooMuch(FormatError):
    """The image claims more data than its size can hold."""


async def _counted(extents: AsyncIterator[Extent], limit: int) -> AsyncIterator[Extent]:
    data = 0
    async for ext in extents:
        if ext.data is not None:
            data += ext.length
            if data > limit:
                raise ClaimsTooMuch(f"the image holds more than {limit} bytes of data, "
                                    f"over {MAX_CLAIM_RATIO} times its size")
        yield ext


async def inspect(source: RandomAccessSource, declared: str | None) -> Inspected:
    """Identify an image, check it parses end to end, and compute its digest.

    The work is bounded by what the file can justify: the allocation the image claims
    (from its tables, before any data is read, where the format says) and the data it
    actually yields may not exceed :data:`MAX_CLAIM_RATIO` times its size."""
    limit = MAX_CLAIM_RATIO * max(source.size, 1024 * 1024)
    reader = await open_reader(source, declared)
    try:
        allocation = await reader.allocation_map()
        if allocation is not None:
            claimed = sum(length for _, length in allocation)
            if claimed > limit:
                raise ClaimsTooMuch(f"the image claims {claimed} bytes of data from a "
                                    f"{source.size}-byte file, over {MAX_CLAIM_RATIO} "
                                    "times its size")
        digest = await digest_extents(_counted(reader.extents(), limit), reader.virtual_size)
    finally:
        await reader.close()
    return Inspected(reader.format, reader.virtual_size, digest)


async def _receive(staged: StagedImage, body: AsyncIterator[bytes], max_bytes: int) -> int:
    sink = staged.sink()
    total = 0
    try:
        async for chunk in body:
            total += len(chunk)
            if total > max_bytes:
                raise TooLarge(f"image uploads are limited to {max_bytes} bytes")
            if chunk:
                await sink.write(chunk)
        await sink.flush()
    finally:
        await sink.close()
    return total


async def _bounded(work: Awaitable[Inspected], seconds: float,
                   gone: Callable[[], Awaitable[None]] | None) -> Inspected:
    """``work`` within ``seconds``, cancelled as soon as ``gone`` returns (the client
    disconnected: nobody is waiting for the answer)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(gone()) if gone is not None else None
    try:
        waiting: set[asyncio.Future[Any]] = {task}
        if watcher is not None:
            waiting.add(watcher)
        done, _ = await asyncio.wait(waiting, timeout=seconds,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if watcher is not None and watcher in done:
            raise ClientGone("the client disconnected; the upload was discarded")
        raise InspectionTooLong(
            f"checking the image took longer than {seconds:.0f} s, more than its size "
            "justifies; nothing was stored", extra={"errors": [
                {"pointer": "/", "detail": "the image costs more to read than its size "
                 "justifies"}]})
    finally:
        for pending in (task, watcher):
            if pending is not None and not pending.done():
                pending.cancel()
        await asyncio.gather(task, *(w for w in (watcher,) if w is not None),
                             return_exceptions=True)


async def upload(
    session: AsyncSession, store: ImageStore, tenant: str, *, name: str,
    declared_format: str | None, body: AsyncIterator[bytes], max_bytes: int,
    budget: CheckBudget | None = None, gone: Callable[[], Awaitable[None]] | None = None,
) -> VirtualImage:
    """Receive, check and publish an upload. The check gets a time budget in proportion
    to the file's size and stops when the client disconnects (``gone`` returns)."""
    budget = budget or CheckBudget()
    staged = store.stage()
    published = False
    try:
        received = await _receive(staged, body, max_bytes)
        if received == 0:
            raise InvalidInput("the upload is empty", extra={"errors": [
                {"pointer": "/", "detail": "send the image bytes as the request body"}]})
        source = FileSource(staged.path)
        try:
            found = await _bounded(inspect(source, declared_format),
                                   budget.seconds(received), gone)
        except FormatError as exc:
            raise InvalidInput(f"not a usable disk image: {exc}", extra={"errors": [
                {"pointer": "/format" if declared_format else "/", "detail": str(exc)}]}) from exc
        finally:
            await source.close()
        if found.format == "raw" and found.virtual_size % SECTOR:
            detail = (f"a raw image is whole {SECTOR}-byte sectors; this one is "
                      f"{found.virtual_size} bytes")
            raise InvalidInput(f"not a usable disk image: {detail}", extra={"errors": [
                {"pointer": "/format" if declared_format else "/", "detail": detail}]})
        size = await staged.publish()
        published = True
        image = VirtualImage(
            id=uuid.uuid4(), tenant=tenant, name=name, status=ImageStatus.ready,
            format=found.format, virtual_size=found.virtual_size, size=size,
            digest=found.digest, location=staged.key,
        )
        created = await repo.add_image(session, image)
        await events_repo.record(session, tenant, "image.created", dict(created))
        return image
    except BaseException:
        if published:
            await store.delete(staged.key)
        else:
            await staged.discard()
        raise


async def list_images(
    session: AsyncSession, tenant: str, *, limit: int,
    after: tuple[datetime, uuid.UUID] | None = None,
) -> list[VirtualImage]:
    """Up to ``limit`` of the tenant's images, newest first, after the (created_at, id)
    of the last one of the previous page."""
    return await repo.list_images(session, tenant, limit=limit, after=after)


async def get(session: AsyncSession, tenant: str, image_id: uuid.UUID) -> VirtualImage:
    image = await repo.get_image(session, tenant, image_id)
    if image is None:
        raise NotFound(f"image {image_id} not found")
    return image


async def open_content(store: ImageStore, image: VirtualImage) -> RandomAccessSource:
    if image.status != ImageStatus.ready or not image.location:
        raise NotFound(f"image {image.id} has no content (status {image.status})")
    return await store.open(image.location)


async def remove(session: AsyncSession, tenant: str, image_id: uuid.UUID) -> str:
    """Delete the image's row (and record the event) in the caller's transaction; returns
    the storage key of its bytes ("" when it has none). The caller deletes the bytes with
    :func:`delete_content` only after the transaction committed: done the other way
    round, a failed commit would leave a library entry whose bytes are gone."""
    location = await repo.delete_image(session, tenant, image_id)
    if location is None:
        raise NotFound(f"image {image_id} not found")
    await events_repo.record(session, tenant, "image.deleted", {"image_id": str(image_id)})
    return location


async def delete_content(store: ImageStore, location: str) -> None:
    """Delete the bytes of a removed image. The row is already gone, so a failure only
    leaves unreferenced bytes behind: it is logged, not raised."""
    if not location:
        return
    try:
        await store.delete(location)
    except Exception as exc:  # logged: nothing references the bytes any more
        log.warning("could not delete the content %s of a removed image: %s", location, exc)


#: Formats a library image can be converted into (the formats with writers).
CONVERTIBLE = ("raw", "qcow2", "vmdk", "vhd", "vhdx")


async def request_conversion(
    session: AsyncSession, tenant: str, image_id: uuid.UUID, fmt: str, name: str | None,
    options: dict[str, Any] | None = None,
) -> MigrationView:
    """Queue a conversion job (run by workers like a migration) producing a new image."""
    from app.services import migrations

    image = await get(session, tenant, image_id)
    if image.status != ImageStatus.ready:
        raise Conflict(f"image {image_id} is {image.status}; only ready images convert")
    job_name = (name or f"{image.name} to {fmt}")[:255]
    spec = {"type": MigrationType.conversion.value, "image_id": str(image.id),
            "format": fmt, "options": options or {}, "image_name": job_name}
    return await migrations.insert(
        session, tenant, MigrationType.conversion, None, job_name, spec, None, run=True)
