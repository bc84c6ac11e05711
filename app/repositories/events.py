"""SQL for the tenant-wide event log (``migration_events``).

Events are written only through :func:`app.repositories.migrations.insert_event`; the
``migration_events`` insert trigger (migration 0002) adds the webhook outbox rows and
the ``pg_notify`` in the same transaction. This module reads them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import MigrationEvent
from app.models.event_filter import EventFilter, split_type_filter
from app.repositories import migrations as migrations_repo

#: ``seq`` of events that belong to no migration (image.created, webhook.disabled).
TENANT_SEQ = 0


def clauses(where: EventFilter) -> list[ColumnElement[bool]]:
    """The SQL conditions of ``where`` (what :meth:`EventFilter.matches` checks in memory)."""
    e = MigrationEvent
    out: list[ColumnElement[bool]] = [e.tenant == where.tenant]
    if where.migration_id is not None:
        out.append(e.migration_id == where.migration_id)
    if where.areas is not None:
        allowed = [e.type.startswith(a, autoescape=True) for a in where.areas]
        if where.migration_events:
            allowed.append(e.migration_id.is_not(None))
        out.append(or_(false(), *allowed))
    if where.types:
        alternatives: list[ColumnElement[bool]] = []
        for value in where.types:
            text, prefix = split_type_filter(value)
            alternatives.append(
                e.type.startswith(text, autoescape=True) if prefix else e.type == text
            )
        out.append(or_(*alternatives))
    if where.since is not None:
        out.append(e.created_at >= where.since)
    if where.until is not None:
        out.append(e.created_at < where.until)
    return out


async def page(
    session: AsyncSession, where: EventFilter, *, after: int, limit: int,
    by_position: bool = False,
) -> list[MigrationEvent]:
    """Oldest first by id, starting after event ``after``; with ``by_position``, in
    commit order after stream position ``after`` (committed events only)."""
    key = MigrationEvent.position if by_position else MigrationEvent.id
    stmt = select(MigrationEvent).where(*clauses(where), key > after).order_by(key).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def first_position_after_id(
    session: AsyncSession, where: EventFilter, event_id: int
) -> int | None:
    """The smallest stream position among committed events with ids above ``event_id``."""
    stmt = select(func.min(MigrationEvent.position)).where(
        *clauses(where), MigrationEvent.id > event_id)
    position: int | None = (await session.execute(stmt)).scalar_one_or_none()
    return position


async def by_ids(session: AsyncSession, ids: Sequence[int]) -> list[MigrationEvent]:
    """The given events (any tenant: callers filter), oldest first."""
    stmt = select(MigrationEvent).where(MigrationEvent.id.in_(list(ids))).order_by(
        MigrationEvent.id
    )
    return list((await session.execute(stmt)).scalars())


async def record(
    session: AsyncSession, tenant: str, type_: str, payload: dict[str, Any]
) -> None:
    """A tenant-level event (no migration), in the caller's transaction."""
    await migrations_repo.insert_event(session, tenant, None, TENANT_SEQ, type_, payload)
