"""The LISTEN/NOTIFY bus on a real database: committed events reach matching
subscriptions only, a slow subscription is closed rather than silently losing events,
and a lost listening connection closes every subscription and is re-established."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from app.db import Database
from app.events.bus import EventBus, Signal
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import EventOut
from app.repositories import events as events_repo


@pytest.fixture
async def bus(db: Database) -> AsyncIterator[EventBus]:
    b = EventBus(db, reconnect_seconds=0.05)
    b.start()
    assert await b.wait_listening(5)
    yield b
    await b.close()


async def emit(db: Database, type_: str, tenant: str = "acme") -> None:
    async with db.session() as session:
        await events_repo.record(session, tenant, type_, {})


async def test_matching_committed_events_only(bus: EventBus, db: Database) -> None:
    images = bus.subscribe(EventFilter(tenant="acme", types=("image.",)), 10)
    everything = bus.subscribe(EventFilter(tenant="acme"), 10)
    await emit(db, "webhook.disabled")
    await emit(db, "image.created", tenant="umbrella")
    await emit(db, "image.created")
    got = await images.next(2)
    assert isinstance(got, EventOut)
    assert (got.type, got.seq, got.migration_id) == ("image.created", 0, None)
    assert await images.next(0.2) is Signal.idle
    kinds = []
    for _ in range(2):
        item = await everything.next(2)
        assert isinstance(item, EventOut)
        kinds.append(item.type)
    assert kinds == ["webhook.disabled", "image.created"]


async def test_a_subscription_that_falls_behind_is_closed(bus: EventBus, db: Database) -> None:
    slow = bus.subscribe(EventFilter(tenant="acme"), 2)
    for _ in range(3):
        await emit(db, "image.created")
    for _ in range(50):
        if slow.closed:
            break
        await asyncio.sleep(0.02)
    assert slow.closed
    assert "Last-Event-ID" in slow.reason
    assert await slow.next(1) is Signal.closed


async def test_a_lost_listener_closes_subscriptions_and_comes_back(
    bus: EventBus, db: Database
) -> None:
    sub = bus.subscribe(EventFilter(tenant="acme"), 10)
    async with db.session() as session:
        killed = await session.scalar(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %vmigrate_events%'"))
    assert killed == 1
    assert await sub.next(5) is Signal.closed
    for _ in range(100):
        if bus.listening:
            break
        await asyncio.sleep(0.05)
    assert bus.listening
    again = bus.subscribe(EventFilter(tenant="acme"), 10)
    await emit(db, "image.created")
    assert isinstance(await again.next(5), EventOut)


async def test_closing_refuses_new_streams(bus: EventBus) -> None:
    open_ = bus.subscribe(EventFilter(tenant="acme"), 10)
    bus.close_streams()
    assert open_.closed
    assert bus.subscribe(EventFilter(tenant="acme"), 10).closed
