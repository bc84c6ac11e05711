"""The virtual image library: uploads, reads and removal.

An upload streams to a staging file, is identified and checked by the format readers
(a declared format that disagrees with the bytes is refused), gets its ``vmd1``
digest over the virtual disk, and is then published atomically. Nothing is visible
in the library (row or object) until every check passed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import AppError, Conflict, InvalidInput, NotFound
from app.formats.base import FormatError, RandomAccessSource
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


class TooLarge(AppError):
    status = 413
    code = "image-too-large"
    title = "Image too large"


@dataclass(frozen=True, slots=True)
class Inspected:
    format: str
    virtual_size: int
    digest: str


async def inspect(source: RandomAccessSource, declared: str | None) -> Inspected:
    """Identify an image, check it parses end to end, and compute its digest."""
    reader = await open_reader(source, declared)
    try:
        digest = await digest_extents(reader.extents(), reader.virtual_size)
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


async def upload(
    session: AsyncSession, store: ImageStore, tenant: str, *, name: str,
    declared_format: str | None, body: AsyncIterator[bytes], max_bytes: int,
) -> VirtualImage:
    staged = store.stage()
    published = False
    try:
        received = await _receive(staged, body, max_bytes)
        if received == 0:
            raise InvalidInput("the upload is empty", extra={"errors": [
                {"pointer": "/", "detail": "send the image bytes as the request body"}]})
        source = FileSource(staged.path)
        try:
            found = await inspect(source, declared_format)
        except FormatError as exc:
            raise InvalidInput(f"not a usable disk image: {exc}", extra={"errors": [
                {"pointer": "/format" if declared_format else "/", "detail": str(exc)}]}) from exc
        finally:
            await source.close()
        size = await staged.publish()
        published = True
        image = VirtualImage(
            id=uuid.uuid4(), tenant=tenant, name=name, status=ImageStatus.ready,
            format=found.format, virtual_size=found.virtual_size, size=size,
            digest=found.digest, location=staged.key,
        )
        stored = await repo.insert_image(session, image)
        await events_repo.record(session, tenant, "image.created", image_event(stored))
        return stored
    except BaseException:
        if published:
            await store.delete(staged.key)
        else:
            await staged.discard()
        raise


def image_event(image: VirtualImage) -> dict[str, object]:
    """The payload of ``image.created``: what a consumer needs without another call."""
    return {"image_id": str(image.id), "name": image.name, "format": image.format,
            "virtual_size": image.virtual_size, "size": image.size, "digest": image.digest}


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


async def get_conversion(session: AsyncSession, tenant: str, job_id: uuid.UUID
                         ) -> MigrationView:
    """A conversion job of the tenant's; any other migration is NotFound here (it is
    read at ``/v1/migrations`` with the migrations scopes)."""
    from app.services import migrations

    job = await migrations.get(session, tenant, job_id)
    if job.type != MigrationType.conversion.value:
        raise NotFound(f"conversion {job_id} not found")
    return job


async def request_conversion(
    session: AsyncSession, tenant: str, image_id: uuid.UUID, fmt: str, name: str | None,
) -> MigrationView:
    """Queue a conversion job (run by workers like a migration) producing a new image."""
    from app.services import migrations

    image = await get(session, tenant, image_id)
    if image.status != ImageStatus.ready:
        raise Conflict(f"image {image_id} is {image.status}; only ready images convert")
    spec = {"type": MigrationType.conversion.value, "image_id": str(image.id),
            "format": fmt, "options": {}}
    return await migrations.insert(
        session, tenant, MigrationType.conversion, None,
        name or f"{image.name} to {fmt}", spec, None, run=True)
