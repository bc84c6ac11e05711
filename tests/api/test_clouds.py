"""/v1/clouds: registration per kind, write-only credentials, ETags, paging, removal."""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import select

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.drivers.linux import LinuxSettings
from app.drivers.registry import NoDriver, kind_schema, registered_kinds
from app.engines.clouds import open_cloud
from app.errors import NotFound
from app.main import create_app
from app.models.db import Cloud, Migration
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import SshCredentials
from app.repositories import clouds as clouds_repo
from tests.conftest import TokenFactory, auth

PASSWORD = "hunter2-Very-Secret-4711"
KEY_PEM = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA-secret-key-material\n-----END"

#: A valid create body for every registered kind; secret values all contain PASSWORD.
EXAMPLES: dict[str, dict[str, Any]] = {
    "vmware": {"settings": {"host": "vcenter.example.com", "datacenter": "DC1"},
               "credentials": {"username": "administrator@vsphere.local", "password": PASSWORD}},
    "esxi": {"settings": {"host": "10.0.0.5", "verify_tls": False},
             "credentials": {"username": "root", "password": PASSWORD}},
    "linux": {"settings": {"host": "db1.example.com", "port": 2222,
                           "host_key_fingerprint": "SHA256:" + "A" * 43},
              "credentials": {"username": "root", "private_key": KEY_PEM + PASSWORD}},
}


def cloud_body(kind: str = "vmware", name: str | None = None) -> dict[str, Any]:
    """A fresh (deep-copied) valid create body; the name is unique unless given."""
    body = copy.deepcopy(EXAMPLES[kind])
    return {"name": name or f"{kind}-{uuid.uuid4().hex[:6]}", "kind": kind, **body}


