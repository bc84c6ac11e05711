"""The read and create paths of /v1/migrations: how many statements and sessions a
request takes (counted with SQLAlchemy event hooks), PostgreSQL's rendering of a view
agreeing with the API models for every shape, the batch endpoint, and the list query
walking its index at 100,000 rows (EXPLAIN)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text, update

from app.api.deps import AppContext
from app.config import Settings
from app.db import Database
from app.main import create_app
from app.models.db import Migration, MigrationStep
from app.models.enums import CloudKind
from app.models.schemas.migrations import dump_view
from app.repositories import migrations as repo
from app.services import migrations as service
from tests.api.migrations_support import (
    add_cloud,
    assert_no_secrets,
    assert_problem,
    hypervisor,
    image_extract,
    live_stream,
)
from tests.conftest import TokenFactory, auth

URL = "/v1/migrations"


class Counter:
    def __init__(self) -> None:
        self.statements: list[str] = []
        self.checkouts = 0


@contextmanager
def counting(db: Database) -> Iterator[Counter]:
    """Every statement sent and every pooled connection handed out meanwhile."""
    counter = Counter()
    engine = db.engine.sync_engine

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counter.statements.append(statement.split(None, 1)[0].upper())

    def on_checkout(*args: Any) -> None:
        counter.checkouts += 1

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine.pool, "checkout", on_checkout)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine.pool, "checkout", on_checkout)


@pytest.fixture
async def app_ctx(settings: Settings, db: Database) -> AsyncIterator[
        tuple[httpx.AsyncClient, AppContext]]:
    app = create_app(settings, db=db)
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://t") as client):
        yield client, app.state.ctx


async def _warm(client: httpx.AsyncClient, ctx: AppContext, headers: dict[str, str]) -> None:
    """One request so the token is cached and its last use recorded (once a minute)."""
    assert (await client.get(URL, headers=headers)).status_code == 200
    await ctx.tokens.drain()


async def test_statements_and_sessions_per_request(
    app_ctx: tuple[httpx.AsyncClient, AppContext], db: Database, make_token: TokenFactory
) -> None:
    client, ctx = app_ctx
    headers = auth(await make_token("acme", "migrations:write"))
    cloud = await add_cloud(db, CloudKind.vmware)
    # Cold token: read once, in the request's own session (one checkout).
    with counting(db) as cold:
        assert (await client.get(URL, headers=headers)).status_code == 200
        await ctx.tokens.drain()
    # The request's session (the token, the page), and the first last-use write in a
    # task and transaction of its own.
    assert cold.checkouts == 2
    assert sorted(cold.statements) == ["SELECT", "SELECT", "UPDATE"]
    await _warm(client, ctx, headers)

    with counting(db) as create:
        r = await client.post(URL, json=hypervisor(cloud), headers=headers)
    assert r.status_code == 201, r.text
    # The cloud, then the migration, its steps and its created event.
    assert create.statements == ["SELECT", "INSERT", "INSERT", "INSERT"]
    assert create.checkouts == 1
    migration_id = r.json()["id"]

    with counting(db) as get:
        assert (await client.get(f"{URL}/{migration_id}", headers=headers)).status_code == 200
    assert get.statements == ["SELECT"]
    assert get.checkouts == 1

    for _ in range(3):
        assert (await client.post(URL, json=hypervisor(cloud), headers=headers)
                ).status_code == 201
    with counting(db) as page:
        r = await client.get(URL, params={"limit": 2}, headers=headers)
        assert r.status_code == 200
        r = await client.get(URL, params={"limit": 2, "cursor": r.json()["next_cursor"]},
                             headers=headers)
    assert len(r.json()["items"]) == 2
    assert page.statements == ["SELECT", "SELECT"]  # one per page, steps included
    assert page.checkouts == 2

    with counting(db) as batch:
        r = await client.post(f"{URL}/batch", headers=headers,
                              json={"items": [hypervisor(cloud) for _ in range(50)]})
    assert r.status_code == 201, r.text
    assert len(r.json()["items"]) == 50
    # The cloud; the migrations, their steps, their events; their views.
    assert batch.statements == ["SELECT", "INSERT", "INSERT", "INSERT", "SELECT"]
    assert batch.checkouts == 1

    reader = auth(await make_token("acme", "migrations:read"))
    with counting(db) as refused:  # a 403 needs no statement once the token is known
        for _ in range(2):
            r = await client.delete(f"{URL}/{migration_id}", headers=reader)
            assert r.status_code == 403
        await ctx.tokens.drain()
    # The new token's lookup once (and its first last-use write), nothing per request.
    assert sorted(refused.statements) == ["SELECT", "UPDATE"]


def _normal(value: Any) -> Any:
    """JSON with timestamps as datetimes (PostgreSQL and pydantic spell them apart)."""
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, str) and len(value) >= 20 and value[4:5] == "-" and "T" in value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return value


async def test_rendered_views_are_the_models_views_for_every_shape(
    app_ctx: tuple[httpx.AsyncClient, AppContext], db: Database, make_token: TokenFactory
) -> None:
    client, _ = app_ctx
    headers = auth(await make_token("acme", "migrations:write"))
    vc = await add_cloud(db, CloudKind.vmware)
    linux = await add_cloud(db, CloudKind.linux)
    bodies = [
        hypervisor(vc), hypervisor(vc, run=True, format="vmdk",
                                   options={"throttle_bytes_per_second": 10**6}),
        hypervisor(vc, mode="new", destination=vc),
        image_extract(linux) if False else image_extract(vc),
        live_stream(linux), live_stream(linux, new_in=vc),
    ]
    ids = []
    for body in bodies:
        r = await client.post(URL, json=body, headers=headers)
        if r.status_code == 201:
            ids.append(uuid.UUID(r.json()["id"]))
    assert len(ids) >= 4, "most shapes must be creatable here"
    # State the API shows: progress with an eta, an error, a started step with a result.
    async with db.session() as session:
        await session.execute(update(Migration).where(Migration.id == ids[0]).values(
            bytes_total=1000, bytes_done=250, rate=7, phase="transfer",
            error={"type": "https://vmigrate.dev/problems/x", "title": "X", "detail": "d",
                   "step": "transfer", "retryable": True}))
        await session.execute(update(MigrationStep).where(
            MigrationStep.migration_id == ids[0], MigrationStep.position == 0).values(
            status="completed", result={"server": "vm-1"}, error=None,
            started_at=text("now()"), finished_at=text("now()")))
    async with db.session() as session:
        for migration_id in ids:
            raw = json.loads(await service.get_json(session, "acme", migration_id))
            modelled = json.loads(dump_view(await service.get(session, "acme", migration_id)))
            assert _normal(raw) == _normal(modelled), migration_id
    # And over HTTP, the list and the get agree with each other, with no secrets.
    listed = await client.get(URL, params={"limit": 200}, headers=headers)
    assert_no_secrets(listed)
    by_id = {m["id"]: m for m in listed.json()["items"]}
    first = await client.get(f"{URL}/{ids[0]}", headers=headers)
    assert first.json() == by_id[str(ids[0])]
    assert first.json()["progress"]["eta_seconds"] == 108
    assert first.json()["steps"][0]["result"] == {"server": "vm-1"}


async def test_batch_is_all_or_nothing_with_item_pointers(
    app_ctx: tuple[httpx.AsyncClient, AppContext], db: Database, make_token: TokenFactory
) -> None:
    client, _ = app_ctx
    headers = auth(await make_token("acme", "migrations:write"))
    vc = await add_cloud(db, CloudKind.vmware)
    bad = hypervisor(str(uuid.uuid4()))
    r = await client.post(f"{URL}/batch", headers=headers,
                          json={"items": [hypervisor(vc), bad, hypervisor(vc)]})
    assert_problem(r, 422, "/items/1/source/cloud_id")
    assert (await client.get(URL, headers=headers)).json()["items"] == []
    r = await client.post(f"{URL}/batch", headers=headers,
                          json={"items": [hypervisor(vc, name=f"n{i}") for i in range(3)]
                                + [hypervisor(vc, name="queued", run=True)]})
    assert r.status_code == 201, r.text
    assert_no_secrets(r)
    items = r.json()["items"]
    assert [m["name"] for m in items] == ["n0", "n1", "n2", "queued"]
    assert [m["status"] for m in items] == ["pending"] * 3 + ["queued"]
    for m in items:
        got = await client.get(f"{URL}/{m['id']}", headers=headers)
        assert got.json() == m
        events = await client.get(f"{URL}/{m['id']}/events", headers=headers)
        assert [e["seq"] for e in events.json()["items"]] == (
            [1, 2] if m["status"] == "queued" else [1])
    too_many = {"items": [hypervisor(vc)] * (service.MAX_BATCH + 1)}
    r = await client.post(f"{URL}/batch", headers=headers, json=too_many)
    assert r.status_code in (413, 422)


async def test_the_list_walks_its_index_at_100k_rows(db: Database) -> None:
    async with db.session() as session:
        for tenant, count in (("big", 100_000), ("other", 20_000)):
            await session.execute(text(
                "INSERT INTO migrations (id, tenant, name, type, mode, status, spec, "
                "source_key, attempt, epoch, version, event_seq, bytes_total, bytes_done, "
                "rate, cancel_requested, created_at, updated_at) "
                "SELECT gen_random_uuid(), :tenant, 'm' || g, 'hypervisor', 'store', "
                "'pending', '{}'::jsonb, '', 0, 0, 1, 0, 0, 0, 0, false, "
                "now() - g * interval '1 second', now() "
                "FROM generate_series(1, :count) g"), {"tenant": tenant, "count": count})
    async with db.engine.connect() as conn:
        await conn.execute(text("ANALYZE migrations"))
        cursor_row = (await conn.execute(text(
            "SELECT created_at, id FROM migrations WHERE tenant = 'big' "
            "ORDER BY created_at DESC, id DESC OFFSET 50000 LIMIT 1"))).one()
    for before in (None, (cursor_row[0], cursor_row[1])):
        stmt = repo.rendered_page_query("big", statuses=[], types=[], before=before,
                                        limit=51)
        sql = str(stmt.compile(dialect=db.engine.dialect,
                               compile_kwargs={"literal_binds": True}))
        async with db.engine.connect() as conn:
            plan = (await conn.execute(text("EXPLAIN (FORMAT JSON) " + sql))).scalar_one()
        top = plan[0]["Plan"]
        assert top["Node Type"] == "Limit", top
        scan = top["Plans"][0]
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
        assert scan["Index Name"] == "ix_migrations_tenant_created"
        assert scan["Scan Direction"] == "Backward"
        if before is not None:  # the cursor is part of the index condition, no filter
            assert "created_at" in scan["Index Cond"]
    async with db.session() as session:
        page = await service.list_json(session, "big", statuses=[], types=[], limit=50,
                                       before=(cursor_row[0], cursor_row[1]))
    assert len(page.items) == 50
