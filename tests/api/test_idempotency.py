"""Idempotency-Key on POST: replay, reuse, in-flight duplicates, expiry; a request that
was refused (4xx) or failed (5xx) binds nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text

from app.config import Settings
from app.db import Database
from app.errors import Conflict, TransientError
from app.main import create_app
from app.models.db import Cloud, IdempotencyKey
from tests.api.test_clouds import cloud_body
from tests.conftest import TokenFactory, auth


@dataclass
class Probe:
    """A test route under /v1 that counts its runs and can be held mid-request."""

    runs: int = 0
    hold: bool = False
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def probe_client(
    settings: Settings, db: Database
) -> AsyncIterator[tuple[httpx.AsyncClient, Probe]]:
    app: FastAPI = create_app(settings, db=db)
    probe = Probe()

    @app.post("/v1/probe", status_code=201)
    async def run_probe(payload: dict[str, int]) -> dict[str, int]:
        probe.runs += 1
        if probe.hold:
            probe.entered.set()
            await probe.release.wait()
        return {"run": probe.runs, **payload}

    @app.post("/v1/probe/refused", status_code=201)
    async def refused_probe(payload: dict[str, int]) -> None:
        probe.runs += 1
        if probe.hold:
            probe.entered.set()
            await probe.release.wait()
        raise Conflict("not now")

    @app.post("/v1/probe/fail")
    async def fail_probe() -> None:
        probe.runs += 1
        raise TransientError("try again")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client, probe


def keyed(token: str, key: str) -> dict[str, str]:
    return {**auth(token), "Idempotency-Key": key}


async def test_repeat_returns_first_response_without_running_again(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database
) -> None:
    token = await make_token()
    body = cloud_body()
    first = await client.post("/v1/clouds", json=body, headers=keyed(token, "k-1"))
    assert first.status_code == 201
    again = await client.post("/v1/clouds", json=body, headers=keyed(token, "k-1"))
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["etag"] == first.headers["etag"]
    assert again.headers["content-type"] == "application/json"
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Cloud)) == 1


async def test_same_object_reserialised_is_a_repeat(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, probe = probe_client
    token = await make_token()
    h = {**keyed(token, "k"), "content-type": "application/json"}
    await client.post("/v1/probe", content=b'{"a": 1, "b": 2}', headers=h)
    r = await client.post("/v1/probe", content=b'{"b":2,"a":1}', headers=h)
    assert r.json() == {"run": 1, "a": 1, "b": 2}
    assert probe.runs == 1


async def test_a_refused_request_binds_nothing(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database
) -> None:
    # A 4xx changed nothing (the request's transaction rolled back), so there is nothing
    # to protect from a repeat: the corrected request with the same key runs, and from
    # then on the key answers with its result (Stripe's semantics).
    token = await make_token()
    good = cloud_body()
    bad = {**good, "kind": "nowhere"}
    first = await client.post("/v1/clouds", json=bad, headers=keyed(token, "fix-me"))
    assert first.status_code == 422
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    fixed = await client.post("/v1/clouds", json=good, headers=keyed(token, "fix-me"))
    assert fixed.status_code == 201, fixed.text
    assert "idempotent-replayed" not in fixed.headers
    again = await client.post("/v1/clouds", json=good, headers=keyed(token, "fix-me"))
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == fixed.content
    # The key is bound now: the refused body sent with it again is a different request.
    reused = await client.post("/v1/clouds", json=bad, headers=keyed(token, "fix-me"))
    assert reused.status_code == 422
    assert reused.json()["type"].endswith("/idempotency-key-reused")
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Cloud)) == 1


async def test_the_readme_case_a_migration_corrected_after_a_422(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    # Issue 20: the README's body without "name" and with server as a string was a 422;
    # the corrected request with the same key must then be created, once.
    token = await make_token()
    cloud = (await client.post("/v1/clouds", json=cloud_body(), headers=auth(token))).json()
    wrong = {"type": "hypervisor", "mode": "store", "platform": "linux", "format": "qcow2",
             "source": {"cloud_id": cloud["id"], "server": "web-01"}}
    right = {**wrong, "name": "web-01 to the library",
             "source": {"cloud_id": cloud["id"], "server": {"name": "web-01"}}}
    refused = await client.post("/v1/migrations", json=wrong, headers=keyed(token, "4b1d9a2e"))
    assert refused.status_code == 422
    created = await client.post("/v1/migrations", json=right, headers=keyed(token, "4b1d9a2e"))
    assert created.status_code == 201, created.text
    replayed = await client.post("/v1/migrations", json=right,
                                 headers=keyed(token, "4b1d9a2e"))
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json()["id"] == created.json()["id"]
    listed = (await client.get("/v1/migrations", headers=auth(token))).json()["items"]
    assert [m["id"] for m in listed] == [created.json()["id"]]


async def test_a_conflict_binds_nothing_either(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    await client.post("/v1/clouds", json=cloud_body(name="taken"), headers=auth(token))
    body = cloud_body(name="taken")
    first = await client.post("/v1/clouds", json=body, headers=keyed(token, "dup"))
    assert first.status_code == 409
    assert (await client.post("/v1/clouds", json=body, headers=keyed(token, "dup"))
            ).status_code == 409  # ran again, and conflicted again
    # Once the conflict is gone, the same request with the same key goes through.
    listing = (await client.get("/v1/clouds", headers=auth(token))).json()
    await client.delete(f"/v1/clouds/{listing['items'][0]['id']}", headers=auth(token))
    again = await client.post("/v1/clouds", json=body, headers=keyed(token, "dup"))
    assert again.status_code == 201, again.text
    assert "idempotent-replayed" not in again.headers


async def test_a_duplicate_of_a_request_that_is_then_refused_may_run(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, probe = probe_client
    token = await make_token()
    probe.hold = True
    first = asyncio.create_task(
        client.post("/v1/probe/refused", json={"x": 1}, headers=keyed(token, "k")))
    await asyncio.wait_for(probe.entered.wait(), 10)
    dup = await client.post("/v1/probe/refused", json={"x": 1}, headers=keyed(token, "k"))
    assert dup.status_code == 409  # concurrent: in flight
    probe.release.set()
    assert (await first).status_code == 409
    probe.hold = False
    later = await client.post("/v1/probe/refused", json={"x": 1}, headers=keyed(token, "k"))
    assert later.status_code == 409
    assert "idempotent-replayed" not in later.headers
    assert probe.runs == 2  # the first and the later one ran; the duplicate did not


async def test_different_body_with_same_key_is_422(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    token = await make_token()
    await client.post("/v1/clouds", json=cloud_body(), headers=keyed(token, "k"))
    r = await client.post("/v1/clouds", json=cloud_body(), headers=keyed(token, "k"))
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/idempotency-key-reused")


async def test_same_key_on_another_path_is_422(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, _ = probe_client
    token = await make_token()
    await client.post("/v1/probe", json={}, headers=keyed(token, "k"))
    r = await client.post("/v1/clouds", json={}, headers=keyed(token, "k"))
    assert r.status_code == 422


async def test_keys_are_per_tenant(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, _ = probe_client
    acme, globex = await make_token("acme"), await make_token("globex")
    a = await client.post("/v1/probe", json={"x": 1}, headers=keyed(acme, "shared"))
    b = await client.post("/v1/probe", json={"x": 1}, headers=keyed(globex, "shared"))
    assert (a.json()["run"], b.json()["run"]) == (1, 2)


async def test_duplicate_while_in_flight_is_409(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, probe = probe_client
    token = await make_token()
    probe.hold = True
    first = asyncio.create_task(
        client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "slow"))
    )
    await asyncio.wait_for(probe.entered.wait(), 10)
    dup = await client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "slow"))
    assert dup.status_code == 409
    assert dup.headers["retry-after"] == "1"
    assert dup.json()["type"].endswith("/idempotency-key-in-flight")
    probe.release.set()
    assert (await first).status_code == 201
    replay = await client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "slow"))
    assert replay.json() == {"run": 1, "x": 1}
    assert probe.runs == 1


async def test_concurrent_first_requests_run_once(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory
) -> None:
    client, probe = probe_client
    token = await make_token()
    results = await asyncio.gather(*[
        client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "burst")) for _ in range(8)
    ])
    assert probe.runs == 1
    assert {r.status_code for r in results} <= {201, 409}
    assert all(r.json()["run"] == 1 for r in results if r.status_code == 201)


async def test_server_errors_are_not_stored(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory, db: Database
) -> None:
    client, probe = probe_client
    token = await make_token()
    for _ in range(2):
        r = await client.post("/v1/probe/fail", headers=keyed(token, "flaky"))
        assert r.status_code == 503
    assert probe.runs == 2
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


async def test_expired_keys_run_again(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory,
    db: Database, settings: Settings,
) -> None:
    client, _ = probe_client
    token = await make_token()
    await client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "old"))
    async with db.session() as session:
        await session.execute(
            text("UPDATE idempotency_keys SET created_at = now() - make_interval(secs => :s)"),
            {"s": settings.idempotency_ttl_seconds + 1},
        )
    r = await client.post("/v1/probe", json={"x": 2}, headers=keyed(token, "old"))
    assert r.status_code == 201
    assert r.json() == {"run": 2, "x": 2}


async def test_orphaned_in_flight_claim_is_taken_over(
    probe_client: tuple[httpx.AsyncClient, Probe], make_token: TokenFactory, db: Database
) -> None:
    client, _ = probe_client
    token = await make_token()
    await client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "orphan"))
    async with db.session() as session:  # as if the process died mid-request long ago
        await session.execute(text(
            "UPDATE idempotency_keys SET status_code = NULL, response = NULL, "
            "created_at = now() - interval '1 hour'"
        ))
    r = await client.post("/v1/probe", json={"x": 1}, headers=keyed(token, "orphan"))
    assert r.json()["run"] == 2


async def test_without_valid_token_nothing_is_stored(
    client: httpx.AsyncClient, db: Database
) -> None:
    for headers in ({"Idempotency-Key": "k"},
                    {"Idempotency-Key": "k", "Authorization": "Bearer vmg_unknown"}):
        r = await client.post("/v1/clouds", json=cloud_body(), headers=headers)
        assert r.status_code == 401
    async with db.session() as session:
        assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0


@pytest.mark.parametrize("key", ["", "x" * 256, "bad key", "caf\u00e9"])
async def test_malformed_keys_are_400(
    client: httpx.AsyncClient, make_token: TokenFactory, key: str
) -> None:
    token = await make_token()
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"idempotency-key", key.encode())]
    r = await client.post("/v1/clouds", json=cloud_body(), headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"


async def test_oversize_keyed_body_is_413(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings
) -> None:
    token = await make_token()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(settings.max_body_bytes // 1024 + 2):
            yield b" " * 1024

    r = await client.post("/v1/clouds", content=chunks(),
                          headers={**keyed(token, "big"), "content-type": "application/json"})
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
