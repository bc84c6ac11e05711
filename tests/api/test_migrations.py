"""/v1/migrations: create, read, list, run, cancel, delete, events; tenants and scopes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.drivers.capabilities import matrix_from
from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.registry import ENGINES, SPECS, EngineSupport
from app.models.db import Migration, MigrationEvent
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import StrictModel
from app.models.schemas.clouds import KindSchema
from app.models.schemas.migrations import ImageExtractCreate
from app.services import migrations as migrations_service
from tests.api.migrations_support import (
    DEST_PASSWORD,
    PASSWORD,
    PRIVATE_KEY,
    add_cloud,
    assert_no_secrets,
    assert_problem,
    hypervisor,
    image_extract,
    live_stream,
)
from tests.conftest import TokenFactory, auth

URL = "/v1/migrations"


@pytest.fixture
async def headers(make_token: TokenFactory) -> dict[str, str]:
    return auth(await make_token("acme", "migrations:write"))


async def create(client: httpx.AsyncClient, headers: dict[str, str],
                 body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(URL, json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert_no_secrets(r)
    out: dict[str, Any] = r.json()
    return out


async def test_create_hypervisor_store(client: httpx.AsyncClient, db: Database,
                                       headers: dict[str, str]) -> None:
    vc = await add_cloud(db, CloudKind.vmware)
    r = await client.post(URL, json=hypervisor(vc), headers=headers)
    assert r.status_code == 201, r.text
    m = r.json()
    assert r.headers["location"] == f"/v1/migrations/{m['id']}"
    assert (m["type"], m["mode"], m["status"], m["attempt"], m["format"]) == (
        "hypervisor", "store", "pending", 0, "qcow2")
    assert m["source"]["password_set"] is True
    assert "password" not in m["source"]
    assert m["source"]["server"] == {"id": None, "name": "web-01"}
    assert [s["name"] for s in m["steps"]] == [
        "validate", "power_off", "snapshot", "transfer", "check_image", "store",
        "discard_staged", "remove_snapshot", "restore_power"]
    assert [s["cleanup"] for s in m["steps"]][-3:] == [True, True, True]
    assert all(s["status"] == "pending" for s in m["steps"])
    assert m["progress"] == {"bytes_done": 0, "bytes_total": 0, "rate": 0, "eta_seconds": None}
    assert m["error"] is None
    assert m["finished_at"] is None
    assert_no_secrets(r)


async def test_create_hypervisor_new_with_run_is_queued(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    src, dst = await add_cloud(db, CloudKind.esxi), await add_cloud(db, CloudKind.vmware)
    body = hypervisor(src, mode="new", destination=dst, run=True,
                      options={"power_off": False, "verify": True})
    m = await create(client, headers, body)
    assert (m["status"], m["attempt"], m["mode"], m["format"]) == ("queued", 1, "new", None)
    assert m["destination"]["cloud_id"] == dst
    assert m["destination"]["datastore"] == "ds1"
    assert "power_off" not in [s["name"] for s in m["steps"]]
    assert "verify" in [s["name"] for s in m["steps"]]
    r = await client.get(f"{URL}/{m['id']}/events", headers=headers)
    assert [e["type"] for e in r.json()["items"]] == ["migration.created", "migration.queued"]


async def test_create_image_extract_into_softlayer(
    db: Database, settings: Settings
) -> None:
    """No engine runs image extracts yet, so the API refuses them (see
    test_migrations_capabilities); what a created one looks like is checked through the
    service with a matrix in which an engine and SoftLayer/Hyper-V stand-in specs exist."""
    src, sl = await add_cloud(db, CloudKind.hyperv), await add_cloud(db, CloudKind.softlayer)
    stand_ins = [
        DriverSpec(platform=f"{kind} (test)",
                   kinds=(KindSchema(kind, kind.value, StrictModel, StrictModel),),
                   roles=frozenset({role}))
        for kind, role in ((CloudKind.hyperv, Role.image_extract_source),
                           (CloudKind.softlayer, Role.image_extract_destination))
    ]
    engines = {**ENGINES, Role.image_extract_source: EngineSupport.declared,
               Role.image_extract_destination: EngineSupport.declared}
    matrix = matrix_from([*SPECS, *stand_ins], engines)
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    body = ImageExtractCreate.model_validate(image_extract(src, cloud=sl))
    async with db.session() as session:
        view = await migrations_service.create(session, box, "acme", body, matrix)
    m = view.model_dump(mode="json")
    assert (m["type"], m["mode"], m["platform"]) == ("image_extract", None, "windows")
    assert m["source"]["port"] == 5986
    assert m["source"]["existing"] is True
    assert m["destination"] == {"kind": "cloud", "cloud_id": sl, "image_name": None}
    assert [s["name"] for s in m["steps"]] == [
        "validate", "snapshot", "transfer", "import", "remove_staging"]


async def test_create_live_stream_to_existing_host(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], settings: Settings
) -> None:
    src = await add_cloud(db, CloudKind.linux)
    m = await create(client, headers, live_stream(src))
    assert m["source"]["password_set"]
    assert m["source"]["private_key_set"]
    assert m["destination"]["password_set"]
    assert not m["destination"]["private_key_set"]
    assert m["destination"]["device"] == "/dev/mapper/vg1-root"
    assert m["options"]["throttle_bytes_per_second"] == 50_000_000
    assert [s["name"] for s in m["steps"]] == [
        "validate", "snapshot", "transfer", "verify", "remove_snapshot"]
    # at rest: spec is secret-free, the secrets are sealed and open with the app's key
    async with db.session() as session:
        row = (await session.execute(select(Migration))).scalar_one()
        spec_text = str(row.spec)
        events = (await session.execute(select(MigrationEvent))).scalars().all()
    for secret in (PASSWORD, DEST_PASSWORD, PRIVATE_KEY):
        assert secret not in spec_text
        assert all(secret not in str(e.payload) for e in events)
        assert row.secrets is not None
        assert secret.encode() not in row.secrets
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    assert box.open(row.secrets) == {"source.password": PASSWORD,
                                     "source.private_key": PRIVATE_KEY,
                                     "destination.password": DEST_PASSWORD}


async def test_secrets_never_in_any_response(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    src = await add_cloud(db, CloudKind.linux)
    m = await create(client, headers, live_stream(src, run=True))
    mid = m["id"]
    for r in [
        await client.get(f"{URL}/{mid}", headers=headers),
        await client.get(URL, headers=headers),
        await client.get(f"{URL}/{mid}/events", headers=headers),
        await client.post(f"{URL}/{mid}/cancel", headers=headers),
        await client.post(f"{URL}/{mid}/run", headers=headers),
        await client.post(f"{URL}/{mid}/run", headers=headers),  # 409
        await client.post(URL, json={**live_stream(src), "bogus": PASSWORD}, headers=headers),
    ]:
        assert r.status_code < 500
        assert_no_secrets(r)


async def test_get_and_list_with_filters_and_cursor(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    vc, lx = await add_cloud(db, CloudKind.vmware), await add_cloud(db, CloudKind.linux)
    ids = []
    for i in range(5):
        body = hypervisor(vc, name=f"h{i}", run=i % 2 == 0)
        ids.append((await create(client, headers, body))["id"])
    ids.append((await create(client, headers, live_stream(lx)))["id"])
    r = await client.get(f"{URL}/{ids[0]}", headers=headers)
    assert r.status_code == 200
    assert r.json()["name"] == "h0"

    seen, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get(URL, params=params, headers=headers)).json()
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once

    r = await client.get(URL, params={"status": "queued"}, headers=headers)
    assert {m["name"] for m in r.json()["items"]} == {"h0", "h2", "h4"}
    r = await client.get(URL, params=[("status", "queued"), ("status", "pending")],
                         headers=headers)
    assert len(r.json()["items"]) == 6
    r = await client.get(URL, params={"type": "live_stream"}, headers=headers)
    assert [m["type"] for m in r.json()["items"]] == ["live_stream"]
    r = await client.get(URL, params={"type": "image_extract"}, headers=headers)
    assert r.json() == {"items": [], "next_cursor": None}


async def test_run_cancel_delete_lifecycle(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.esxi)))
    url = f"{URL}/{m['id']}"
    r = await client.post(f"{url}/run", headers=headers)
    assert (r.status_code, r.json()["status"], r.json()["attempt"]) == (200, "queued", 1)
    body = assert_problem(await client.post(f"{url}/run", headers=headers), 409)
    assert "queued" in body["detail"]
    assert "pending, failed, cancelled" in body["detail"]
    assert_problem(await client.delete(url, headers=headers), 409)
    r = await client.post(f"{url}/cancel", headers=headers)
    assert (r.json()["status"], r.json()["cancel_requested"]) == ("cancelled", True)
    assert r.json()["finished_at"] is not None
    assert_problem(await client.post(f"{url}/cancel", headers=headers), 409)
    r = await client.post(f"{url}/run", headers=headers)
    assert (r.json()["status"], r.json()["attempt"], r.json()["finished_at"]) == (
        "queued", 2, None)
    await client.post(f"{url}/cancel", headers=headers)
    r = await client.delete(url, headers=headers)
    assert r.status_code == 204
    assert r.content == b""
    assert_problem(await client.get(url, headers=headers), 404)
    assert_problem(await client.get(f"{url}/events", headers=headers), 404)
    assert_problem(await client.delete(url, headers=headers), 404)
    async with db.session() as session:
        left = (await session.execute(select(MigrationEvent))).scalars().all()
    assert [(e.type, e.migration_id, e.seq, e.payload) for e in left] == [
        ("migration.deleted", None, 0, {"migration_id": m["id"]})]


@pytest.mark.parametrize("status", ["running", "cancelling", "completed"])
async def test_actions_in_worker_owned_states(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], status: str
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE migrations SET status = :s WHERE id = :id"),
                           {"s": status, "id": uuid.UUID(m["id"])})
    url = f"{URL}/{m['id']}"
    assert_problem(await client.post(f"{url}/run", headers=headers), 409)
    cancel = await client.post(f"{url}/cancel", headers=headers)
    if status == "running":
        assert (cancel.status_code, cancel.json()["status"]) == (200, "cancelling")
    else:
        assert_problem(cancel, 409)
    delete = await client.delete(url, headers=headers)
    assert delete.status_code == (204 if status == "completed" else 409)


async def test_events_paginate_by_seq(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    url = f"{URL}/{m['id']}"
    for _ in range(3):
        await client.post(f"{url}/run", headers=headers)
        await client.post(f"{url}/cancel", headers=headers)
    r = await client.get(f"{url}/events", params={"limit": 4}, headers=headers)
    page = r.json()
    assert [e["seq"] for e in page["items"]] == [1, 2, 3, 4]
    assert page["next_after"] == 4
    r = await client.get(f"{url}/events", params={"after": 4, "limit": 4}, headers=headers)
    page = r.json()
    assert [e["seq"] for e in page["items"]] == [5, 6, 7]
    assert page["next_after"] is None
    assert [e["type"] for e in page["items"]] == [
        "migration.cancelled", "migration.queued", "migration.cancelled"]
    assert page["items"][1]["payload"] == {"action": "run", "from": "cancelled",
                                           "to": "queued", "attempt": 3}


async def test_another_tenants_migration_is_not_found(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], make_token: TokenFactory
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    other = auth(await make_token("globex", "migrations:write"))
    url = f"{URL}/{m['id']}"
    for r in [
        await client.get(url, headers=other),
        await client.get(f"{url}/events", headers=other),
        await client.post(f"{url}/run", headers=other),
        await client.post(f"{url}/cancel", headers=other),
        await client.delete(url, headers=other),
    ]:
        assert_problem(r, 404)
    assert (await client.get(URL, headers=other)).json()["items"] == []
    r = await client.get(url, headers=headers)
    assert (r.json()["status"], r.json()["version"]) == ("pending", 1)  # untouched


async def test_unknown_id_is_not_found(client: httpx.AsyncClient,
                                       headers: dict[str, str]) -> None:
    url = f"{URL}/{uuid.uuid4()}"
    for r in [await client.get(url, headers=headers),
              await client.post(f"{url}/run", headers=headers),
              await client.post(f"{url}/cancel", headers=headers),
              await client.delete(url, headers=headers),
              await client.get(f"{url}/events", headers=headers)]:
        assert_problem(r, 404)


async def test_scopes(client: httpx.AsyncClient, db: Database, headers: dict[str, str],
                      make_token: TokenFactory) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    reader = auth(await make_token("acme", "migrations:read"))
    clouds_only = auth(await make_token("acme", "clouds:write"))
    url = f"{URL}/{m['id']}"
    assert (await client.get(url, headers=reader)).status_code == 200
    assert (await client.get(f"{url}/events", headers=reader)).status_code == 200
    assert (await client.get(URL, headers=reader)).status_code == 200
    for r in [await client.post(f"{url}/run", headers=reader),
              await client.post(f"{url}/cancel", headers=reader),
              await client.delete(url, headers=reader),
              await client.post(URL, json={}, headers=reader),
              await client.get(url, headers=clouds_only)]:
        assert_problem(r, 403)
    assert_problem(await client.get(url), 401)
    assert_problem(await client.post(URL, json={}), 401)


def test_openapi_names_and_types_every_operation() -> None:
    from app.main import create_app

    spec = create_app(Settings(encryption_keys=[])).openapi()
    ops = {op["operationId"]: (path, method, op) for path, item in spec["paths"].items()
           if path.startswith("/v1/migrations") for method, op in item.items()}
    assert set(ops) == {"create_migration", "create_migrations", "list_migrations",
                        "get_migration", "run_migration", "cancel_migration",
                        "delete_migration", "list_migration_events"}
    for _, _, op in ops.values():
        problems = [code for code, resp in op["responses"].items()
                    if "application/problem+json" in resp.get("content", {})]
        assert {"401", "403", "422"} <= set(problems), op["operationId"]
    create_body = ops["create_migration"][2]["requestBody"]["content"]["application/json"]
    assert create_body["schema"]["discriminator"]["propertyName"] == "type"
    schemas = spec["components"]["schemas"]
    assert "password" not in schemas["HypervisorSourceOut"]["properties"]
    assert schemas["HypervisorSource"]["properties"]["password"]["anyOf"][0]["writeOnly"]


async def test_concurrent_api_runs_one_wins(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    url = f"{URL}/{m['id']}/run"
    responses = await asyncio.gather(*(client.post(url, headers=headers) for _ in range(6)))
    assert sorted(r.status_code for r in responses) == [200, 409, 409, 409, 409, 409]
    r = await client.get(f"{URL}/{m['id']}/events", headers=headers)
    assert [e["type"] for e in r.json()["items"]] == ["migration.created", "migration.queued"]


async def test_progress_and_error_are_shown(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    m = await create(client, headers, hypervisor(await add_cloud(db, CloudKind.vmware)))
    async with db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE migrations SET status = 'failed', bytes_total = 1000, "
                 "bytes_done = 250, rate = 100, phase = 'transfer', error = :e WHERE id = :id"),
            {"id": uuid.UUID(m["id"]),
             "e": '{"type": "https://vmigrate.dev/problems/transient", "title": "Timeout", '
                  '"detail": "transfer timed out", "step": "transfer", "retryable": true}'})
    got = (await client.get(f"{URL}/{m['id']}", headers=headers)).json()
    assert got["progress"] == {"bytes_done": 250, "bytes_total": 1000, "rate": 100,
                               "eta_seconds": 8}
    assert got["phase"] == "transfer"
    assert got["error"]["detail"] == "transfer timed out"
    assert got["error"]["retryable"] is True
    r = await client.post(f"{URL}/{m['id']}/run", headers=headers)
    assert (r.json()["status"], r.json()["error"], r.json()["progress"]["rate"]) == (
        "queued", None, 0)
