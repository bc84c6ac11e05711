"""SQL for the tenant-wide event log (``migration_events``).

Events are written only through :func:`app.repositories.migrations.insert_event`; the
``migration_events`` insert trigger (migration 0002) adds the webhook outbox rows and
the ``pg_notify`` in the same transaction. This module reads them back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, false, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import MigrationEvent
from app.repositories import migrations as migrations_repo

#: ``seq`` of events that belong to no migration (image.created, webhook.disabled).
TENANT_SEQ = 0


def split_type_filter(value: str) -> tuple[str, bool]:
    """``migration.completed`` -> exact; ``migration.`` or ``migration.*`` -> a prefix."""
    if value.endswith("*"):
        return value[:-1], True
    return value, value.endswith(".")


def type_matches(type_: str, patterns: Sequence[str]) -> bool:
    """Whether ``type_`` matches any filter value (see :func:`split_type_filter`)."""
    for pattern in patterns:
        text, prefix = split_type_filter(pattern)
        if type_ == text or (prefix and type_.startswith(text)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a reader sees: one tenant, optionally one migration, some types.

    ``areas`` are the type prefixes the caller's scopes allow (``migration.``,
    ``image.``, ...); None allows every type. With ``migration_events``, every event
    that belongs to a migration is allowed too, whatever its type (engines emit
    ``live_stream.*``, ``image.created``, ... inside a migration). The same filter
    drives the SQL of a page and the in-memory matching of live events (:meth:`matches`).
    """

    tenant: str
    migration_id: uuid.UUID | None = None
    types: tuple[str, ...] = ()
    areas: tuple[str, ...] | None = None
    migration_events: bool = False
    since: datetime | None = None
    until: datetime | None = None

    def matches_head(self, tenant: str, migration_id: uuid.UUID | None, type_: str) -> bool:
        """The checks a NOTIFY payload allows (no timestamp)."""
        if tenant != self.tenant:
            return False
        if self.migration_id is not None and migration_id != self.migration_id:
            return False
        if self.areas is not None and not any(type_.startswith(a) for a in self.areas) \
                and not (self.migration_events and migration_id is not None):
            return False
        return not self.types or type_matches(type_, self.types)

    def matches(self, row: MigrationEvent) -> bool:
        if not self.matches_head(row.tenant, row.migration_id, row.type):
            return False
        if self.since is not None and row.created_at < self.since:
            return False
        return self.until is None or row.created_at < self.until

    def where(self) -> list[ColumnElement[bool]]:
        e = MigrationEvent
        clauses: list[ColumnElement[bool]] = [e.tenant == self.tenant]
        if self.migration_id is not None:
            clauses.append(e.migration_id == self.migration_id)
        if self.areas is not None:
            allowed = [e.type.startswith(a, autoescape=True) for a in self.areas]
            if self.migration_events:
                allowed.append(e.migration_id.is_not(None))
            clauses.append(or_(false(), *allowed))
        if self.types:
            alternatives: list[ColumnElement[bool]] = []
            for value in self.types:
                text, prefix = split_type_filter(value)
                alternatives.append(
                    e.type.startswith(text, autoescape=True) if prefix else e.type == text
                )
            clauses.append(or_(*alternatives))
        if self.since is not None:
            clauses.append(e.created_at >= self.since)
        if self.until is not None:
            clauses.append(e.created_at < self.until)
        return clauses


async def page(
    session: AsyncSession, where: EventFilter, *, after: int, limit: int,
    by_position: bool = False,
) -> list[MigrationEvent]:
    """Oldest first by id, starting after event ``after``; with ``by_position``, in
    commit order after stream position ``after`` (committed events only)."""
    key = MigrationEvent.position if by_position else MigrationEvent.id
    stmt = select(MigrationEvent).where(*where.where(), key > after).order_by(key).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def first_position_after_id(
    session: AsyncSession, where: EventFilter, event_id: int
) -> int | None:
    """The smallest stream position among committed events with ids above ``event_id``."""
    stmt = select(func.min(MigrationEvent.position)).where(
        *where.where(), MigrationEvent.id > event_id)
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
