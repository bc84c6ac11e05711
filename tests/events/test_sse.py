"""Server-Sent Events on real uvicorn servers sharing one database: events cross
replicas through LISTEN/NOTIFY, streams resume with Last-Event-ID, idle streams get
keep-alives, and streams end on disconnect, on their time limit and on shutdown."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db import Database
from app.events.bus import EventBus
from app.main import create_app
from app.repositories import events as events_repo
from tests.api.migrations_support import add_cloud, hypervisor
from tests.conftest import TokenFactory, auth
from tests.webhooks.support import EventReader, Frame, frames, running, webhook_settings

STREAM = {"Accept": "text/event-stream"}


@pytest.fixture
def sse_settings(settings: Settings) -> Settings:
    return webhook_settings(settings, events_keepalive_seconds=0.2)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


async def new_migration(http: httpx.AsyncClient, base: str, token: str, db: Database
                        ) -> dict[str, Any]:
    body = hypervisor(await add_cloud(db, "vmware"))
    r = await http.post(f"{base}/v1/migrations", headers=auth(token), json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def types(got: list[Frame]) -> list[str | None]:
    return [f.event for f in got]


async def test_an_event_made_on_one_replica_streams_from_another(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    token = await make_token()
    a, b = create_app(sse_settings, db=db), create_app(sse_settings, db=db)
    async with (
        running(a) as (url_a, _),
        running(b) as (url_b, _),
        http.stream("GET", f"{url_b}/v1/events", headers={**auth(token), **STREAM}) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        migration = await new_migration(http, url_a, token, db)
        r = await http.post(f"{url_a}/v1/migrations/{migration['id']}/cancel",
                            headers=auth(token))
        assert r.status_code == 200
        got = await EventReader(stream).take(2)
    assert types(got) == ["migration.created", "migration.cancelled"]
    first = got[0].json
    assert got[0].id is not None  # the stream position, not necessarily the event id
    assert first["migration_id"] == migration["id"]
    assert first["seq"] == 1
    assert int(got[1].id or 0) > int(got[0].id or 0)


async def test_resume_with_last_event_id_and_per_migration_streams(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    token = await make_token()
    app = create_app(sse_settings, db=db)
    async with running(app) as (url, _):
        m = await new_migration(http, url, token, db)
        await http.post(f"{url}/v1/migrations/{m['id']}/run", headers=auth(token))
        other = await new_migration(http, url, token, db)
        log = (await http.get(f"{url}/v1/events", headers=auth(token))).json()["items"]
        assert [e["type"] for e in log] == ["migration.created", "migration.queued",
                                            "migration.created"]
        # A stream from the start (after=0) names each event's position in its SSE id.
        async with http.stream("GET", f"{url}/v1/events?after=0",
                               headers={**auth(token), **STREAM}) as stream:
            history = await EventReader(stream).take(3)
        assert [f.json["id"] for f in history] == [e["id"] for e in log]
        # The tenant stream resumes after the first event: history, then live.
        async with http.stream("GET", f"{url}/v1/events", headers={
                **auth(token), **STREAM, "Last-Event-ID": str(history[0].id)}) as stream:
            reader = EventReader(stream)
            got = await reader.take(2)
            assert [f.json["id"] for f in got] == [log[1]["id"], log[2]["id"]]
            await http.post(f"{url}/v1/migrations/{other['id']}/cancel", headers=auth(token))
            live = await reader.take(1)
            assert types(live) == ["migration.cancelled"]
        # A migration's stream replays its whole log, and only its own events follow.
        path = f"{url}/v1/migrations/{m['id']}/events"
        async with http.stream("GET", path, headers={**auth(token), **STREAM}) as stream:
            reader = EventReader(stream)
            got = await reader.take(2)
            assert types(got) == ["migration.created", "migration.queued"]
            queued_position = got[1].id
            await http.post(f"{url}/v1/migrations/{other['id']}/run", headers=auth(token))
            await http.post(f"{url}/v1/migrations/{m['id']}/cancel", headers=auth(token))
            live = await reader.take(1)
            assert types(live) == ["migration.cancelled"]
            assert live[0].json["migration_id"] == m["id"]
        async with http.stream("GET", path, headers={**auth(token), **STREAM,
                                                     "Last-Event-ID": str(queued_position)}) as s:
            assert types(await EventReader(s).take(1)) == ["migration.cancelled"]
        # Filters apply to streams too.
        async with http.stream("GET", f"{url}/v1/events?after=0&type=migration.queued",
                               headers={**auth(token), **STREAM}) as s:
            got = await EventReader(s).take(2)
            assert types(got) == ["migration.queued", "migration.queued"]
        missing = await http.get(f"{url}/v1/migrations/{'0' * 8}-0000-0000-0000-{'0' * 12}"
                                 "/events", headers={**auth(token), **STREAM})
        assert missing.status_code == 404


async def test_resume_replays_an_event_that_committed_after_a_greater_id(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    """Event ids are allocated when an event is written: here the first transaction
    writes an event (smaller id) and commits only after a second one wrote and
    committed its own (greater id). A client that saw the second and resumes must
    still get the first: streams resume by commit-ordered position, not by id."""
    token = await make_token()
    app = create_app(sse_settings, db=db)
    async with running(app) as (url, _):
        async with db.session() as slow:
            await events_repo.record(slow, "acme", "image.created", {"n": "slow"})
            async with db.session() as fast:
                await events_repo.record(fast, "acme", "image.created", {"n": "fast"})
            async with http.stream("GET", f"{url}/v1/events?after=0",
                                   headers={**auth(token), **STREAM}) as stream:
                seen = await EventReader(stream).take(1)
            assert seen[0].json["payload"] == {"n": "fast"}
        # `slow` committed now, with the smaller id.
        log = (await http.get(f"{url}/v1/events", headers=auth(token))).json()["items"]
        assert [e["payload"]["n"] for e in log] == ["slow", "fast"]  # id order
        assert log[0]["id"] < seen[0].json["id"]
        async with http.stream("GET", f"{url}/v1/events", headers={
                **auth(token), **STREAM, "Last-Event-ID": str(seen[0].id)}) as stream:
            resumed = await EventReader(stream).take(1)
        assert resumed[0].json["payload"] == {"n": "slow"}
        assert int(resumed[0].id or 0) > int(seen[0].id or 0)
        # From a page cursor (an event id), history comes in commit order too.
        async with http.stream("GET", f"{url}/v1/events?after=0",
                               headers={**auth(token), **STREAM}) as stream:
            both = await EventReader(stream).take(2)
        assert [f.json["payload"]["n"] for f in both] == ["fast", "slow"]


async def test_keep_alives_time_limit_and_disconnect(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    token = await make_token()
    limited = sse_settings.model_copy(update={"events_stream_max_seconds": 0.7})
    app = create_app(limited, db=db)
    async with running(app) as (url, _):
        bus: EventBus = app.state.ctx.events
        started = time.monotonic()
        comments = 0
        async with http.stream("GET", f"{url}/v1/events", headers={**auth(token), **STREAM}
                               ) as stream:
            async for f in frames(stream):
                comments += f.comment == "keep-alive"
        assert comments >= 2  # every 0.2 s ...
        assert 0.6 < time.monotonic() - started < 3  # ... until the 0.7 s limit
        assert not bus._subs
        async with http.stream("GET", f"{url}/v1/events", headers={**auth(token), **STREAM}):
            await asyncio.sleep(0.1)
            assert len(bus._subs) == 1
        for _ in range(50):  # the client went away: the server lets go
            if not bus._subs:
                break
            await asyncio.sleep(0.02)
        assert not bus._subs


async def test_shutdown_ends_open_streams(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    token = await make_token()
    app = create_app(sse_settings, db=db)
    async with (
        running(app) as (url, server),
        http.stream("GET", f"{url}/v1/events", headers={**auth(token), **STREAM}) as stream,
    ):
        await asyncio.sleep(0.1)
        started = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        server._captured_signals.clear()  # else uvicorn re-raises SIGTERM at pytest
        async for _ in frames(stream):
            pass
        assert time.monotonic() - started < 2


async def test_stream_needs_a_live_bus(
    sse_settings: Settings, db: Database, make_token: TokenFactory, http: httpx.AsyncClient
) -> None:
    token = await make_token()
    app = create_app(sse_settings, db=db)
    async with running(app) as (url, _):
        app.state.ctx.events.close_streams()
        r = await http.get(f"{url}/v1/events", headers={**auth(token), **STREAM})
        assert r.status_code == 200
        assert r.text.startswith("retry:")  # opened and closed at once: the client retries