async def create(client: httpx.AsyncClient, token: str, **overrides: Any) -> dict[str, Any]:
    body = {**cloud_body(), **overrides}
    r = await client.post("/v1/clouds", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


#: Kinds of the product spec that no registered driver serves (yet).
UNREGISTERED = sorted(k.value for k in CloudKind if k not in registered_kinds())


def test_every_registered_kind_has_schemas_and_an_example() -> None:
    assert set(EXAMPLES) == {k.value for k in registered_kinds()} == {"vmware", "esxi", "linux"}
    for registered in registered_kinds():
        assert kind_schema(registered).kind is registered
    for kind in UNREGISTERED:
        with pytest.raises(NoDriver, match=f"no driver for {kind} clouds"):
            kind_schema(CloudKind(kind))


async def test_the_registered_kinds_are_listed_with_what_they_can_do(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    r = await client.get("/v1/clouds/kinds", headers=auth(token))
    assert r.status_code == 200, r.text
    kinds = {k["kind"]: k for k in r.json()}
    assert set(kinds) == {"vmware", "esxi", "linux"}
    vmware = kinds["vmware"]
    assert vmware["platform"] == "VMware vSphere"
    assert vmware["roles"] == ["hypervisor_source", "hypervisor_destination",
                               "live_stream_source"]
    assert vmware["import_formats"] == ["vmdk"]
    assert vmware["settings_schema"] == "VsphereSettings"
    assert set(vmware["placement"]) == {"datacenter", "cluster", "host", "resource_pool",
                                        "datastore", "folder", "network"}
    assert kinds["linux"]["roles"] == ["live_stream_source"]
    assert kinds["linux"]["placement"] == {}
    assert kinds["linux"]["credentials_schema"] == "SshCredentials"


@pytest.mark.parametrize("kind", UNREGISTERED)
async def test_kinds_without_a_driver_are_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, kind: str
) -> None:
    """A platform no driver serves is a 422 at /kind naming it, never a cloud that
    every migration would later fail on."""
    token = await make_token()
    body = {"name": f"{kind}-1", "kind": kind, "settings": {"host": "h.example.com"},
            "credentials": {"username": "u", "password": PASSWORD}}
    r = await client.post("/v1/clouds", json=body, headers=auth(token))
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert error["pointer"] == "/kind"
    assert repr(kind) in error["detail"]
    assert PASSWORD not in r.text
    assert (await client.get("/v1/clouds", headers=auth(token))).json()["items"] == []


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
async def test_create_each_kind(
    client: httpx.AsyncClient, make_token: TokenFactory, kind: str
) -> None:
    token = await make_token()
    r = await client.post("/v1/clouds", json=cloud_body(kind), headers=auth(token))
    assert r.status_code == 201, r.text
    cloud = r.json()
    assert cloud["kind"] == kind
    assert r.headers["location"] == f"/v1/clouds/{cloud['id']}"
    assert r.headers["etag"] == '"v1"'
    assert cloud["credentials_set"] == sorted(EXAMPLES[kind]["credentials"])
    assert PASSWORD not in r.text
    got = await client.get(r.headers["location"], headers=auth(token))
    assert got.status_code == 200
    assert got.json() == cloud


async def test_settings_get_defaults_and_credentials_are_optional(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    cloud = await create(client, token, credentials=None)
    assert cloud["settings"]["port"] == 443
    assert cloud["settings"]["verify_tls"] is True
    assert cloud["credentials_set"] == []


async def test_library_is_not_creatable(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    r = await client.post("/v1/clouds", json={**cloud_body(), "kind": "library"},
                          headers=auth(token))
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "/kind"


async def test_credentials_encrypted_at_rest(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    async with db.session() as session:
        row = (await session.execute(select(Cloud).where(Cloud.id == cloud["id"]))).scalar_one()
    assert row.credentials is not None
    assert PASSWORD.encode() not in row.credentials
    assert PASSWORD not in str(row.settings)
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    assert box.open(row.credentials)["password"] == PASSWORD


async def test_duplicate_name_is_409_per_tenant(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    acme, other = await make_token("acme"), await make_token("globex")
    await create(client, acme, name="prod")
    r = await client.post("/v1/clouds", json=cloud_body(name="prod"), headers=auth(acme))
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["errors"] == [{"pointer": "/name", "detail": "already taken"}]
    await create(client, other, name="prod")  # another tenant may use the name


async def test_concurrent_creates_of_one_name_give_one_cloud(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    body = cloud_body(name="race")
    results = await asyncio.gather(
        *[client.post("/v1/clouds", json=body, headers=auth(token)) for _ in range(5)]
    )
    assert sorted(r.status_code for r in results) == [201, 409, 409, 409, 409]


async def test_list_newest_first_with_cursor_and_kind_filter(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    ids = [(await create(client, token, **cloud_body(kind)))["id"]
           for kind in ["vmware", "esxi", "vmware", "linux", "vmware"]]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/clouds", params=params, headers=auth(token))
        assert r.status_code == 200
        page = r.json()
        seen += [c["id"] for c in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    r = await client.get("/v1/clouds", params={"kind": "vmware"}, headers=auth(token))
    assert [c["id"] for c in r.json()["items"]] == [ids[4], ids[2], ids[0]]
    r = await client.get("/v1/clouds", params={"kind": "library"}, headers=auth(token))
    assert r.status_code == 422


async def test_patch_with_etag(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = await make_token()
    cloud = await create(client, token)
    url = f"/v1/clouds/{cloud['id']}"
    r = await client.patch(url, json={"name": "renamed"},
                           headers={**auth(token), "If-Match": '"v1"'})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"v2"'
    assert r.json()["name"] == "renamed"
    assert r.json()["version"] == 2
    # A stale ETag loses: 412, and nothing changes.
    r = await client.patch(url, json={"name": "again"},
                           headers={**auth(token), "If-Match": '"v1"'})
    assert r.status_code == 412
    assert r.headers["content-type"] == "application/problem+json"
    for tag in ['W/"v2"', "v2", '"v2x"']:  # weak or malformed tags never match
        r = await client.patch(url, json={"name": "again"},
                               headers={**auth(token), "If-Match": tag})
        assert r.status_code == 412, tag
    r = await client.patch(url, json={"name": "again"},
                           headers={**auth(token), "If-Match": '"v9", "v2"'})
    assert r.status_code == 200
    r = await client.patch(url, json={"name": "unconditional"}, headers=auth(token))
    assert r.status_code == 200
    assert r.json()["version"] == 4
    r = await client.get(url, headers=auth(token))
    assert r.headers["etag"] == '"v4"'


async def test_patch_settings_and_credentials(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    url = f"/v1/clouds/{cloud['id']}"
    r = await client.patch(url, json={"settings": {"host": "vc2.example.com", "port": 8443}},
                           headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["port"] == 8443
    assert r.json()["settings"]["datacenter"] is None  # replaced as a whole
    assert r.json()["credentials_set"] == ["password", "username"]  # untouched
    r = await client.patch(url, json={"credentials": {"username": "u", "password": "new-pw"}},
                           headers=auth(token))
    assert r.status_code == 200
    assert "new-pw" not in r.text
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    async with db.session() as session:
        row = (await session.execute(select(Cloud).where(Cloud.id == cloud["id"]))).scalar_one()
        assert box.open(row.credentials) == {"username": "u", "password": "new-pw"}
    r = await client.patch(url, json={"credentials": None}, headers=auth(token))
    assert r.json()["credentials_set"] == []
    # Settings are checked against the cloud's kind, errors point into the body.
    r = await client.patch(url, json={"settings": {"host": "h", "port": 0, "region": "x"}},
                           headers=auth(token))
    assert r.status_code == 422
    pointers = {e["pointer"] for e in r.json()["errors"]}
    assert pointers == {"/settings/port", "/settings/region"}
    r = await client.patch(url, json={"credentials": {"username": "u", "password": 5}},
                           headers=auth(token))
    assert r.status_code == 422
    assert r.json()["errors"][0]["pointer"] == "/credentials/password"
    for body in ({"kind": "xen"}, {"name": None}, {"settings": None}):
        r = await client.patch(url, json=body, headers=auth(token))
        assert r.status_code == 422, body


async def test_empty_patch_changes_nothing(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    r = await client.patch(f"/v1/clouds/{cloud['id']}", json={}, headers=auth(token))
    assert r.status_code == 200
    assert r.json() == cloud


async def test_rename_to_taken_name_is_409(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    await create(client, token, name="a")
    b = await create(client, token, name="b")
    r = await client.patch(f"/v1/clouds/{b['id']}", json={"name": "a"}, headers=auth(token))
    assert r.status_code == 409
    r = await client.patch(f"/v1/clouds/{b['id']}", json={"name": "c"}, headers=auth(token))
    assert r.status_code == 200  # the request's transaction survived the conflict


async def _migration(db: Database, tenant: str, cloud_id: str, status: str) -> None:
    async with db.session() as session:
        session.add(Migration(
            tenant=tenant, type="hypervisor", mode="store", status=status,
            spec={"source": {"cloud_id": cloud_id, "server": "vm-1"}},
        ))


async def test_delete(client: httpx.AsyncClient, make_token: TokenFactory, db: Database) -> None:
    token = await make_token()
    cloud = await create(client, token)
    url = f"/v1/clouds/{cloud['id']}"
    await _migration(db, "acme", cloud["id"], "completed")
    await _migration(db, "acme", str(uuid.uuid4()), "running")
    r = await client.delete(url, headers={**auth(token), "If-Match": '"v7"'})
    assert r.status_code == 412
    r = await client.delete(url, headers=auth(token))
    assert r.status_code == 204
    assert r.content == b""
    assert (await client.get(url, headers=auth(token))).status_code == 404
    assert (await client.delete(url, headers=auth(token))).status_code == 404


@pytest.mark.parametrize("status", ["pending", "queued", "running", "cancelling"])
async def test_delete_refused_while_a_migration_uses_it(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, status: str
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    await _migration(db, "acme", cloud["id"], status)
    r = await client.delete(f"/v1/clouds/{cloud['id']}", headers=auth(token))
    assert r.status_code == 409
    assert r.json()["type"].endswith("/cloud-in-use")


async def test_secrets_never_logged(
    client: httpx.AsyncClient, make_token: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await make_token()
    responses = []
    for kind in EXAMPLES:
        cloud = await create(client, token, **cloud_body(kind))
        url = f"/v1/clouds/{cloud['id']}"
        creds = EXAMPLES[kind]["credentials"]
        responses += [
            await client.get(url, headers=auth(token)),
            await client.patch(url, json={"credentials": creds}, headers=auth(token)),
            # Invalid: too long, wrong type, unknown field next to a secret.
            await client.patch(url, json={"credentials": {**creds, "x": PASSWORD}},
                               headers=auth(token)),
            await client.post("/v1/clouds", json={**cloud_body(kind), "name": cloud["name"]},
                              headers=auth(token)),
        ]
    responses.append(await client.post(
        "/v1/clouds", headers=auth(token),
        json={**cloud_body(), "credentials": {"username": "u", "password": PASSWORD * 500}},
    ))
    responses.append(await client.get("/v1/clouds", headers=auth(token)))
    for r in responses:
        assert PASSWORD not in r.text
    assert PASSWORD not in caplog.text


async def test_undecryptable_credentials_are_a_clear_error(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    other = settings.model_copy(
        update={"encryption_keys": [SecretStr(Fernet.generate_key().decode())]}
    )
    app = create_app(other, db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get(f"/v1/clouds/{cloud['id']}", headers=auth(token))
    assert r.status_code == 500
    assert r.json()["type"].endswith("/secrets-unreadable")


async def test_delete_waits_for_a_migration_being_created_against_it(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database
) -> None:
    """A writer holding FOR SHARE on the cloud makes a concurrent delete wait, then 409."""
    token = await make_token()
    cloud = await create(client, token)
    async with db.session() as session:
        assert await clouds_repo.lock_cloud(session, "acme", uuid.UUID(cloud["id"]), share=True)
        session.add(Migration(tenant="acme", type="hypervisor", status="pending",
                              spec={"destination": {"cloud_id": cloud["id"]}}))
        await session.flush()
        deleting = asyncio.create_task(
            client.delete(f"/v1/clouds/{cloud['id']}", headers=auth(token))
        )
        await asyncio.sleep(0.3)
        assert not deleting.done()
    r = await deleting
    assert r.status_code == 409


async def test_open_cloud_gives_drivers_typed_secrets(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings
) -> None:
    token = await make_token()
    cloud = await create(client, token, **cloud_body("linux"))
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    async with db.session() as session:
        conn = await open_cloud(session, box, "acme", uuid.UUID(cloud["id"]))
        with pytest.raises(NotFound):
            await open_cloud(session, box, "globex", uuid.UUID(cloud["id"]))
    assert conn.kind is CloudKind.linux
    assert isinstance(conn.settings, LinuxSettings)
    assert conn.settings.port == 2222
    assert isinstance(conn.credentials, SshCredentials)
    assert conn.credentials.private_key is not None
    assert conn.credentials.private_key.get_secret_value() == KEY_PEM + PASSWORD
    assert PASSWORD not in repr(conn)


async def test_a_stored_cloud_of_a_kind_without_a_driver_is_a_clear_error(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings
) -> None:
    """A row written before its driver was removed (or by hand): readable, but neither
    changeable nor usable, with a 422 naming the kind."""
    token = await make_token()
    async with db.session() as session:
        row = await clouds_repo.insert_cloud(session, Cloud(
            tenant="acme", kind="openstack", name="legacy", settings={}, credentials=None))
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    async with db.session() as session:
        with pytest.raises(NoDriver, match="no driver for openstack clouds"):
            await open_cloud(session, box, "acme", row.id)
    url = f"/v1/clouds/{row.id}"
    assert (await client.get(url, headers=auth(token))).json()["kind"] == "openstack"
    r = await client.patch(url, json={"settings": {}}, headers=auth(token))
    assert r.status_code == 422
    assert "no driver for openstack clouds" in r.json()["detail"]
