"""The application factory and its lifespan.

The lifespan builds everything once: settings -> database (embedded when no URL is
configured) -> schema upgrade -> secret box; and hands them to requests through
``app.state.ctx`` (see :mod:`app.api.deps`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer

from app.api import docs, health, metrics, problems
from app.api.deps import AppContext
from app.api.idempotency import Idempotency, document_header
from app.api.limits import BodyLimit
from app.api.overload import InFlightLimit
from app.config import Settings
from app.crypto import SecretBox, load_keys
from app.db import Database, embedded_postgres_url, is_disconnect, upgrade
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.worker import Worker, WorkerConfig
from app.events.bus import EventBus
from app.storage import build_store
from app.webhooks.dispatcher import Dispatcher, DispatcherConfig
from app.webhooks.policy import TargetPolicy

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"

#: The one request whose body is streamed (an image upload): not limited to
#: ``max_body_bytes`` and not buffered for Idempotency-Key. Exactly this method and path;
#: every other route under /v1/images takes JSON like the rest of the API.
STREAMED: frozenset[tuple[str, str]] = frozenset({("POST", "/v1/images")})

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token from `vmigrate tokens create`: `Authorization: Bearer vmg_...`.",
)


async def database_url(settings: Settings) -> str:
    """The configured database URL, or the embedded server's (started on demand)."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    log.info("no VMIGRATE_DATABASE_URL: using the embedded PostgreSQL in %s",
             settings.postgres_dir)
    return await embedded_postgres_url(settings.postgres_dir)


#: How long a starting process waits for an unreachable database before giving up.
STARTUP_WAIT_SECONDS = 120.0


async def _upgrade_when_reachable(db: Database, patience: float = STARTUP_WAIT_SECONDS
                                  ) -> None:
    """Apply the schema migrations, waiting (with backoff, one log line) while the
    database is unreachable: a worker started during a database restart waits for it
    instead of exiting."""
    backoff = db.backoff()
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        try:
            await upgrade(db)
        except Exception as exc:
            if not is_disconnect(exc) or asyncio.get_running_loop().time() >= deadline:
                raise
            db.outage.failed(exc)
            await asyncio.sleep(backoff.next())
        else:
            db.outage.succeeded()
            return


async def build_context(settings: Settings, db: Database | None = None) -> AppContext:
    if db is None:
        db = Database(await database_url(settings), pool_size=settings.db_pool_size,
                      connect_timeout=settings.db_connect_timeout_seconds,
                      retry_cap=settings.db_retry_max_seconds)
    await _upgrade_when_reachable(db)
    keys = load_keys([k.get_secret_value() for k in settings.encryption_keys], settings.key_file)
    return AppContext(settings=settings, db=db, box=SecretBox(keys), store=build_store(settings))


def build_dispatcher(ctx: AppContext) -> Dispatcher:
    """The webhook outbox dispatcher (runs beside every worker, or alone)."""
    return Dispatcher(ctx.db, ctx.box, TargetPolicy.from_settings(ctx.settings),
                      DispatcherConfig.from_settings(ctx.settings))


class Background:
    """The worker and webhook dispatcher that run beside the API in ``vmigrate serve``
    (or alone in ``vmigrate worker``), and what ``/readyz`` says about them."""

    def __init__(self, ctx: AppContext) -> None:
        self.worker = build_worker(ctx)
        self.dispatcher = build_dispatcher(ctx)
        self.task: asyncio.Task[None] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(self.worker.run(stop), self.dispatcher.run(stop))

    def start(self, stop: asyncio.Event) -> None:
        self.task = asyncio.create_task(self.run(stop), name="background")
        self.task.add_done_callback(self._ended)

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the in-process worker ended: %r", task.exception())

    def health(self) -> dict[str, str]:
        """``worker`` and ``webhooks``: ``ok``, or why not (``/readyz`` fails unless
        both are ``ok``)."""
        if self.task is not None and self.task.done():
            return {"worker": "stopped", "webhooks": "stopped"}
        return {"worker": self.worker.health(),
                "webhooks": "waiting for the database" if self.dispatcher.failing else "ok"}


async def run_background(ctx: AppContext, stop: asyncio.Event) -> None:
    """A worker and a webhook dispatcher, until ``stop`` is set."""
    await Background(ctx).run(stop)


def build_worker(ctx: AppContext) -> Worker:
    deps = EngineDeps(settings=ctx.settings, db=ctx.db, box=ctx.box, store=ctx.store)
    return Worker(ctx.db, ctx.box, default_engines(deps), WorkerConfig.from_settings(ctx.settings))


def _document_idempotency(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_header(generate(), STREAMED)
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None, *, db: Database | None = None, run_worker: bool = False
) -> FastAPI:
    """Build the ASGI app. ``db`` lets tests share one database across apps;
    ``run_worker`` runs a worker in the same process (``vmigrate serve`` does)."""
    settings = settings or Settings()
    owns_db = db is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx = await build_context(settings, db)
        ctx.events = EventBus(ctx.db)
        ctx.events.start()
        app.state.ctx = ctx
        stop = asyncio.Event()
        background = Background(ctx) if run_worker else None
        app.state.background = background
        if background is not None:
            background.start(stop)
        try:
            yield
        finally:
            stop.set()  # the worker hands its migrations back before the pool closes
            await ctx.events.close()  # ends every event stream
            if background is not None and background.task is not None:
                await asyncio.gather(background.task, return_exceptions=True)
            if owns_db:
                await ctx.db.dispose()

    app = FastAPI(
        title="vmigrate",
        version=API_VERSION,
        summary="Migrate virtual machines and their disks between hypervisors and clouds.",
        lifespan=lifespan,
        docs_url=None,  # app.api.docs serves them with assets of its own (no CDN)
        redoc_url=None,
    )
    problems.install(app)
    _document_idempotency(app)
    # Added first, so it runs inside BodyLimit: the bodies it buffers are bounded.
    app.add_middleware(Idempotency, streamed=STREAMED)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, streamed=STREAMED)
    # Past api_max_in_flight requests, a 503 at once (before any other work); a client
    # that disconnects has its request cancelled.
    app.add_middleware(InFlightLimit, max_in_flight=settings.api_max_in_flight,
                       retry_after=settings.api_retry_after_seconds,
                       max_loop_lag=settings.api_max_loop_lag_seconds)
    # Outermost: an exception that escaped everything else still becomes a problem
    # document (503 for a lost database), and the connection stays open.
    app.add_middleware(problems.ContainErrors)
    app.include_router(health.router)
    docs.install(app)
    # Outermost middleware: counts and logs every request.
    metrics.install(app, dependencies=[Security(bearer_scheme)])
    from app.api import routers

    for router in routers():
        # Declares the bearer scheme on every /v1 operation, so generated clients send
        # the token; ``require(scope)`` in each route does the actual checking.
        app.include_router(router, prefix="/v1", dependencies=[Security(bearer_scheme)])
    return app
