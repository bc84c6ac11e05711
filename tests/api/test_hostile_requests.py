"""Requests an attacker (or a broken client) sends get a 4xx problem, never a 500, and
never cost more than their size: NUL and unpaired surrogates anywhere in JSON, cursors
and timestamps at the edges of the calendar, absurd Range headers, bodies of hundreds of
megabytes on every JSON route, repeated Idempotency-Keys on conversions; link-local
and metadata hosts as clouds; a lost database is a 503 with Retry-After."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import HttpUrl, TypeAdapter, ValidationError

from app.config import Settings
from app.db import Database
from app.main import create_app
from app.models.schemas.fields import NotMetadataUrl
from tests.api.test_bad_input import assert_problem
from tests.api.test_clouds import cloud_body
from tests.conftest import TokenFactory, auth
from tests.formats.oracle import make_sparse_raw, qemu_img

MiB = 1024 * 1024


async def _image(client: httpx.AsyncClient, token: str, tmp_path: Path) -> dict[str, Any]:
    raw = tmp_path / "disk.raw"
    make_sparse_raw(raw, 2 * MiB, [(0, 4096), (MiB, 5000)], seed=1)
    qcow = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    r = await client.post("/v1/images", params={"name": "disk"}, content=qcow.read_bytes(),
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    image: dict[str, Any] = r.json()
    return image


@pytest.mark.parametrize(("settings_change", "pointer"), [
    ({"datacenter": "dc\u0000one"}, "/settings/datacenter"),
    ({"datacenter": "dc\ud800"}, "/settings/datacenter"),
    ({"datacenter": "\u0000"}, "/settings/datacenter"),
])
async def test_unstorable_characters_are_422_at_validation(
    client: httpx.AsyncClient, make_token: TokenFactory, settings_change: dict[str, str],
    pointer: str,
) -> None:
    token = await make_token()
    body = cloud_body("vmware")
    body["settings"].update(settings_change)
    r = await client.post("/v1/clouds", content=json.dumps(body).encode(),
                          headers={**auth(token), "Content-Type": "application/json"})
    assert_problem(r, 422, {pointer})


async def test_unstorable_member_names_and_nested_values(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    for raw in ('{"url": "https://example.com/", "x\\u0000": 1}',
                '{"url": "https://example.com/", "description": ["\\udfff"]}'):
        r = await client.post("/v1/webhooks", content=raw.encode(),
                              headers={**auth(token), "Content-Type": "application/json"})
        assert r.status_code == 422, r.text
    # an escaped backslash followed by "u0000" is ordinary text
    r = await client.post("/v1/webhooks", headers=auth(token), json={
        "url": "https://example.com/", "description": "C:\\u0000dir"})
    assert r.status_code != 500


def _cursor(created: str, row_id: str) -> str:
    raw = json.dumps([created, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/v1/clouds", "/v1/migrations", "/v1/images"])
@pytest.mark.parametrize("created", [
    "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", "2026-01-01T00:00:00",
    "99999-01-01T00:00:00+00:00",
])
async def test_crafted_cursors_are_422(
    client: httpx.AsyncClient, make_token: TokenFactory, path: str, created: str
) -> None:
    token = await make_token()
    r = await client.get(path, params={"cursor": _cursor(created, str(uuid.uuid4()))},
                         headers=auth(token))
    assert_problem(r, 422, {"/cursor"})


@pytest.mark.parametrize(("since", "until"), [
    ("0001-01-01T00:00:00+14:00", None), (None, "9999-12-31T23:59:59-14:00"),
    ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"),
    ("9999-12-31T23:59:59-14:00", None),
])
async def test_timestamps_at_the_edges_are_clamped(
    client: httpx.AsyncClient, make_token: TokenFactory, since: str | None, until: str | None
) -> None:
    token = await make_token()
    await client.post("/v1/webhooks", headers=auth(token), json={
        "url": "https://example.com/hook"})
    params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
    r = await client.get("/v1/events", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    if since is not None and since.startswith("9999"):
        assert r.json()["items"] == []


@pytest.mark.parametrize(("header", "status"), [
    ("bytes=" + "9" * 5000 + "-", 416),
    ("bytes=0-" + "9" * 5000, 206),
    ("bytes=-" + "9" * 5000, 206),
    ("bytes=" + "1" * 19 + "-", 416),
])
async def test_range_headers_with_huge_numbers(
    client: httpx.AsyncClient, make_token: TokenFactory, tmp_path: Path, header: str,
    status: int,
) -> None:
    token = await make_token()
    image = await _image(client, token, tmp_path)
    r = await client.get(f"/v1/images/{image['id']}/content",
                         headers={**auth(token), "Range": header})
    assert r.status_code == status, r.text[:300]
    if status == 416:
        assert len(r.json()["detail"]) < 200


class _Counted:
    """A request body of ``total`` bytes in 1 MiB chunks, counting what was pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = b" " * MiB
        while self.pulled < self.total:
            self.pulled += len(chunk)
            yield chunk


JSON_ROUTES = [
    ("POST", "/v1/clouds"), ("POST", "/v1/migrations"), ("POST", "/v1/webhooks"),
    ("POST", "/v1/images/{image}/conversions"), ("PATCH", "/v1/clouds/{uuid}"),
    ("POST", "/v1/migrations/{uuid}/cancel"),
]


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
@pytest.mark.parametrize("declared", [True, False])
async def test_300_mb_json_bodies_are_refused_before_they_are_read(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings, tmp_path: Path,
    method: str, path: str, declared: bool,
) -> None:
    token = await make_token()
    image = await _image(client, token, tmp_path) if "{image}" in path else {"id": ""}
    url = path.format(image=image["id"], uuid=uuid.uuid4())
    body = _Counted(300 * MiB)
    headers = {**auth(token), "Content-Type": "application/json",
               "Idempotency-Key": uuid.uuid4().hex}
    if declared:
        headers["Content-Length"] = str(body.total)
    r = await client.request(method, url, content=body, headers=headers)
    assert_problem(r, 413)
    # declared: not a byte read; chunked: no more than the limit and one chunk
    assert body.pulled <= (0 if declared else settings.max_body_bytes + MiB)


