"""SQL for ``Idempotency-Key``: claim a key, record or forget its response.

A key is claimed by inserting its row with no response yet ("in flight"); the primary
key ``(tenant, key)`` makes exactly one concurrent claimer win. Expired rows, and
in-flight rows whose request died without releasing them, are deleted just before a
claim, so they never block a key for good.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import ApiToken, IdempotencyKey
from app.models.idempotency import Claimed, StoredKey


async def tenant_for_token(session: AsyncSession, token_hash: str) -> str | None:
    """The tenant of an active token, without touching ``last_used_at``.

    The route's own authentication does the bookkeeping (and the 401s); this only
    scopes the key.
    """
    result = await session.execute(
        select(ApiToken.tenant).where(
            ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None)
        )
    )
    return result.scalar_one_or_none()


async def claim(
    session: AsyncSession,
    *,
    tenant: str,
    key: str,
    method: str,
    path: str,
    request_hash: str,
    ttl: timedelta,
    in_flight_timeout: timedelta,
) -> Claimed | StoredKey:
    """Claim the key for this request, or return the existing claim."""
    now = func.now()
    await session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant == tenant,
            IdempotencyKey.key == key,
            or_(
                IdempotencyKey.created_at < now - ttl,
                and_(
                    IdempotencyKey.status_code.is_(None),
                    IdempotencyKey.created_at < now - in_flight_timeout,
                ),
            ),
        )
    )
    inserted = await session.execute(
        insert(IdempotencyKey)
        .values(tenant=tenant, key=key, method=method, path=path, request_hash=request_hash)
        .on_conflict_do_nothing(index_elements=["tenant", "key"])
        .returning(IdempotencyKey.created_at)
    )
    created_at = inserted.scalar_one_or_none()
    if created_at is not None:
        return Claimed(created_at)
    row = (
        await session.execute(
            select(
                IdempotencyKey.method, IdempotencyKey.path, IdempotencyKey.request_hash,
                IdempotencyKey.status_code, IdempotencyKey.response,
            ).where(IdempotencyKey.tenant == tenant, IdempotencyKey.key == key)
        )
    ).one_or_none()
    if row is None:  # released between our insert attempt and the read: a rare race
        return StoredKey(method, path, request_hash, None, None)
    return StoredKey(*row)


async def complete(
    session: AsyncSession, *, tenant: str, key: str, held: Claimed,
    status_code: int, response: dict[str, Any],
) -> None:
    """Record the response of the request that holds the claim."""
    await session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.tenant == tenant,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at == held.created_at,
            IdempotencyKey.status_code.is_(None),
        )
        .values(status_code=status_code, response=response)
    )


async def release(session: AsyncSession, *, tenant: str, key: str, held: Claimed) -> None:
    """Forget an in-flight claim (the request failed in a way worth retrying)."""
    await session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant == tenant,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at == held.created_at,
            IdempotencyKey.status_code.is_(None),
        )
    )


async def purge_expired(session: AsyncSession, ttl: timedelta) -> int:
    """Delete every expired key (for a periodic job); returns how many."""
    result = await session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - ttl)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
