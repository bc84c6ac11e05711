"""Schemathesis against the real app (in-process ASGI, real PostgreSQL), every
operation: no 5xx, and every response (status, content type, headers, body) as the
OpenAPI document says. Examples are bounded so the whole run stays well under three
minutes on two cores."""

from __future__ import annotations

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