async def test_only_the_upload_route_streams(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    """The upload itself takes bodies larger than the JSON limit (it streams them)."""
    token = await make_token()
    raw = bytes(settings.max_body_bytes * 2)
    r = await client.post("/v1/images", params={"name": "zeros"}, content=raw,
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text


async def test_same_idempotency_key_on_a_conversion_makes_one_job(
    client: httpx.AsyncClient, make_token: TokenFactory, tmp_path: Path
) -> None:
    token = await make_token()
    image = await _image(client, token, tmp_path)
    url = f"/v1/images/{image['id']}/conversions"
    headers = {**auth(token), "Idempotency-Key": "convert-once"}
    first = await client.post(url, headers=headers, json={"format": "vmdk"})
    second = await client.post(url, headers=headers, json={"format": "vmdk"})
    assert first.status_code == second.status_code == 202, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == second.json()["id"]
    jobs = (await client.get("/v1/migrations", headers=auth(token))).json()["items"]
    assert [j["id"] for j in jobs] == [first.json()["id"]]
    other = await client.post(url, headers=headers, json={"format": "vhd"})
    assert_problem(other, 422)


async def test_vhdx_conversion_is_accepted_and_named(
    client: httpx.AsyncClient, make_token: TokenFactory, tmp_path: Path
) -> None:
    token = await make_token()
    image = await _image(client, token, tmp_path)
    r = await client.post(f"/v1/images/{image['id']}/conversions", headers=auth(token),
                          json={"format": "vhdx", "name": "for hyper-v"})
    assert r.status_code == 202, r.text
    assert (r.json()["format"], r.json()["name"]) == ("vhdx", "for hyper-v")
    got = await client.get(r.headers["location"], headers=auth(token))
    assert got.status_code == 200
    assert got.json()["format"] == "vhdx"


async def test_raw_upload_must_be_whole_sectors(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    r = await client.post("/v1/images", params={"name": "odd", "format": "raw"},
                          content=b"\x01" * 1000,
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert_problem(r, 422, {"/format"})
    assert "512" in r.json()["detail"]
    assert (await client.get("/v1/images", headers=auth(token))).json()["items"] == []


@pytest.mark.parametrize("host", [
    "169.254.169.254", "169.254.0.1", "fe80::1", "[fe80::1]", "fd00:ec2::254",
    "::ffff:169.254.169.254", "metadata.google.internal", "100.100.100.200",
])
async def test_clouds_at_metadata_addresses_are_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, host: str
) -> None:
    token = await make_token()
    for kind in ("vmware", "linux"):
        body = cloud_body(kind)
        body["settings"]["host"] = host
        r = await client.post("/v1/clouds", json=body, headers=auth(token))
        assert_problem(r, 422, {"/settings/host"})
    # URL settings (the next platforms' auth and endpoint URLs) take the same check.
    url = f"https://{host if ':' not in host else '[fe80::1]'}:5000/v3"
    with pytest.raises(ValidationError, match=r"metadata|link-local"):
        TypeAdapter(Annotated[HttpUrl, NotMetadataUrl]).validate_python(url)
    assert TypeAdapter(Annotated[HttpUrl, NotMetadataUrl]).validate_python(
        "https://keystone.example.com:5000/v3").host == "keystone.example.com"
    ok = cloud_body("vmware")
    ok["settings"]["host"] = "10.0.0.5"  # private networks are where clouds live
    assert (await client.post("/v1/clouds", json=ok, headers=auth(token))).status_code == 201


def test_every_json_post_declares_idempotency_key() -> None:
    spec = create_app(Settings()).openapi()
    for path, item in spec["paths"].items():
        if "post" not in item:
            continue
        names = {p["name"] for p in item["post"].get("parameters", []) if p["in"] == "header"}
        if path == "/v1/images":
            assert "Idempotency-Key" not in names  # the streamed upload is not covered
        else:
            assert "Idempotency-Key" in names, path


async def test_unexpected_errors_do_not_escape_the_app(
    settings: Settings, db: Database
) -> None:
    """An exception that escapes becomes a 500 problem inside the app: re-raised, it
    makes the server drop the keep-alive connection (httpx's ASGI transport re-raises
    it, which is what this checks)."""
    app: FastAPI = create_app(settings, db=db)

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/boom")
            assert_problem(r, 500)
            assert "a bug" not in r.text


async def test_a_lost_database_is_503_with_retry_after(
    settings: Settings, db: Database, make_token: TokenFactory, tmp_path: Path
) -> None:
    token = await make_token()
    app = create_app(settings, db=db)
    gone = Database(f"postgresql+asyncpg://postgres@/x?host={tmp_path / 'nowhere'}&port=5",
                    connect_timeout=2)
    async with app.router.lifespan_context(app):
        app.state.ctx.db = gone
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for method, path, body in [
                ("GET", "/v1/clouds", None), ("POST", "/v1/clouds", cloud_body()),
                ("GET", "/readyz", None),
            ]:
                headers = {**auth(token), "Idempotency-Key": uuid.uuid4().hex}
                r = await c.request(method, path, json=body, headers=headers)
                assert_problem(r, 503)
                assert int(r.headers["retry-after"]) > 0
    assert gone.outage.down
    await gone.dispose()
