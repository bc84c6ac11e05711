"""Authentication, scopes and tenant isolation, over every route the app has."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.db import Database
from app.main import create_app
from app.services.tokens import revoke_token
from tests.api.test_clouds import PASSWORD, cloud_body, create
from tests.conftest import TokenFactory, auth

PUBLIC = {"/healthz", "/readyz"}


@pytest.fixture
async def app(settings: Settings, db: Database) -> AsyncIterator[FastAPI]:
    application = create_app(settings, db=db)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def app_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


@functools.cache
def _paths() -> dict[str, dict[str, object]]:
    paths: dict[str, dict[str, object]] = create_app(Settings()).openapi()["paths"]
    return paths


def operations() -> list[tuple[str, str]]:
    """Every (method, concrete path) the API documents, path parameters filled with a UUID.

    Taken from the OpenAPI document (built once: it is slow): it is what clients see,
    and it lists routes of included routers however the framework stores them.
    """
    out = []
    for template, item in _paths().items():
        if template in PUBLIC:
            continue
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
        out += [(method.upper(), path) for method in item if method in _METHODS]
    return out


_METHODS = {"get", "post", "put", "patch", "delete"}


def test_the_api_has_protected_operations() -> None:
    assert ("POST", "/v1/clouds") in operations()


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "Bearer vmg_not-a-real-token",
     "Token vmg_x"],
)
async def test_every_operation_needs_a_valid_token(
    app_client: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, path in operations():
        r = await app_client.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert {"type", "title", "status", "detail"} <= r.json().keys()


async def test_probes_and_docs_need_no_token(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path


async def test_missing_scope_is_403(
    app_client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token("acme", "images:read")
    for method, path in operations():
        # /v1/events takes any read scope and shows the types that scope can read.
        if path.startswith(("/v1/images", "/v1/events")):
            continue
        r = await app_client.request(method, path, headers=auth(token))
        assert r.status_code == 403, (method, path, r.text)
        assert r.headers["content-type"] == "application/problem+json"


async def test_read_scope_reads_but_does_not_write(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    writer, reader = await make_token("acme"), await make_token("acme", "clouds:read")
    cloud = await create(client, writer)
    url = f"/v1/clouds/{cloud['id']}"
    assert (await client.get("/v1/clouds", headers=auth(reader))).status_code == 200
    assert (await client.get(url, headers=auth(reader))).status_code == 200
    assert (await client.post("/v1/clouds", json=cloud_body(),
                              headers=auth(reader))).status_code == 403
    assert (await client.patch(url, json={"name": "x"}, headers=auth(reader))).status_code == 403
    assert (await client.delete(url, headers=auth(reader))).status_code == 403


async def test_revoked_token_is_401(
    settings: Settings, db: Database, make_token: TokenFactory
) -> None:
    """With the cache off (``auth_cache_seconds=0``) a revocation applies at the next
    request; with it on, within that many seconds (tests/api/test_auth_cache.py)."""
    app = create_app(settings.model_copy(update={"auth_cache_seconds": 0.0}), db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            token = await make_token()
            assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
            async with db.session() as session:
                assert await revoke_token(session, token[:12]) == 1
            r = await client.get("/v1/clouds", headers=auth(token))
    assert r.status_code == 401
    assert "revoked" in r.json()["detail"]


async def test_tenants_never_see_each_others_clouds(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    acme, globex = await make_token("acme"), await make_token("globex")
    cloud = await create(client, acme, name="acme-prod")
    url = f"/v1/clouds/{cloud['id']}"
    unknown = f"/v1/clouds/{uuid.uuid4()}"
    requests = [("GET", None), ("PATCH", {"name": "stolen"}), ("DELETE", None),
                ("PATCH", {"credentials": {"username": "u", "password": PASSWORD}})]
    for method, body in requests:
        theirs = await client.request(method, url, json=body, headers=auth(globex))
        nothing = await client.request(method, unknown, json=body, headers=auth(globex))
        assert theirs.status_code == nothing.status_code == 404, method
        # Indistinguishable from an id that does not exist, apart from the id itself.
        assert theirs.json()["title"] == nothing.json()["title"]
        assert theirs.headers["content-type"] == "application/problem+json"
    assert (await client.get("/v1/clouds", headers=auth(globex))).json()["items"] == []
    # And nothing changed for the owner.
    r = await client.get(url, headers=auth(acme))
    assert r.json() == cloud
