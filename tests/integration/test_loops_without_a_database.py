"""Every loop of a process outlives an unreachable database: the worker's claim loop,
the webhook dispatcher and the event listener keep trying (with backoff) for as long as
it is away, log the outage once (not once per attempt) and stop cleanly when asked.
A run's writes wait out an outage while its lease lasts and give the run up after.

The database here is a socket path where nothing listens (the refused connection of a
stopped server); tests/e2e/test_database_outage.py stops and kills a real one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import text

from app.crypto import SecretBox
from app.db import Database, DatabaseUnavailable
from app.engines.runner import LeaseLost
from app.engines.worker import LeaseClock, Worker, WorkerConfig
from app.events.bus import EventBus
from app.webhooks.dispatcher import Dispatcher, DispatcherConfig
from app.webhooks.policy import TargetPolicy

RUN_SECONDS = 3.0


@pytest.fixture
async def nowhere(tmp_path: Path) -> AsyncIterator[Database]:
    db = Database(f"postgresql+asyncpg://postgres@/x?host={tmp_path / 'nowhere'}&port=5",
                  connect_timeout=1, retry_cap=0.5)
    yield db
    await db.dispose()


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("app") and r.levelno >= logging.WARNING]


async def test_worker_keeps_claiming_and_says_so_once(
    nowhere: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    worker = Worker(nowhere, SecretBox([Fernet.generate_key()]), {},
                    WorkerConfig(poll_seconds=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(RUN_SECONDS)
    assert not task.done()
    assert worker.health() == "waiting for the database"
    failures = nowhere.outage.failures
    assert failures >= 3  # it kept trying (with backoff: not hundreds of times)
    assert failures < RUN_SECONDS / 0.05
    stop.set()
    await asyncio.wait_for(task, 10)
    assert worker.health() == "stopped"
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert "database unreachable" in lines[0]


async def test_dispatcher_keeps_claiming_and_says_so_once(
    nowhere: Database, caplog: pytest.LogCaptureFixture
) -> None:
    dispatcher = Dispatcher(nowhere, SecretBox([Fernet.generate_key()]), TargetPolicy(),
                            DispatcherConfig(poll_seconds=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(RUN_SECONDS)
    assert not task.done()
    assert dispatcher.failing
    stop.set()
    await asyncio.wait_for(task, 10)
    lines = _lines(caplog)
    assert len(lines) == 1, lines


async def test_event_listener_keeps_reconnecting_and_says_so_once(
    nowhere: Database, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus(nowhere, reconnect_seconds=0.05)
    bus.start()
    await asyncio.sleep(RUN_SECONDS)
    assert not bus.listening
    assert all(not t.done() for t in bus._tasks)
    await bus.close()
    lines = _lines(caplog)
    assert len(lines) == 1, lines
    assert nowhere.outage.failures >= 3


async def test_one_outage_is_one_line_however_many_loops(
    nowhere: Database, caplog: pytest.LogCaptureFixture
) -> None:
    box = SecretBox([Fernet.generate_key()])
    stop = asyncio.Event()
    bus = EventBus(nowhere, reconnect_seconds=0.05)
    bus.start()
    tasks = [asyncio.create_task(Worker(nowhere, box, {}, WorkerConfig(poll_seconds=0.05))
                                 .run(stop)) for _ in range(3)]
    tasks.append(asyncio.create_task(Dispatcher(nowhere, box, TargetPolicy(),
                                                DispatcherConfig(poll_seconds=0.05)).run(stop)))
    await asyncio.sleep(RUN_SECONDS)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    await bus.close()
    assert len(_lines(caplog)) == 1, _lines(caplog)


async def test_lease_clock_waits_out_a_short_outage(nowhere: Database) -> None:
    lease = LeaseClock(5.0, nowhere)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise DatabaseUnavailable("away")
        return "written"

    assert await lease.call("write", flaky) == "written"
    assert calls == 4


async def test_lease_clock_gives_up_before_the_lease_can_expire(nowhere: Database) -> None:
    lease = LeaseClock(2.0, nowhere)
    started = time.monotonic()

    async def away() -> None:
        async with nowhere.session() as session:
            await session.execute(text("SELECT 1"))

    with pytest.raises(LeaseLost, match="until the lease would have expired"):
        await lease.call("write", away)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0  # never acts on a lease the database may have let go
    assert lease.deadline - started <= 2.0 - lease.margin + 0.01
