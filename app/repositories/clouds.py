"""SQL for clouds. Every query filters by tenant: another tenant's ids are simply absent."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, text, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import Conflict
from app.models.db import Cloud
from app.models.enums import MigrationStatus

_UNIQUE_NAME = "uq_clouds_tenant_name"


class DuplicateCloudName(Conflict):
    code = "duplicate-cloud-name"
    title = "Cloud name already taken"


async def get_cloud(session: AsyncSession, tenant: str, cloud_id: uuid.UUID) -> Cloud | None:
    """The tenant's cloud with this id, or None (also for another tenant's id)."""
    result = await session.execute(
        select(Cloud).where(Cloud.id == cloud_id, Cloud.tenant == tenant)
    )
    return result.scalar_one_or_none()


async def lock_cloud(
    session: AsyncSession, tenant: str, cloud_id: uuid.UUID, *, share: bool = False
) -> Cloud | None:
    """Like :func:`get_cloud`, locking the row until the transaction ends.

    ``share=True`` (``FOR SHARE``) is what a writer referencing the cloud takes (e.g.
    creating a migration), so a concurrent delete, which locks ``FOR UPDATE``, waits for
    it and then sees the reference.
    """
    stmt = select(Cloud).where(Cloud.id == cloud_id, Cloud.tenant == tenant)
    stmt = stmt.with_for_update(read=share)
    result = await session.execute(stmt.execution_options(populate_existing=True))
    return result.scalar_one_or_none()


def _duplicate(exc: IntegrityError, name: str) -> DuplicateCloudName | None:
    if _UNIQUE_NAME not in str(exc.orig):
        return None
    return DuplicateCloudName(
        f"a cloud named {name!r} already exists",
        extra={"errors": [{"pointer": "/name", "detail": "already taken"}]},
    )


async def insert_cloud(session: AsyncSession, cloud: Cloud) -> Cloud:
    """Insert and flush, so the id and timestamps are known.

    Raises :class:`DuplicateCloudName` when the tenant has a cloud of that name. The
    insert runs in a savepoint, so the request's transaction stays usable.
    """
    try:
        async with session.begin_nested():
            session.add(cloud)
            await session.flush()
    except IntegrityError as exc:
        if (err := _duplicate(exc, cloud.name)) is not None:
            raise err from None
        raise
    await session.refresh(cloud)
    return cloud


async def list_clouds(
    session: AsyncSession,
    tenant: str,
    *,
    kind: str | None,
    after: tuple[datetime, uuid.UUID] | None,
    limit: int,
) -> list[Cloud]:
    """Up to ``limit`` clouds, newest first, strictly after the ``(created_at, id)`` key."""
    stmt = select(Cloud).where(Cloud.tenant == tenant)
    if kind is not None:
        stmt = stmt.where(Cloud.kind == kind)
    if after is not None:
        stmt = stmt.where(tuple_(Cloud.created_at, Cloud.id) < tuple_(*after))
    stmt = stmt.order_by(Cloud.created_at.desc(), Cloud.id.desc()).limit(limit)
    return list((await session.scalars(stmt)).all())


@dataclass(frozen=True, slots=True)
class CloudChanges:
    """What an update writes; ``None`` leaves a column as it is."""

    name: str | None = None
    settings: dict[str, Any] | None = None
    #: Replace ``credentials`` with ``sealed_credentials`` (which may be None: removed).
    replace_credentials: bool = False
    sealed_credentials: bytes | None = None


async def update_cloud(
    session: AsyncSession,
    tenant: str,
    cloud_id: uuid.UUID,
    changes: CloudChanges,
    *,
    versions: frozenset[int] | None,
) -> Cloud | None:
    """Apply ``changes`` if the row's version is one of ``versions`` (any if None).

    One guarded ``UPDATE ... RETURNING``: no row back means absent or a version
    mismatch (the caller tells which), never a lost update. Bumps ``version``.
    Raises :class:`DuplicateCloudName` on a rename to a taken name.
    """
    values: dict[str, Any] = {"version": Cloud.version + 1, "updated_at": func.now()}
    if changes.name is not None:
        values["name"] = changes.name
    if changes.settings is not None:
        values["settings"] = changes.settings
    if changes.replace_credentials:
        values["credentials"] = changes.sealed_credentials
    stmt = update(Cloud).where(Cloud.id == cloud_id, Cloud.tenant == tenant)
    if versions is not None:
        stmt = stmt.where(Cloud.version.in_(versions))
    stmt = stmt.values(values).returning(Cloud)
    try:
        async with session.begin_nested():
            result = await session.execute(
                stmt, execution_options={"synchronize_session": False, "populate_existing": True}
            )
            return result.scalar_one_or_none()
    except IntegrityError as exc:
        if changes.name is not None and (err := _duplicate(exc, changes.name)) is not None:
            raise err from None
        raise


async def delete_cloud(session: AsyncSession, tenant: str, cloud_id: uuid.UUID) -> bool:
    result = await session.execute(
        delete(Cloud).where(Cloud.id == cloud_id, Cloud.tenant == tenant)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


_TERMINAL = [s.value for s in MigrationStatus if s.is_terminal()]

# Any ``cloud_id`` anywhere in the spec (source, destination, ...), so the check does
# not depend on where the migrations schema puts it.
_IN_USE = text(
    """
    SELECT EXISTS (
        SELECT 1 FROM migrations
        WHERE tenant = :tenant
          AND status <> ALL(:terminal)
          AND jsonb_path_exists(spec, '$.**.cloud_id ? (@ == $id)',
                                jsonb_build_object('id', CAST(:cloud_id AS text)))
    )
    """
)


async def cloud_in_use(session: AsyncSession, tenant: str, cloud_id: uuid.UUID) -> bool:
    """Whether a non-terminal migration of the tenant references the cloud."""
    result = await session.execute(
        _IN_USE, {"tenant": tenant, "terminal": _TERMINAL, "cloud_id": str(cloud_id)}
    )
    return bool(result.scalar_one())
