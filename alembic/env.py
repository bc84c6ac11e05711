"""Alembic environment for vmigrate.

Two ways in:

- ``app.db.upgrade`` (run by ``vmigrate serve``, ``worker``, ``db upgrade``) hands over
  its open connection in ``config.attributes["connection"]``; the migrations run on it,
  inside the caller's transaction and advisory lock, and the app's logging is left alone.
- The ``alembic`` command line (``alembic upgrade head`` beside ``alembic.ini``) connects
  itself, to ``sqlalchemy.url`` when a caller set one, else to ``VMIGRATE_DATABASE_URL``:
  the variable the service reads, in the same form (``postgresql+asyncpg://...``; a plain
  ``postgresql://`` URL is taken to mean asyncpg as well).
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from app.models.db import Base

config = context.config
target_metadata = Base.metadata

URL_VARIABLE = "VMIGRATE_DATABASE_URL"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _command_line_url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get(URL_VARIABLE, "")
    if not url.strip():
        raise SystemExit(
            f"alembic: set {URL_VARIABLE} to the database to migrate, e.g. "
            "postgresql+asyncpg://user:pass@host:5432/vmigrate (or run `vmigrate db "
            "upgrade`, which also starts the embedded PostgreSQL when it is unset)"
        )
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed.render_as_string(hide_password=False)


async def _run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def _emit_sql(url: str) -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        _emit_sql(_command_line_url())
    else:
        asyncio.run(_run_async(_command_line_url()))
