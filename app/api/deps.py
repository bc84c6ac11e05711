"""Request-scoped dependencies: the application context, a DB session, the caller.

A request uses one session (one transaction) at most: the route's. Authentication
takes the caller from the process's :class:`~app.services.tokens.TokenCache`, and only
on a miss reads the token in that same session (FastAPI resolves ``get_session`` once
per request). A session acquires its connection on its first statement, so a request
that needs no statement (a cached token, a 403) never touches the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.events.bus import EventBus
from app.services.tokens import Principal, TokenCache
from app.storage.base import ImageStore


@dataclass(slots=True)
class AppContext:
    """What the lifespan built once and every request shares."""

    settings: Settings
    db: Database
    box: SecretBox
    store: ImageStore
    #: Live events (LISTEN/NOTIFY); started by the lifespan, None outside it.
    events: EventBus | None = None
    #: Tokens this process has read recently (``settings.auth_cache_seconds``).
    tokens: TokenCache = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = TokenCache(self.settings.auth_cache_seconds)


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Context = Annotated[AppContext, Depends(get_context)]


async def get_session(ctx: Context) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed when the handler returns, else rolled back.

    Used with ``scope="function"`` so the commit happens before the response is sent:
    a client never sees a 201 for a change whose commit then failed.
    """
    async with ctx.db.session() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session, scope="function")]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="vmigrate"'})


async def _principal(request: Request, ctx: AppContext, session: AsyncSession) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    principal = await ctx.tokens.authenticate(session, token.strip())
    if principal is None:
        raise _unauthorized("the bearer token is unknown or revoked")
    ctx.tokens.used(ctx.db, principal)
    return principal


def require(scope: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency that authenticates the bearer token and checks one scope."""

    async def dependency(request: Request, ctx: Context, session: Session) -> Principal:
        principal = await _principal(request, ctx, session)
        if not principal.allows(scope):
            raise HTTPException(403, f"the token lacks the {scope!r} scope")
        return principal

    return dependency


def require_any(*scopes: str) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """Like :func:`require`, satisfied by any one of ``scopes`` (the route then narrows
    what it shows to what the token's scopes allow)."""

    async def dependency(request: Request, ctx: Context, session: Session) -> Principal:
        principal = await _principal(request, ctx, session)
        if not any(principal.allows(s) for s in scopes):
            raise HTTPException(403, f"the token needs one of the scopes {', '.join(scopes)}")
        return principal

    return dependency
