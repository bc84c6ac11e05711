"""API tokens: created once (only their SHA-256 is stored), checked on every request.

Checking a token costs a database read, so each process keeps what it read in a
:class:`TokenCache` for ``ttl`` seconds: a revoked token keeps working on a process
that saw it within the last ``ttl`` seconds, and is refused everywhere after that.
``last_used_at`` is written at most once per ``touch_interval`` per token and process,
by a task of its own, never by the request that used the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
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


async def lookup(session: AsyncSession, token_hash: str) -> Principal | None:
    """The principal of an unrevoked token with this hash, or None (one SELECT)."""
    row = (
        await session.execute(
            select(ApiToken.id, ApiToken.tenant, ApiToken.scopes).where(
                ApiToken.token_hash == token_hash, ApiToken.revoked_at.is_(None)
            )
        )
    ).one_or_none()
    if row is None:
        return None
    return Principal(tenant=row.tenant, scopes=frozenset(row.scopes), token_id=str(row.id))


async def authenticate(session: AsyncSession, token: str) -> Principal | None:
    """The principal for a presented token, or None if unknown or revoked; uncached,
    and stamps ``last_used_at`` (for callers outside the API's request path)."""
    principal = await lookup(session, hash_token(token))
    if principal is not None:
        await session.execute(
            update(ApiToken).where(ApiToken.token_hash == hash_token(token))
            .values(last_used_at=datetime.now(UTC))
        )
    return principal


log = logging.getLogger(__name__)


class TokenCache:
    """Known tokens of one process, each trusted for ``ttl`` seconds after it was read.

    - A hit costs no statement. A miss is one SELECT, in the session the request
      already has (so a request still uses one transaction at most).
    - Revocation takes effect on every process within ``ttl`` seconds: an entry is never
      used once it is ``ttl`` old, and is then read again.
    - Unknown or revoked tokens are not remembered (a token created a moment ago works
      at once); at most ``max_entries`` tokens are kept, the oldest dropped first.
    - ``last_used_at`` is written at most once per ``touch_interval`` per token by this
      process, in a task of its own with its own short transaction: a request never
      waits for it, and a failed write is only logged (the next use tries again).
    """

    def __init__(
        self,
        ttl: float,
        *,
        touch_interval: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.touch_interval = touch_interval
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.lookups = 0  # how many times a token was read from the database

    def cached(self, token: str) -> Principal | None:
        """The principal if this process read the token less than ``ttl`` ago."""
        key = hash_token(token)
        entry = self._entries.get(key)
        if entry is None:
            return None
        principal, read_at = entry
        if self._clock() - read_at >= self.ttl:
            del self._entries[key]
            return None
        return principal

    async def authenticate(self, session: AsyncSession, token: str) -> Principal | None:
        """The token's principal: from the cache, else read in ``session``."""
        principal = self.cached(token)
        if principal is not None:
            return principal
        key = hash_token(token)
        self.lookups += 1
        principal = await lookup(session, key)
        if principal is not None:
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (principal, self._clock())
        return principal

    def used(self, db: Database, principal: Principal) -> None:
        """Note a use of ``principal``'s token; schedules the ``last_used_at`` write when
        the last one from this process is ``touch_interval`` old (or there was none)."""
        now = self._clock()
        last = self._touched.get(principal.token_id)
        if last is not None and now - last < self.touch_interval:
            return
        self._touched[principal.token_id] = now
        if len(self._touched) > self.max_entries:
            self._touched.pop(next(iter(self._touched)))
        task = asyncio.create_task(self._touch(db, principal.token_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _touch(db: Database, token_id: str) -> None:
        try:
            async with db.session() as session:
                await session.execute(
                    update(ApiToken).where(ApiToken.id == uuid.UUID(token_id))
                    .values(last_used_at=datetime.now(UTC))
                )
        except Exception as exc:  # the next use after touch_interval tries again
            log.warning("could not record a token's last use: %s", exc)

    async def drain(self) -> None:
        """Wait for the pending ``last_used_at`` writes (at shutdown, and in tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def revoke_token(session: AsyncSession, prefix: str) -> int:
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.prefix == prefix, ApiToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
