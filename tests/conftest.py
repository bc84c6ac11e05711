"""Shared fixtures: a real PostgreSQL (embedded, or a scratch database on the server in
``VMIGRATE_TEST_DATABASE_URL``), the app on top of it, and API tokens.

Isolation: the schema is migrated once per session; every test that uses the database
starts from empty tables (TRUNCATE after each test), so tests may commit, run
concurrent transactions and race each other like real clients.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import Database, embedded_postgres_url, upgrade
from app.main import create_app
from app.models.db import Base
from app.services.tokens import create_token

pytest_plugins = ["tests.infra.vcsim_fixtures", "tests.infra.fixtures"]

TokenFactory = Callable[..., Awaitable[str]]

#: Fixtures that boot a QEMU guest or build and start the vCenter simulator: a test that
#: uses one (directly or through another fixture) is ``slow``, so that
#: ``scripts/test -m "not slow"`` runs everything else in a few minutes.
SLOW_FIXTURES = frozenset({"lvm_guest", "lvm_guest_session", "vcsim"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    external = os.environ.get("VMIGRATE_TEST_DATABASE_URL")
    if external is None:
        root = Path(tempfile.mkdtemp(prefix="vmigrate-test-pg-"))
        yield await embedded_postgres_url(root / "postgres", "vmigrate_test", stop_at_exit=True)
        return
    # A scratch database on the given server, dropped at the end: never touch real data.
    name = f"vmigrate_test_{secrets.token_hex(4)}"
    admin = Database(external, pool_size=1)
    async with admin.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(external).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture(scope="session")
async def shared_db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url, pool_size=20)
    await upgrade(database)
    yield database
    await database.dispose()


@pytest.fixture
async def db(shared_db: Database) -> AsyncIterator[Database]:
    yield shared_db
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    async with shared_db.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        encryption_keys=[Fernet.generate_key().decode()],
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
async def client(settings: Settings, db: Database) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client talking to the real app (lifespan run) on the test database."""
    app = create_app(settings, db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vmigrate.test") as c:
            yield c


@pytest.fixture
def make_token(db: Database) -> TokenFactory:
    """``await make_token("acme", "migrations:write")`` -> a bearer token for that tenant."""

    async def factory(tenant: str = "acme", *scopes: str) -> str:
        wanted = list(scopes) or [
            "migrations:write", "clouds:write", "images:write", "webhooks:write"
        ]
        async with db.session() as session:
            _, token = await create_token(session, tenant, wanted)
        return token

    return factory


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
