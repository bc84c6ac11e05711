"""SQL for webhook endpoints and the delivery outbox. Every API query filters by tenant.

Delivery rows are created by the ``migration_events`` trigger (migration 0002), never
here. The dispatcher's queries (:func:`claim`, :func:`finish`) are the only ones that
span tenants.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import Webhook, WebhookDelivery


async def insert(session: AsyncSession, row: Webhook) -> Webhook:
    session.add(row)
    await session.flush()
    await session.refresh(row)
    return row


async def get(session: AsyncSession, tenant: str, webhook_id: uuid.UUID) -> Webhook | None:
    stmt = (
        select(Webhook)
        .where(Webhook.id == webhook_id, Webhook.tenant == tenant)
        .execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def page(
    session: AsyncSession, tenant: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[Webhook]:
    """Newest first by (created_at, id)."""
    stmt = select(Webhook).where(Webhook.tenant == tenant)
    if after is not None:
        stmt = stmt.where(tuple_(Webhook.created_at, Webhook.id) < tuple_(*after))
    stmt = stmt.order_by(Webhook.created_at.desc(), Webhook.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def update_fields(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, values: dict[str, Any],
    versions: Collection[int] | None,
) -> Webhook | None:
    """Apply ``values`` and bump the version, if the version is one of ``versions``
    (any when None); None when nothing matched."""
    guards = [Webhook.id == webhook_id, Webhook.tenant == tenant]
    if versions is not None:
        guards.append(Webhook.version.in_(list(versions)))
    stmt = (
        update(Webhook).where(*guards)
        .values({**values, "version": Webhook.version + 1, "updated_at": func.now()})
        .returning(Webhook.id)
        .execution_options(synchronize_session=False)
    )
    if (await session.execute(stmt)).scalar_one_or_none() is None:
        return None
    return await get(session, tenant, webhook_id)


async def remove(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, versions: Collection[int] | None
) -> bool:
    guards = [Webhook.id == webhook_id, Webhook.tenant == tenant]
    if versions is not None:
        guards.append(Webhook.version.in_(list(versions)))
    stmt = delete(Webhook).where(*guards).returning(Webhook.id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def deliveries(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, *, statuses: Sequence[str],
    after: tuple[datetime, uuid.UUID] | None, limit: int,
) -> list[WebhookDelivery]:
    """Newest first by (created_at, id)."""
    d = WebhookDelivery
    stmt = select(d).where(d.tenant == tenant, d.webhook_id == webhook_id)
    if statuses:
        stmt = stmt.where(d.status.in_(list(statuses)))
    if after is not None:
        stmt = stmt.where(tuple_(d.created_at, d.id) < tuple_(*after))
    stmt = stmt.order_by(d.created_at.desc(), d.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def redeliver(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, delivery_id: uuid.UUID
) -> WebhookDelivery | None:
    """Due now, with a fresh retry window; None if no such delivery."""
    d = WebhookDelivery
    stmt = (
        update(d)
        .where(d.id == delivery_id, d.webhook_id == webhook_id, d.tenant == tenant)
        .values(status="pending", next_attempt_at=func.now(), retry_from=func.now())
        .returning(d)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


# --- the dispatcher's side -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery taken for one attempt, with what the attempt needs."""

    id: uuid.UUID
    tenant: str
    webhook_id: uuid.UUID
    url: str
    secrets: bytes
    previous_secret_expires_at: datetime | None
    event_id: int
    event_type: str
    migration_id: uuid.UUID | None
    event_seq: int
    payload: dict[str, Any]
    event_created_at: datetime
    attempts: int
    retry_from: datetime


async def due(
    session: AsyncSession, *, exclude: Collection[uuid.UUID], limit: int
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(delivery id, webhook id) of due deliveries to active endpoints, oldest due
    first, row-locked (``FOR UPDATE SKIP LOCKED``: concurrent dispatchers take
    different rows). ``exclude`` names endpoints already at their concurrency limit."""
    d = WebhookDelivery
    stmt = (
        select(d.id, d.webhook_id)
        .join(Webhook, Webhook.id == d.webhook_id)
        .where(d.status == "pending", d.next_attempt_at <= func.now(), Webhook.active)
        .order_by(d.next_attempt_at)
        .limit(limit)
        .with_for_update(of=d, skip_locked=True)
    )
    if exclude:
        stmt = stmt.where(d.webhook_id.not_in(list(exclude)))
    return [(r[0], r[1]) for r in (await session.execute(stmt)).all()]


async def take(
    session: AsyncSession, ids: Sequence[uuid.UUID], lease: timedelta
) -> list[Claimed]:
    """Count an attempt on the (locked) rows and push their due time past the attempt,
    so a dispatcher that dies mid-attempt leaves them to be retried after ``lease``."""
    d, w = WebhookDelivery, Webhook
    stmt = (
        update(d)
        .where(d.id.in_(list(ids)), d.webhook_id == w.id)
        .values(attempts=d.attempts + 1, next_attempt_at=func.now() + lease,
                last_attempt_at=func.now())
        .returning(d.id, d.tenant, d.webhook_id, w.url, w.secrets, w.previous_secret_expires_at,
                   d.event_id, d.event_type, d.migration_id, d.event_seq, d.payload,
                   d.event_created_at, d.attempts, d.retry_from)
        .execution_options(synchronize_session=False)
    )
    return [Claimed(**row._asdict()) for row in (await session.execute(stmt)).all()]


async def finish(
    session: AsyncSession, delivery_id: uuid.UUID, *, status: str,
    next_attempt_at: datetime | None, response_status: int | None, latency_ms: int | None,
    error: str | None,
) -> None:
    values: dict[str, Any] = {"status": status, "response_status": response_status,
                              "latency_ms": latency_ms, "last_error": error}
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    await session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(values)
        .execution_options(synchronize_session=False)
    )


async def mark_healthy(session: AsyncSession, webhook_id: uuid.UUID) -> None:
    await session.execute(
        update(Webhook).where(Webhook.id == webhook_id, Webhook.failing_since.is_not(None))
        .values(failing_since=None).execution_options(synchronize_session=False)
    )


async def mark_failing(session: AsyncSession, webhook_id: uuid.UUID) -> datetime | None:
    """Start the failing run if none is open; returns when it started."""
    stmt = (
        update(Webhook).where(Webhook.id == webhook_id)
        .values(failing_since=func.coalesce(Webhook.failing_since, func.now()))
        .returning(Webhook.failing_since)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def disable(
    session: AsyncSession, webhook_id: uuid.UUID, reason: str
) -> Webhook | None:
    """Deactivate an active endpoint; None if it already was (so one event is written)."""
    stmt = (
        update(Webhook).where(Webhook.id == webhook_id, Webhook.active)
        .values(active=False, disabled_reason=reason, version=Webhook.version + 1,
                updated_at=func.now())
        .returning(Webhook)
        .execution_options(synchronize_session=False, populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()
