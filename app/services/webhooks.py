"""Webhook endpoints: register, change, rotate secrets, inspect and redeliver.

Secrets are generated here, sealed with the :class:`SecretBox` before they reach the
database, and returned only by :func:`create` and :func:`rotate_secret`. Targets are
checked against the :class:`~app.webhooks.policy.TargetPolicy` on every create and
URL change (and again by the dispatcher before each attempt).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.crypto import SecretBox
from app.errors import Conflict, NotFound
from app.models.db import Webhook, WebhookDelivery
from app.models.schemas.webhooks import (
    DeliveryOut,
    DeliveryStatus,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookSecret,
    WebhookUpdate,
)
from app.repositories import webhooks as repo
from app.services.clouds import PreconditionFailed
from app.webhooks.policy import TargetPolicy
from app.webhooks.signing import new_secret, seal


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Any]
    #: (created_at, id) of the last item when more follow.
    next_key: tuple[datetime, uuid.UUID] | None


async def create(
    session: AsyncSession, box: SecretBox, policy: TargetPolicy, tenant: str,
    body: WebhookCreate,
) -> WebhookCreated:
    await policy.check(body.url)
    secret = new_secret()
    row = await repo.insert(session, Webhook(
        id=uuid.uuid4(), tenant=tenant, url=body.url, description=body.description,
        event_types=sorted(set(body.event_types)), active=body.active,
        secrets=seal(box, secret), version=1,
    ))
    return WebhookCreated.model_validate({**_out(row).model_dump(), "secret": secret})


def _out(row: Webhook) -> WebhookOut:
    return WebhookOut.model_validate(row)


async def _row(session: AsyncSession, tenant: str, webhook_id: uuid.UUID) -> Webhook:
    row = await repo.get(session, tenant, webhook_id)
    if row is None:
        raise NotFound(f"no webhook {webhook_id}")
    return row


async def get(session: AsyncSession, tenant: str, webhook_id: uuid.UUID) -> WebhookOut:
    return _out(await _row(session, tenant, webhook_id))


async def list_page(
    session: AsyncSession, tenant: str, *, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> Page:
    rows = await repo.page(session, tenant, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_out(r) for r in rows], (rows[-1].created_at, rows[-1].id) if more else None)


async def _changed(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, values: dict[str, Any],
    versions: Collection[int] | None,
) -> Webhook:
    row = await repo.update_fields(session, tenant, webhook_id, values, versions)
    if row is None:
        current = await _row(session, tenant, webhook_id)  # 404 first
        raise PreconditionFailed(
            f"webhook {webhook_id} is at version {current.version}, not the If-Match one")
    return row


async def update(
    session: AsyncSession, policy: TargetPolicy, tenant: str, webhook_id: uuid.UUID,
    patch: WebhookUpdate, *, versions: Collection[int] | None,
) -> WebhookOut:
    values: dict[str, Any] = {}
    if patch.url is not None:
        await policy.check(patch.url)
        values["url"] = patch.url
    if patch.event_types is not None:
        values["event_types"] = sorted(set(patch.event_types))
    if patch.description is not None:
        values["description"] = patch.description
    if patch.active is not None:
        values["active"] = patch.active
        if patch.active:  # re-enabled by its owner: a fresh start
            values["disabled_reason"] = None
            values["failing_since"] = None
    return _out(await _changed(session, tenant, webhook_id, values, versions))


async def delete(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, *,
    versions: Collection[int] | None,
) -> None:
    if not await repo.remove(session, tenant, webhook_id, versions):
        current = await _row(session, tenant, webhook_id)
        raise PreconditionFailed(
            f"webhook {webhook_id} is at version {current.version}, not the If-Match one")


async def rotate_secret(
    session: AsyncSession, box: SecretBox, tenant: str, webhook_id: uuid.UUID, *,
    overlap: timedelta,
) -> WebhookSecret:
    """A new current secret; the old one keeps signing for ``overlap``.

    A rotation during an overlap drops the older previous secret: only the two
    newest are ever valid.
    """
    row = await _row(session, tenant, webhook_id)
    secret = new_secret()
    old = str(box.open(row.secrets)["current"])
    expires = datetime.now(UTC) + overlap if overlap > timedelta(0) else None
    await _changed(session, tenant, webhook_id, {
        "secrets": seal(box, secret, old if expires else None),
        "previous_secret_expires_at": expires,
    }, {row.version})
    return WebhookSecret(secret=secret, previous_secret_expires_at=expires)


def delivery_out(row: WebhookDelivery) -> DeliveryOut:
    status = DeliveryStatus(row.status)
    return DeliveryOut(
        id=row.id, webhook_id=row.webhook_id, event_id=row.event_id,
        event_type=row.event_type, status=status, attempts=row.attempts,
        last_attempt_at=row.last_attempt_at, response_status=row.response_status,
        latency_ms=row.latency_ms, last_error=row.last_error,
        next_attempt_at=row.next_attempt_at if status is DeliveryStatus.pending else None,
        created_at=row.created_at,
    )


async def deliveries(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, *,
    statuses: Collection[DeliveryStatus], after: tuple[datetime, uuid.UUID] | None, limit: int,
) -> Page:
    await _row(session, tenant, webhook_id)
    rows = await repo.deliveries(session, tenant, webhook_id,
                                 statuses=[s.value for s in statuses], after=after,
                                 limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([delivery_out(r) for r in rows],
                (rows[-1].created_at, rows[-1].id) if more else None)


async def redeliver(
    session: AsyncSession, tenant: str, webhook_id: uuid.UUID, delivery_id: uuid.UUID
) -> DeliveryOut:
    """Attempt it again now, with a fresh retry window, whatever its status."""
    hook = await _row(session, tenant, webhook_id)
    if not hook.active:
        raise Conflict(f"webhook {webhook_id} is disabled; re-enable it (active: true) first")
    row = await repo.redeliver(session, tenant, webhook_id, delivery_id)
    if row is None:
        raise NotFound(f"no delivery {delivery_id} for webhook {webhook_id}")
    return delivery_out(row)
