"""Schemathesis against the real app (in-process ASGI, real PostgreSQL), every
operation: no 5xx, and every response (status, content type, headers, body) as the
OpenAPI document says. Examples are bounded so the whole run stays well under three
minutes on two cores."""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from cryptography.fernet import Fernet
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import text

from app.config import Settings
from app.db import Database
from app.main import create_app
from app.models.db import Base
from app.services.tokens import SCOPES, create_token
from tests.conftest import TokenFactory, auth
from tests.webhooks.support import webhook_settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_app(database_url: str, shared_db: Database, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[FastAPI]:
    """One app for the module, with its own engine (schemathesis runs it on its own
    event loop thread); the tables are emptied afterwards."""
    base = Settings(data_dir=tmp_path_factory.mktemp("fuzz"),
                    encryption_keys=[SecretStr(Fernet.generate_key().decode())])
    app = create_app(webhook_settings(
        base, database_url=SecretStr(database_url), db_pool_size=4,
        events_stream_max_seconds=0.5, events_keepalive_seconds=0.2,
    ))
    yield app
    shutdown_lifespans()


@pytest.fixture(scope="module")
async def fuzz_token(shared_db: Database) -> AsyncIterator[str]:
    async with shared_db.session() as session:
        _, token = await create_token(session, "acme", list(SCOPES))
    yield token
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with shared_db.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


#: The document the app serves (tests/api/test_openapi.py keeps openapi.yaml equal to it).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
# The coverage phase multiplies the cases of the large bodies (migrations, clouds) tenfold;
# random generation with bounded examples keeps the run under a minute.
schema.config.phases.coverage.enabled = False


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation(case: schemathesis.Case[Any], fuzz_app: FastAPI, fuzz_token: str) -> None:
    case.call_and_validate(app=fuzz_app, headers=auth(fuzz_token), checks=CHECKS)


async def test_what_fuzzing_found_stays_fixed(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    """Regressions: PostgreSQL text cannot hold NUL (was a 500), and undecodable JSON
    bodies get a documented 400."""
    token = await make_token()
    r = await client.post("/v1/images", params={"name": "\x00"}, content=b"\0" * 512,
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert r.status_code == 422
    r = await client.post("/v1/webhooks", headers=auth(token),
                          json={"url": "https://example.com/", "description": "a\x00b"})
    assert r.status_code == 422
    r = await client.patch(f"/v1/webhooks/{uuid.uuid4()}", content=b'{"description": "\xff\xfe"}',
                           headers={**auth(token), "Content-Type": "application/json"})
    assert r.status_code == 400


# --------------------------------------------------------------------------- own generators
# Schemathesis draws from the OpenAPI document, which says little about what a header,
# a cursor or a timestamp may hold. These generators aim at the parsers behind them:
# calendar edges with offsets, numbers of thousands of digits, cursors this API never
# made, unstorable characters, and headers of every shape. Seeded: the same cases run
# every time.

_EDGE_TIMES = [
    "0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00-14:00", "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59.999999+14:00", "0001-01-01", "9999-12-31", "2026-02-30T00:00:00Z",
    "2026-01-01T24:00:00", "1970-01-01T00:00:00+23:59", "+002026-01-01", "now", "",
    "2026-01-01T00:00:00\u0000", "2026-01-01T00:00:00" + "9" * 5000,
]


def _junk(rng: random.Random, n: int) -> str:
    alphabet = "09az-+:.TZ/=_%\u0000\u00e9\u2603 \t\n" + string.printable
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _cursor(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        doc: object = [rng.choice(_EDGE_TIMES), str(uuid.UUID(int=rng.getrandbits(128)))]
    elif kind == 1:
        doc = [rng.choice(_EDGE_TIMES), rng.choice([0, -1, 2**70, "x", None, []])]
    elif kind == 2:
        doc = rng.choice([[], {}, None, 1, "x", [1, 2, 3], [["a"], ["b"]], "\u0000"])
    elif kind == 3:
        doc = [_junk(rng, 40), _junk(rng, 40)]
    elif kind == 4:
        return _junk(rng, 80)
    else:
        return "a" * rng.choice([511, 512, 513, 5000])
    raw = json.dumps(doc).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _number(rng: random.Random) -> str:
    return rng.choice(["", "0", "-1", "1e3", "0x10", "9" * rng.choice([19, 20, 400, 5000]),
                       str(2**63), str(2**64), "١٢", " 1", "1 "])


def _range(rng: random.Random) -> bytes:
    a, b = _number(rng), _number(rng)
    text = rng.choice([f"bytes={a}-{b}", f"bytes={a}-", f"bytes=-{b}", f"bytes={a}-{b},0-1",
                       f"items={a}-{b}", f"bytes {a}-{b}",
                       _junk(rng, 30).replace("\n", "").replace("\t", "").replace("\0", "")])
    return text.encode("utf-8")


def _header_value(rng: random.Random) -> bytes:
    # h11 refuses control characters in header values before the app sees them; what
    # arrives is printable bytes (latin-1, or UTF-8 sent raw) of any length.
    alphabet = string.printable.strip() + " \u00e9\u00ff\u2603"
    text = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 10, 300, 5000])))
    return text.encode("utf-8")


