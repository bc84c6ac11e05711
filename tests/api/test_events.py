"""GET /v1/events: the tenant's event log with type and time filters, id cursors, and
event types narrowed to what the token's scopes can read."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.db import Database
from app.repositories import events as events_repo
from app.repositories import migrations as migrations_repo
from tests.api.migrations_support import add_cloud, hypervisor
from tests.conftest import TokenFactory, auth


async def emit(db: Database, type_: str, tenant: str = "acme") -> None:
    async with db.session() as session:
        await events_repo.record(session, tenant, type_, {"what": type_})


async def listing(client: httpx.AsyncClient, token: str, query: str = "") -> dict[str, Any]:
    r = await client.get(f"/v1/events{query}", headers=auth(token))
    assert r.status_code == 200, r.text
    return dict(r.json())


def kinds(page: dict[str, Any]) -> list[str]:
    return [e["type"] for e in page["items"]]


async def test_the_log_is_tenant_wide_oldest_first_with_id_cursors(
    client: httpx.AsyncClient, db: Database, make_token: TokenFactory
) -> None:
    token = await make_token()
    r = await client.post("/v1/migrations", headers=auth(token),
                          json=hypervisor(await add_cloud(db, "vmware"), run=True))
    migration = r.json()
    await emit(db, "image.created")
    await emit(db, "image.created", tenant="umbrella")
    page = await listing(client, token, "?limit=2")
    assert kinds(page) == ["migration.created", "migration.queued"]
    assert [e["migration_id"] for e in page["items"]] == [migration["id"]] * 2
    assert page["next_after"] == page["items"][1]["id"]
    rest = await listing(client, token, f"?limit=2&after={page['next_after']}")
    assert kinds(rest) == ["image.created"]
    assert rest["next_after"] is None
    assert rest["items"][0]["migration_id"] is None
    assert rest["items"][0]["seq"] == 0
    ids = [e["id"] for e in page["items"] + rest["items"]]
    assert ids == sorted(ids)
    # The migration's own log has the same events, with the same ids.
    own = (await client.get(f"/v1/migrations/{migration['id']}/events",
                            headers=auth(token))).json()["items"]
    assert own == page["items"]


async def test_type_filters_exact_and_prefix(
    client: httpx.AsyncClient, db: Database, make_token: TokenFactory
) -> None:
    token = await make_token()
    for t in ("migration.created", "migration.step.completed", "image.created",
              "webhook.disabled"):
        await emit(db, t)
    assert kinds(await listing(client, token, "?type=image.created")) == ["image.created"]
    assert kinds(await listing(client, token, "?type=migration.")) == [
        "migration.created", "migration.step.completed"]
    assert kinds(await listing(client, token, "?type=migration.step.*&type=webhook.disabled")
                 ) == ["migration.step.completed", "webhook.disabled"]
    assert kinds(await listing(client, token, "?type=migration_")) == []  # no LIKE wildcards
    bad = await client.get("/v1/events?type=Bad%20Type", headers=auth(token))
    assert bad.status_code == 422


async def test_time_range(client: httpx.AsyncClient, db: Database,
                          make_token: TokenFactory) -> None:
    token = await make_token()
    await emit(db, "image.created")
    await asyncio.sleep(0.05)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await emit(db, "image.deleted")
    stamp = middle.isoformat().replace("+00:00", "Z")
    assert kinds(await listing(client, token, f"?since={stamp}")) == ["image.deleted"]
    assert kinds(await listing(client, token, f"?until={stamp}")) == ["image.created"]
    naive = middle.replace(tzinfo=None).isoformat()  # no offset: UTC
    assert kinds(await listing(client, token, f"?since={naive}")) == ["image.deleted"]
    later = (middle + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    r = await client.get(f"/v1/events?since={later}&until={stamp}", headers=auth(token))
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "/since"


async def test_scopes_narrow_the_types_a_token_sees(
    client: httpx.AsyncClient, db: Database, make_token: TokenFactory
) -> None:
    for t in ("migration.created", "image.created", "webhook.disabled"):
        await emit(db, t)
    r = await client.post("/v1/migrations", headers=auth(await make_token()),
                          json=hypervisor(await add_cloud(db, "vmware")))
    async with db.session() as session:  # an engine's own event type, inside a migration
        await migrations_repo.insert_event(session, "acme", uuid.UUID(r.json()["id"]), 2,
                                           "live_stream.snapshot.created", {})
    images = await make_token("acme", "images:read")
    assert kinds(await listing(client, images)) == ["image.created"]
    ops = await make_token("acme", "migrations:write", "webhooks:read")
    assert kinds(await listing(client, ops)) == [
        "migration.created", "webhook.disabled", "migration.created",
        "live_stream.snapshot.created"]
    clouds = await make_token("acme", "clouds:read")
    assert kinds(await listing(client, clouds)) == []
    r = await client.get("/v1/events")
    assert r.status_code == 401
