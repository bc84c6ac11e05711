"""SQL for library images. Every query filters by tenant."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import VirtualImage
from app.models.json import EventPayload

#: The payload of an ``image.created`` event.
ImageCreated = EventPayload


async def get_image(session: AsyncSession, tenant: str, image_id: uuid.UUID) -> VirtualImage | None:
    result = await session.execute(
        select(VirtualImage).where(VirtualImage.id == image_id, VirtualImage.tenant == tenant)
    )
    return result.scalar_one_or_none()


async def add_image(session: AsyncSession, image: VirtualImage) -> ImageCreated:
    """Put a new image into the library (the one way: uploads, migrations and
    conversions alike) and return the payload of its ``image.created`` event, which the
    caller records in its scope (tenant-level for an upload, the migration's own log for
    an image a migration or conversion made)."""
    session.add(image)
    await session.flush()
    await session.refresh(image)
    return image_created(image)


def image_created(image: VirtualImage) -> ImageCreated:
    """The payload of ``image.created`` (docs/webhooks.md): what a consumer needs without
    another call, and where the image came from."""
    return {"image_id": str(image.id), "name": image.name, "format": image.format,
            "virtual_size": image.virtual_size, "size": image.size, "digest": image.digest,
            "migration_id": None if image.migration_id is None else str(image.migration_id),
            "parent_id": None if image.parent_id is None else str(image.parent_id)}


async def list_images(
    session: AsyncSession, tenant: str, *, limit: int,
    after: tuple[datetime, uuid.UUID] | None = None, fmt: str | None = None,
) -> list[VirtualImage]:
    """Newest first; ``after`` is the (created_at, id) of the last row of the previous page."""
    stmt = select(VirtualImage).where(VirtualImage.tenant == tenant)
    if fmt is not None:
        stmt = stmt.where(VirtualImage.format == fmt)
    if after is not None:
        stmt = stmt.where(tuple_(VirtualImage.created_at, VirtualImage.id) < after)
    stmt = stmt.order_by(VirtualImage.created_at.desc(), VirtualImage.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def delete_image(session: AsyncSession, tenant: str, image_id: uuid.UUID) -> str | None:
    """Delete the row; returns the storage location to remove, or None if absent."""
    result = await session.execute(
        delete(VirtualImage)
        .where(VirtualImage.id == image_id, VirtualImage.tenant == tenant)
        .returning(VirtualImage.location)
    )
    row = result.first()
    return None if row is None else (row[0] or "")
