"""SQL of the workers: finding claimable migrations, heartbeats, and fenced writes.

Every write a worker makes while running a migration carries the epoch it claimed
with. The statements lock the migration row and check the epoch in the same
statement (or take a row lock first), so once another worker has re-claimed a
migration (bumping the epoch), the old worker's writes match nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import Migration, MigrationStep
from app.models.enums import MigrationStatus

S = MigrationStatus



@dataclass(frozen=True, slots=True)
class Candidate:
    id: uuid.UUID
    tenant: str
    #: ``migrations.source_key``: the per-source-host limit's key ("" for none).
    source_key: str


async def candidates(session: AsyncSession, limit: int) -> list[Candidate]:
    """Claimable migrations, oldest first, locked (others skip them) until commit.

    Claimable: ``queued``; ``running``/``cancelling`` with an expired lease (its
    worker died or was cut off); ``cancelling`` with no lease (cancelled while queued
    after work had started: a worker must unwind it).
    """
    stmt = (
        select(Migration.id, Migration.tenant, Migration.source_key)
        .where(or_(
            Migration.status == S.queued.value,
            (Migration.status.in_([S.running.value, S.cancelling.value]))
            & (Migration.lease_expires_at < func.now()),
            (Migration.status == S.cancelling.value) & Migration.lease_expires_at.is_(None),
        ))
        .order_by(Migration.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Candidate(r[0], r[1], r[2]) for r in await session.execute(stmt)]


async def lock_source_key(session: AsyncSession, key: str) -> bool:
    """Serialise claims per source host until commit; False if another claimer holds it."""
    got = await session.execute(
        select(func.pg_try_advisory_xact_lock(func.hashtext("vmigrate-source:" + key)))
    )
    return bool(got.scalar_one())


async def active_on_source(session: AsyncSession, key: str) -> int:
    """Migrations holding a live lease on this source key."""
    stmt = select(func.count()).select_from(Migration).where(
        Migration.status.in_([S.running.value, S.cancelling.value]),
        Migration.lease_expires_at > func.now(),
        Migration.source_key == key,
    )
    return int((await session.execute(stmt)).scalar_one())


@dataclass(frozen=True, slots=True)
class Beat:
    status: MigrationStatus
    cancel_requested: bool


async def heartbeat(
    session: AsyncSession, migration_id: uuid.UUID, epoch: int, owner: str, lease_seconds: float
) -> Beat | None:
    """Extend the lease; None when the epoch is no longer ours (we were fenced out)."""
    stmt = (
        update(Migration)
        .where(Migration.id == migration_id, Migration.epoch == epoch,
               Migration.lease_owner == owner)
        .values(lease_expires_at=func.now() + timedelta(seconds=lease_seconds))
        .returning(Migration.status, Migration.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else Beat(MigrationStatus(row[0]), bool(row[1]))


async def fence(session: AsyncSession, migration_id: uuid.UUID, epoch: int, **values: Any
                ) -> bool:
    """Update the migration row if the epoch is still ours (locking it until commit)."""
    stmt = (
        update(Migration)
        .where(Migration.id == migration_id, Migration.epoch == epoch)
        .values(updated_at=func.now(), **values)
        .returning(Migration.id)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).one_or_none() is not None


async def update_step(session: AsyncSession, migration_id: uuid.UUID, position: int,
                      **values: Any) -> None:
    await session.execute(
        update(MigrationStep)
        .where(MigrationStep.migration_id == migration_id, MigrationStep.position == position)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def load(session: AsyncSession, migration_id: uuid.UUID) -> Migration | None:
    result = await session.execute(
        select(Migration).where(Migration.id == migration_id)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()
