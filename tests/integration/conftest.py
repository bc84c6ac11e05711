"""Fixtures for the schema tests: an empty database beside the test database."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.db import Database


@pytest.fixture
async def scratch(database_url: str) -> AsyncIterator[Database]:
    """A fresh, empty database on the test PostgreSQL server, dropped afterwards."""
    name = f"vmigrate_mig_{secrets.token_hex(4)}"
    admin = Database(database_url, pool_size=1)
    async with admin.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    db = Database(make_url(database_url).set(database=name).render_as_string(
        hide_password=False), pool_size=2)
    try:
        yield db
    finally:
        await db.dispose()
        async with admin.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
