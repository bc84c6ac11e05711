"""``Idempotency-Key``: claim a key for a request, then record its response or forget
the claim. The HTTP side (headers, replay, problem documents) is the API's
middleware, :mod:`app.api.idempotency`; the caller opens and commits the session.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.models.idempotency import Claimed, StoredKey
from app.repositories import idempotency as repo
from app.services.tokens import hash_token


async def tenant_for_token(session: AsyncSession, token: str) -> str | None:
    """The tenant of an active bearer token, or None (the route answers the 401)."""
    return await repo.tenant_for_token(session, hash_token(token))


async def claim(
    session: AsyncSession, *, tenant: str, key: str, method: str, path: str,
    request_hash: str, ttl: timedelta, in_flight_timeout: timedelta,
) -> Claimed | StoredKey:
    """Claim the key for this request, or return the existing claim."""
    return await repo.claim(
        session, tenant=tenant, key=key, method=method, path=path,
        request_hash=request_hash, ttl=ttl, in_flight_timeout=in_flight_timeout,
    )


async def complete(
    session: AsyncSession, *, tenant: str, key: str, held: Claimed,
    status_code: int, response: dict[str, Any],
) -> None:
    """Record the response of the request that holds the claim."""
    await repo.complete(session, tenant=tenant, key=key, held=held,
                        status_code=status_code, response=response)


async def release(session: AsyncSession, *, tenant: str, key: str, held: Claimed) -> None:
    """Forget an in-flight claim (the request failed in a way worth retrying)."""
    await repo.release(session, tenant=tenant, key=key, held=held)
