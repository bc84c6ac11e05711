"""/v1/webhooks on a real database: CRUD, conditional updates, the target policy at
registration, secrets shown only on create and rotate, and tenant isolation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.config import Settings
from app.db import Database
from app.main import create_app
from tests.conftest import TokenFactory, auth
from tests.webhooks.support import asgi_client, webhook_settings

URL = "http://127.0.0.1:9/hook"


@pytest.fixture
async def api(settings: Settings, db: Database) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(create_app(webhook_settings(settings), db=db)) as c:
        yield c


async def create(api: httpx.AsyncClient, token: str, **body: Any) -> dict[str, Any]:
    r = await api.post("/v1/webhooks", headers=auth(token), json={"url": URL, **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_create_shows_the_secret_once(api: httpx.AsyncClient,
                                            make_token: TokenFactory) -> None:
    token = await make_token()
    r = await api.post("/v1/webhooks", headers=auth(token), json={
        "url": URL, "event_types": ["migration.*", "image.created", "migration.*"],
        "description": "ops"})
    assert r.status_code == 201
    hook = r.json()
    assert hook["secret"].startswith("whsec_")
    assert hook["event_types"] == ["image.created", "migration.*"]
    assert hook["active"] is True
    assert r.headers["location"] == f"/v1/webhooks/{hook['id']}"
    assert r.headers["etag"] == '"v1"'
    secret = hook["secret"]
    for path in (f"/v1/webhooks/{hook['id']}", "/v1/webhooks",
                 f"/v1/webhooks/{hook['id']}/deliveries"):
        got = await api.get(path, headers=auth(token))
        assert got.status_code == 200
        assert secret not in got.text
        assert "secret\"" not in got.text.replace("previous_secret", "")
    patched = await api.patch(f"/v1/webhooks/{hook['id']}", headers=auth(token),
                              json={"description": "changed"})
    assert secret not in patched.text
    assert "whsec_" not in patched.text


async def test_list_get_update_delete(api: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = await make_token()
    ids = [(await create(api, token, description=f"n{i}"))["id"] for i in range(3)]
    page = (await api.get("/v1/webhooks?limit=2", headers=auth(token))).json()
    assert [h["id"] for h in page["items"]] == ids[::-1][:2]
    rest = (await api.get(f"/v1/webhooks?limit=2&cursor={page['next_cursor']}",
                          headers=auth(token))).json()
    assert [h["id"] for h in rest["items"]] == [ids[0]]
    assert rest["next_cursor"] is None

    hook_id = ids[0]
    stale = await api.patch(f"/v1/webhooks/{hook_id}", headers={**auth(token), "If-Match": '"v7"'},
                            json={"active": False})
    assert stale.status_code == 412
    r = await api.patch(f"/v1/webhooks/{hook_id}", headers={**auth(token), "If-Match": '"v1"'},
                        json={"active": False, "event_types": []})
    assert r.status_code == 200, r.text
    assert r.json()["active"] is False
    assert r.json()["version"] == 2
    assert r.headers["etag"] == '"v2"'
    assert (await api.get(f"/v1/webhooks/{hook_id}", headers=auth(token))).json()["active"] is False
    gone = await api.delete(f"/v1/webhooks/{hook_id}", headers={**auth(token), "If-Match": '"v1"'})
    assert gone.status_code == 412
    assert (await api.delete(f"/v1/webhooks/{hook_id}", headers=auth(token))).status_code == 204
    assert (await api.get(f"/v1/webhooks/{hook_id}", headers=auth(token))).status_code == 404


async def test_rotate_returns_a_new_secret(api: httpx.AsyncClient,
                                           make_token: TokenFactory) -> None:
    token = await make_token()
    hook = await create(api, token)
    r = await api.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=auth(token))
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != hook["secret"]
    assert rotated["previous_secret_expires_at"] is not None
    got = (await api.get(f"/v1/webhooks/{hook['id']}", headers=auth(token))).json()
    assert got["previous_secret_expires_at"] == rotated["previous_secret_expires_at"]
    assert got["version"] == 2


@pytest.mark.parametrize(("url", "detail"), [
    ("https://10.0.0.1/hook", "non-public"),
    ("https://169.254.169.254/latest/meta-data", "non-public"),
    ("ftp://127.0.0.1/", "https"),
    ("http://93.184.216.34/hook", "https"),  # public, but plain http
    ("https://nowhere.invalid/", "does not resolve"),
    ("https://user:pw@127.0.0.1/", "credentials"),
])
async def test_refused_targets(api: httpx.AsyncClient, make_token: TokenFactory, url: str,
                               detail: str) -> None:
    token = await make_token()
    r = await api.post("/v1/webhooks", headers=auth(token), json={"url": url})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"][0]["pointer"] == "/url"
    assert detail in r.json()["detail"]


async def test_loopback_refused_without_the_allowlist(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    r = await client.post("/v1/webhooks", headers=auth(token),
                          json={"url": "https://localhost/hook"})
    assert r.status_code == 422
    assert "non-public" in r.json()["detail"]


async def test_url_change_is_checked_too(api: httpx.AsyncClient,
                                         make_token: TokenFactory) -> None:
    token = await make_token()
    hook = await create(api, token)
    r = await api.patch(f"/v1/webhooks/{hook['id']}", headers=auth(token),
                        json={"url": "https://192.168.0.1/"})
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "/url"


@pytest.mark.parametrize("body", [
    {"url": URL, "event_types": ["Migration.Created"]},
    {"url": URL, "event_types": ["migration.**"]},
    {"url": URL, "unknown": 1},
    {"url": URL, "description": "x" * 256},
    {},
])
async def test_invalid_bodies(api: httpx.AsyncClient, make_token: TokenFactory,
                              body: dict[str, Any]) -> None:
    r = await api.post("/v1/webhooks", headers=auth(await make_token()), json=body)
    assert r.status_code == 422


async def test_scopes(api: httpx.AsyncClient, make_token: TokenFactory) -> None:
    reader = await make_token("acme", "webhooks:read")
    assert (await api.get("/v1/webhooks", headers=auth(reader))).status_code == 200
    assert (await api.post("/v1/webhooks", headers=auth(reader),
                           json={"url": URL})).status_code == 403
    other = await make_token("acme", "migrations:read")
    assert (await api.get("/v1/webhooks", headers=auth(other))).status_code == 403


async def test_tenants_never_see_each_others_webhooks(
    api: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    acme, umbrella = await make_token("acme"), await make_token("umbrella")
    hook = await create(api, acme)
    hid = hook["id"]
    delivery = uuid.uuid4()
    for method, path, body in [
        ("GET", f"/v1/webhooks/{hid}", None),
        ("PATCH", f"/v1/webhooks/{hid}", {"active": False}),
        ("DELETE", f"/v1/webhooks/{hid}", None),
        ("POST", f"/v1/webhooks/{hid}/rotate-secret", None),
        ("GET", f"/v1/webhooks/{hid}/deliveries", None),
        ("POST", f"/v1/webhooks/{hid}/deliveries/{delivery}/redeliver", None),
    ]:
        r = await api.request(method, path, headers=auth(umbrella), json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert (await api.get("/v1/webhooks", headers=auth(umbrella))).json()["items"] == []
    still = (await api.get(f"/v1/webhooks/{hid}", headers=auth(acme))).json()
    assert still["active"] is True
    assert still["version"] == 1


async def test_idempotent_create_replays_the_secret_but_never_stores_it_in_clear(
    api: httpx.AsyncClient, make_token: TokenFactory, db: Database
) -> None:
    token = await make_token()
    headers = {**auth(token), "Idempotency-Key": "hook-1"}
    first = await api.post("/v1/webhooks", headers=headers, json={"url": URL})
    again = await api.post("/v1/webhooks", headers=headers, json={"url": URL})
    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    rotated = await api.post(f"/v1/webhooks/{first.json()['id']}/rotate-secret",
                             headers={**auth(token), "Idempotency-Key": "rotate-1"})
    async with db.session() as session:
        stored = " ".join(str(r) for r in (await session.execute(
            text("SELECT row_to_json(k)::text FROM idempotency_keys k"))).all())
    assert "hook-1" in stored
    for secret in (first.json()["secret"], rotated.json()["secret"]):
        assert secret.removeprefix("whsec_") not in stored