def _nasty_json(rng: random.Random) -> bytes:
    value = rng.choice(["\u0000", "a\u0000b", "\ud800", "\udfff x", "\\u0000", "ok",
                        "x" * 300])
    doc = {"name": value, "url": "https://example.com/" + value, "format": value,
           "settings": {"host": value, "datacenter": value}, value: value}
    text = json.dumps(doc)  # escapes NUL and lone surrogates as \u0000 / \ud800
    if rng.random() < 0.3:
        text = text[: rng.randrange(len(text) + 1)]  # cut short
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture
async def short_streams(settings: Settings, db: Database) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app whose event streams end after a fraction of a second."""
    app = create_app(settings.model_copy(update={
        "events_stream_max_seconds": 0.3, "events_keepalive_seconds": 0.1}), db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://fuzz.test") as c:
            yield c


async def test_own_generators_find_no_server_errors(
    short_streams: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    client = short_streams
    token = await make_token()
    headers = auth(token)
    image = await client.post("/v1/images", params={"name": "fuzz"}, content=bytes(4096),
                              headers={**headers, "Content-Type": "application/octet-stream"})
    assert image.status_code == 201, image.text
    image_id = image.json()["id"]
    lists = ["/v1/clouds", "/v1/migrations", "/v1/images", "/v1/webhooks", "/v1/events",
             f"/v1/migrations/{uuid.uuid4()}/events"]
    posts = ["/v1/clouds", "/v1/migrations", "/v1/webhooks",
             f"/v1/images/{image_id}/conversions"]
    rng = random.Random(20261203)
    failures: list[str] = []

    async def call(method: str, url: str, **kw: Any) -> None:
        r = await client.request(method, url, **kw)
        if r.status_code >= 500:
            failures.append(f"{method} {url} {kw} -> {r.status_code} {r.text[:200]}")

    for _ in range(150):
        path = rng.choice(lists)
        params: dict[str, str] = {"cursor": _cursor(rng)}
        if rng.random() < 0.5:
            params = {"since": rng.choice(_EDGE_TIMES), "until": rng.choice(_EDGE_TIMES)}
        if rng.random() < 0.3:
            params["limit"] = _number(rng)
        if rng.random() < 0.2:
            params["after"] = _number(rng)
        await call("GET", path, params=params, headers=headers)
    for raw in ("%00", "%ED%A0%80", "%FF%FE", "%C0%80", "%E2%82"):  # undecodable escapes
        for name in ("cursor", "since", "until", "limit", "after", "type", "status"):
            for path in lists:
                await call("GET", f"{path}?{name}={raw}", headers=headers)
    for _ in range(60):
        await call("GET", f"/v1/images/{image_id}/content",
                   headers={**headers, "Range": _range(rng),
                            "If-None-Match": _header_value(rng)})
    for _ in range(60):
        extra: dict[str, str | bytes] = (
            {"Idempotency-Key": _header_value(rng)} if rng.random() < 0.7 else {})
        if rng.random() < 0.3:
            extra["Last-Event-ID"] = _header_value(rng)
        await call("POST", rng.choice(posts), content=_nasty_json(rng),
                   headers={**headers, **extra, "Content-Type": "application/json"})
    for _ in range(20):
        await call("GET", "/v1/events", headers={
            **headers, "Accept": "text/event-stream", "Last-Event-ID": _header_value(rng)},
            params={"after": _number(rng)} if rng.random() < 0.5 else {})
    assert failures == []
