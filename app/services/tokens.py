"""API tokens: created once (only their SHA-256 is stored), checked on every request."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.errors import InvalidInput
from app.models.db import ApiToken

TOKEN_PREFIX = "vmg_"  # noqa: S105 - a public prefix, not a secret

#: Every scope a token can carry, with what it allows. ``AREA:write`` implies
#: ``AREA:read``. The tenant's event log (``/v1/events``) needs any ``:read`` scope and
#: shows the areas the token can read.
SCOPE_HELP: dict[str, str] = {
    "migrations:read": "list and read migrations and their events",
    "migrations:write": "create, run, cancel and delete migrations",
    "clouds:read": "list and read clouds (credentials are never shown)",
    "clouds:write": "register, update and delete clouds",
    "images:read": "list, read and download library images; watch conversions",
    "images:write": "upload, convert and delete library images",
    "webhooks:read": "list and read webhook endpoints and their deliveries",
    "webhooks:write": "create, update, delete webhooks; rotate secrets; redeliver",
    "metrics:read": "scrape GET /metrics (counts only, no tenant's data)",
}
SCOPES = tuple(SCOPE_HELP)
#: The smallest set that allows everything: the ``:write`` scopes (which imply their
#: ``:read``) and the read scopes that have no ``:write``.
ALL_SCOPES = tuple(
    s for s in SCOPES
    if s.endswith(":write") or f"{s.partition(':')[0]}:write" not in SCOPE_HELP
)

_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a tenant and the scopes of the token used."""

    tenant: str
    scopes: frozenset[str]
    token_id: str

    def allows(self, scope: str) -> bool:
        if scope in self.scopes:
            return True
        area, _, action = scope.partition(":")
        return action == "read" and f"{area}:write" in self.scopes


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def normalise_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise InvalidInput(f"unknown scopes {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    return sorted(set(scopes))


async def create_token(
    session: AsyncSession, tenant: str, scopes: list[str], name: str = ""
) -> tuple[ApiToken, str]:
    """Store a new token's hash; return the row and the token (shown once, never stored)."""
    if not _TENANT_RE.match(tenant):
        raise InvalidInput("tenant must be 1-64 of a-z, 0-9, '_' or '-', starting alphanumeric")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        tenant=tenant, name=name, token_hash=hash_token(token),
        prefix=token[:12], scopes=normalise_scopes(scopes),
    )
    session.add(row)
    await session.flush()
    return row, token


async def authenticate(session: AsyncSession, token: str) -> Principal | None:
    """The principal for a presented token, or None if unknown or revoked."""
    row = (
        await session.execute(
            select(ApiToken).where(
                ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
            )
        )
    ).scalar_one_or_none()
    if row is None:
        return None
    await session.execute(
        update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=datetime.now(UTC))
    )
    return Principal(tenant=row.tenant, scopes=frozenset(row.scopes), token_id=str(row.id))


async def revoke_token(session: AsyncSession, prefix: str) -> int:
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.prefix == prefix, ApiToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
