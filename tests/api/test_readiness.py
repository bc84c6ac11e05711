"""``/readyz`` of ``vmigrate serve`` speaks for its in-process worker and webhook
dispatcher too: ready while they work, 503 naming them when they do not."""

from __future__ import annotations

import asyncio

import httpx

from app.config import Settings
from app.db import Database
from app.main import create_app


async def test_readyz_reports_the_in_process_worker(settings: Settings, db: Database) -> None:
    app = create_app(settings, db=db, run_worker=True)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            async with asyncio.timeout(10):
                while (r := await c.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
            assert (r.json()["worker"], r.json()["webhooks"]) == ("ok", "ok")

            background = app.state.background
            background.task.cancel()  # the worker is gone: the process is not ready
            await asyncio.gather(background.task, return_exceptions=True)
            r = await c.get("/readyz")
            assert r.status_code == 503
            assert r.headers["content-type"] == "application/problem+json"
            assert {e["pointer"] for e in r.json()["errors"]} == {"/worker", "/webhooks"}
            assert "worker: stopped" in r.json()["detail"]


async def test_readyz_without_a_worker_says_nothing_about_one(
    settings: Settings, db: Database
) -> None:
    app = create_app(settings, db=db)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/readyz")
            assert r.status_code == 200
            assert (r.json()["worker"], r.json()["webhooks"]) == (None, None)
