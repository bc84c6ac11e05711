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

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer

from app.api import docs, health, metrics, problems
from app.api.deps import AppContext
from app.api.idempotency import Idempotency
from app.api.limits import BodyLimit
from app.config import Settings
from app.crypto import SecretBox, load_keys
from app.db import Database, embedded_postgres_url, upgrade
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.worker import Worker, WorkerConfig
from app.events.bus import EventBus
from app.storage import build_store
from app.webhooks.dispatcher import Dispatcher, DispatcherConfig
from app.webhooks.policy import TargetPolicy

log = logging.getLogger(__name__)

API_VERSION = "0.1.0"

#: Request bodies under these prefixes are streamed (image uploads): not size-limited
#: as JSON and not buffered for Idempotency-Key.
STREAMED_PREFIXES = ("/v1/images",)

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


async def build_context(settings: Settings, db: Database | None = None) -> AppContext:
    if db is None:
        db = Database(await database_url(settings), pool_size=settings.db_pool_size)
    await upgrade(db)
    keys = load_keys([k.get_secret_value() for k in settings.encryption_keys], settings.key_file)
    return AppContext(settings=settings, db=db, box=SecretBox(keys), store=build_store(settings))


def build_dispatcher(ctx: AppContext) -> Dispatcher:
    """The webhook outbox dispatcher (runs beside every worker, or alone)."""
    return Dispatcher(ctx.db, ctx.box, TargetPolicy.from_settings(ctx.settings),
                      DispatcherConfig.from_settings(ctx.settings))


async def run_background(ctx: AppContext, stop: asyncio.Event) -> None:
    """A worker and a webhook dispatcher, until ``stop`` is set."""
    await asyncio.gather(build_worker(ctx).run(stop), build_dispatcher(ctx).run(stop))


def build_worker(ctx: AppContext) -> Worker:
    deps = EngineDeps(settings=ctx.settings, db=ctx.db, box=ctx.box, store=ctx.store)
    return Worker(ctx.db, ctx.box, default_engines(deps), WorkerConfig.from_settings(ctx.settings))


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
        worker = asyncio.create_task(run_background(ctx, stop)) if run_worker else None
        try:
            yield
        finally:
            stop.set()  # the worker hands its migrations back before the pool closes
            await ctx.events.close()  # ends every event stream
            if worker is not None:
                await worker
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
    # Added first, so it runs inside BodyLimit: the bodies it buffers are bounded.
    app.add_middleware(Idempotency, exempt_prefixes=STREAMED_PREFIXES)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       exempt_prefixes=STREAMED_PREFIXES)
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
