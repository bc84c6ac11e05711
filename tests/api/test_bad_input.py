"""Bad input of every kind gets a 4xx problem document, never a 500.

Each case is a request the API must refuse; the check is the same for all: a 4xx
status, ``application/problem+json``, the RFC 9457 members, and for validation
errors, JSON pointers naming the offending fields.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.config import Settings
from tests.api.test_clouds import cloud_body, create
from tests.conftest import TokenFactory, auth


def assert_problem(r: httpx.Response, status: int, pointers: set[str] | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    if pointers is not None:
        assert {e["pointer"] for e in body["errors"]} == pointers, body


def vmware(**changes: Any) -> dict[str, Any]:
    body = cloud_body("vmware", name="bad")
    for path, value in changes.items():
        node = body
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return body


JSON_CASES: list[tuple[str, Any, set[str]]] = [
    ("name-number", vmware(name=123), {"/name"}),
    ("name-blank", vmware(name="   "), {"/name"}),
    ("name-control", vmware(name="a\u0000b"), {"/name"}),
    ("name-long", vmware(name="n" * 129), {"/name"}),
    ("kind-missing", {"name": "x", "settings": {}}, {"/kind"}),
    ("kind-unknown", vmware(kind="vbox"), {"/kind"}),
    ("kind-library", vmware(kind="library"), {"/kind"}),
    ("kind-number", vmware(kind=1), {"/kind"}),
    ("settings-missing", {"name": "settings", "kind": "vmware"}, {"/settings"}),
    ("settings-list", vmware(settings=[]), {"/settings"}),
    ("port-string", vmware(settings__port="443"), {"/settings/port"}),
    ("port-float", vmware(settings__port=443.5), {"/settings/port"}),
    ("port-range", vmware(settings__port=70000), {"/settings/port"}),
    ("port-huge", vmware(settings__port=10**30), {"/settings/port"}),
    ("tls-string", vmware(settings__verify_tls="no"), {"/settings/verify_tls"}),
    ("host-url", vmware(settings__host="https://vc/sdk"), {"/settings/host"}),
    ("host-port", vmware(settings__host="vc:443"), {"/settings/host"}),
    ("fingerprint", vmware(settings__tls_fingerprint="md5:xx"), {"/settings/tls_fingerprint"}),
    ("unknown-top", vmware(colour="blue"), {"/colour"}),
    ("unknown-nested", vmware(settings__verfy_tls=False), {"/settings/verfy_tls"}),
    ("credentials-type", vmware(credentials="admin:pw"), {"/credentials"}),
    ("password-missing", vmware(credentials={"username": "u"}), {"/credentials/password"}),
    ("password-number", vmware(credentials__password=1234), {"/credentials/password"}),
    ("pointer-escaping", vmware(settings={"host": "h", "a/b~c": 1}), {"/settings/a~1b~0c"}),
    ("ssh-no-secret", {**cloud_body("linux"), "credentials": {"username": "root"}},
     {"/credentials"}),
    ("ssh-fingerprint", {**cloud_body("linux"), "settings": {
        **cloud_body("linux")["settings"], "host_key_fingerprint": "MD5:xx"}},
     {"/settings/host_key_fingerprint"}),
    ("esxi-port-string", {**cloud_body("esxi"), "settings": {"host": "h", "port": "443"}},
     {"/settings/port"}),
    ("kind-without-driver", {**cloud_body(), "kind": "openstack"}, {"/kind"}),
    ("root-list", [cloud_body()], {""}),
    ("root-string", "vmware", {""}),
    ("root-null", None, {""}),
]


@pytest.mark.parametrize(("case", "body", "pointers"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
async def test_invalid_create_bodies(
    client: httpx.AsyncClient, make_token: TokenFactory,
    case: str, body: Any, pointers: set[str],
) -> None:
    token = await make_token()
    r = await client.post("/v1/clouds", content=json.dumps(body),
                          headers={**auth(token), "content-type": "application/json"})
    assert_problem(r, 422, pointers)
    assert (await client.get("/v1/clouds", headers=auth(token))).json()["items"] == []


RAW_CASES: list[tuple[str, bytes, str | None, int]] = [
    ("truncated", b'{"name": "x", "kind": "vmw', "application/json", 422),
    ("trailing-comma", b'{"name": "x",}', "application/json", 422),
    ("not-utf8", b'{"name": "\xff\xfe"}', "application/json", 400),
    ("deep-nesting", b"[" * 30000 + b"]" * 30000, "application/json", 400),
    ("nan", b'{"name": "x", "kind": "vmware", "settings": {"host": "h", "port": NaN}}',
     "application/json", 422),
    ("empty", b"", "application/json", 422),
    ("text-plain", b'{"name": "x"}', "text/plain", 415),
    ("form", b"name=x&kind=vmware", "application/x-www-form-urlencoded", 415),
    ("xml", b"<cloud/>", "application/xml", 415),
    ("no-content-type", b'{"name": "x"}', None, 415),
]


@pytest.mark.parametrize(("case", "content", "media", "status"), RAW_CASES,
                         ids=[c[0] for c in RAW_CASES])
@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "keyed"])
async def test_malformed_bodies(
    client: httpx.AsyncClient, make_token: TokenFactory,
    case: str, content: bytes, media: str | None, status: int, idempotent: bool,
) -> None:
    token = await make_token()
    headers = auth(token)
    if media is not None:
        headers["content-type"] = media
    if idempotent:  # the middleware hashes the body too: it must not choke either
        headers["Idempotency-Key"] = f"k-{case}"
    r = await client.post("/v1/clouds", content=content, headers=headers)
    assert_problem(r, status)


async def test_json_suffix_media_types_are_json(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    cloud = await create(client, token)
    r = await client.patch(f"/v1/clouds/{cloud['id']}", content=json.dumps({"name": "m"}),
                           headers={**auth(token), "content-type": "application/merge-patch+json"})
    assert r.status_code == 200
    utf8 = {**auth(token), "content-type": "application/json; charset=utf-8"}
    r = await client.post("/v1/clouds", content=json.dumps(cloud_body()), headers=utf8)
    assert r.status_code == 201


async def test_oversize_bodies_are_413(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    token = await make_token()
    big = json.dumps({**cloud_body(), "name": "x" * settings.max_body_bytes}).encode()
    r = await client.post("/v1/clouds", content=big,
                          headers={**auth(token), "content-type": "application/json"})
    assert_problem(r, 413)

    async def stream() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        yield big[: len(big) // 2]
        yield big[len(big) // 2:]

    cloud = await create(client, token)
    r = await client.patch(f"/v1/clouds/{cloud['id']}", content=stream(),
                           headers={**auth(token), "content-type": "application/json"})
    assert_problem(r, 413)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/clouds/not-a-uuid", 422),
        ("GET", "/v1/clouds/12345678-1234-1234-1234-12345678901", 422),
        ("PATCH", "/v1/clouds/%00", 422),
        ("DELETE", "/v1/clouds/..%2f..", 404),
        ("GET", f"/v1/clouds/{uuid.uuid4()}", 404),
        ("PATCH", f"/v1/clouds/{uuid.uuid4()}", 404),
        ("DELETE", f"/v1/clouds/{uuid.uuid4()}", 404),
        ("PUT", "/v1/clouds", 405),
        ("GET", "/v1/clouds?limit=0", 422),
        ("GET", "/v1/clouds?limit=201", 422),
        ("GET", "/v1/clouds?limit=ten", 422),
        ("GET", "/v1/clouds?kind=library", 422),
        ("GET", "/v1/clouds?cursor=%%%", 422),
        ("GET", "/v1/clouds?cursor=eyJhIjoxfQ", 422),
        ("GET", "/v1/clouds?cursor=WyIyMDI2LTAxLTAxIiwgIngiXQ", 422),
        ("GET", "/v1/clouds?cursor=" + "a" * 600, 422),
        ("GET", "/v1/nothing", 404),
    ],
)
async def test_bad_ids_and_parameters(
    client: httpx.AsyncClient, make_token: TokenFactory, method: str, path: str, status: int
) -> None:
    token = await make_token()
    body = {"name": "x"} if method == "PATCH" else None
    r = await client.request(method, path, json=body, headers=auth(token))
    assert_problem(r, status)


async def test_patch_bodies(client: httpx.AsyncClient, make_token: TokenFactory) -> None:
    token = await make_token()
    cloud = await create(client, token)
    url = f"/v1/clouds/{cloud['id']}"
    cases: list[tuple[Any, set[str]]] = [
        ({"kind": "xen"}, {"/kind"}),
        ({"name": None}, {"/name"}),
        ({"name": ""}, {"/name"}),
        ({"settings": None}, {"/settings"}),
        ({"settings": "host=h"}, {"/settings"}),
        ({"settings": {"host": "h", "port": "1"}}, {"/settings/port"}),
        ({"settings": {"port": 1}}, {"/settings/host"}),
        ({"credentials": []}, {"/credentials"}),
        ({"credentials": {"username": "u", "password": "p", "x": 1}}, {"/credentials/x"}),
        ({"settings": {"port": 1}, "credentials": {"username": "u"}},
         {"/settings/host", "/credentials/password"}),
        ([], {""}),
    ]
    for body, pointers in cases:
        r = await client.patch(url, json=body, headers=auth(token))
        assert_problem(r, 422, pointers)
    r = await client.get(url, headers=auth(token))
    assert r.json() == cloud


async def test_authentication_is_checked_before_the_media_type(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    r = await client.post("/v1/clouds", content=b"x", headers={"content-type": "text/plain"})
    assert_problem(r, 401)
    reader = await make_token("acme", "clouds:read")
    r = await client.post("/v1/clouds", content=b"x",
                          headers={**auth(reader), "content-type": "text/plain"})
    assert_problem(r, 403)
