"""The per-process token cache: how long a revoked token keeps working (the documented
bound, ``auth_cache_seconds``), and ``last_used_at`` written at most once a minute per
token, off the request path. Time is a fake clock: nothing here depends on timing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from app.api.deps import AppContext
from app.config import Settings
from app.db import Database
from app.main import create_app
from app.models.db import ApiToken
from app.services.tokens import TokenCache, hash_token, revoke_token
from tests.conftest import TokenFactory, auth


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def app(settings: Settings, db: Database, clock: FakeClock) -> AsyncIterator[FastAPI]:
    application = create_app(settings, db=db)
    async with application.router.lifespan_context(application):
        ctx: AppContext = application.state.ctx
        ctx.tokens = TokenCache(settings.auth_cache_seconds, clock=clock)
        yield application
        await ctx.tokens.drain()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        yield c


def test_the_documented_bound_is_the_setting() -> None:
    assert Settings().auth_cache_seconds == 10.0
    assert "within this many seconds" in (Settings.model_fields["auth_cache_seconds"]
                                          .description or "")


async def test_a_revoked_token_is_refused_once_the_bound_has_passed(
    app: FastAPI, client: httpx.AsyncClient, db: Database, make_token: TokenFactory,
    clock: FakeClock, settings: Settings,
) -> None:
    bound = settings.auth_cache_seconds
    token = await make_token()
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    async with db.session() as session:
        assert await revoke_token(session, token[:12]) == 1
    # Inside the bound this process may still honour it (it read it a moment ago) ...
    clock.now += bound - 0.5
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    # ... and at the bound it is read again and refused, and stays refused.
    clock.now += 0.5
    for _ in range(3):
        r = await client.get("/v1/clouds", headers=auth(token))
        assert r.status_code == 401
        assert "revoked" in r.json()["detail"]


async def test_a_known_token_is_read_once_per_bound(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory, clock: FakeClock,
) -> None:
    cache: TokenCache = app.state.ctx.tokens
    token = await make_token()
    for _ in range(5):
        assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    assert cache.lookups == 1
    clock.now += cache.ttl
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    assert cache.lookups == 2


async def test_unknown_tokens_are_not_remembered(
    app: FastAPI, client: httpx.AsyncClient, make_token: TokenFactory,
) -> None:
    """A refused token is read again each time, so a token created a moment later (or
    one that was mistyped) is not refused for the bound."""
    cache: TokenCache = app.state.ctx.tokens
    for _ in range(2):
        assert (await client.get("/v1/clouds", headers=auth("vmg_nope"))).status_code == 401
    assert cache.lookups == 2


async def _last_used(db: Database, token: str) -> object:
    async with db.session() as session:
        return (await session.execute(select(ApiToken.last_used_at).where(
            ApiToken.token_hash == hash_token(token)))).scalar_one()


async def test_last_used_at_is_written_at_most_once_a_minute(
    app: FastAPI, client: httpx.AsyncClient, db: Database, make_token: TokenFactory,
    clock: FakeClock,
) -> None:
    cache: TokenCache = app.state.ctx.tokens
    token = await make_token()
    assert await _last_used(db, token) is None
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    await cache.drain()
    first = await _last_used(db, token)
    assert first is not None
    clock.now += 59
    for _ in range(3):
        assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    await cache.drain()
    assert await _last_used(db, token) == first
    clock.now += 1
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    await cache.drain()
    later = await _last_used(db, token)
    assert later is not None
    assert later > first  # type: ignore[operator]
