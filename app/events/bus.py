"""Live events for every API replica: Postgres LISTEN/NOTIFY fanned out to streams.

Each process holds one dedicated asyncpg connection that ``LISTEN``s on
:data:`CHANNEL`. The ``migration_events`` insert trigger sends ``pg_notify`` with only
the event's id, tenant, type and migration (small, well under the 8000-byte limit),
at commit, so a notification always names a committed row. The bus fetches the
notified rows once (by id, never "everything after the last id": ids are allocated
before commit, so a smaller id can commit later) and offers them to the matching
subscriptions.

A subscription has a bounded buffer. When it overflows, or the listening connection
is lost (notifications may have been missed), the subscription is closed: its SSE
stream ends and the client resumes with ``Last-Event-ID`` from the database. That
keeps the bus simple and never silently drops an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from app.db import Backoff, Database, describe, is_disconnect
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import EventOut
from app.repositories import events as repo

log = logging.getLogger(__name__)

#: The NOTIFY channel; the trigger in migration 0002 names the same.
CHANNEL = "vmigrate_events"
#: Most notified events fetched in one query.
_FETCH_BATCH = 500
#: How often the idle listening connection is checked.
_PING_SECONDS = 30.0


class Signal(Enum):
    """What :meth:`Subscription.next` returns instead of an event."""

    idle = "idle"  # nothing within the timeout: time for a keep-alive
    closed = "closed"  # the stream must end (overflow, listener lost, shutdown)


@dataclass(frozen=True, slots=True)
class Notice:
    id: int
    tenant: str
    type: str
    migration_id: uuid.UUID | None

    @classmethod
    def parse(cls, payload: str) -> Notice:
        data = json.loads(payload)
        raw = data.get("migration_id")
        return cls(int(data["id"]), str(data["tenant"]), str(data["type"]),
                   uuid.UUID(raw) if raw else None)


class Subscription:
    """One stream's view of the bus: events matching ``where``, in arrival order."""

    def __init__(self, where: EventFilter, buffer: int) -> None:
        self.where = where
        self.buffer = buffer
        self.closed = False
        self.reason = ""
        self._items: deque[EventOut] = deque()
        self._ready = asyncio.Event()

    def offer(self, event: EventOut) -> None:
        if self.closed:
            return
        if len(self._items) >= self.buffer:
            self.close("the stream fell behind; resume with Last-Event-ID")
            return
        self._items.append(event)
        self._ready.set()

    def close(self, reason: str) -> None:
        if not self.closed:
            self.closed, self.reason = True, reason
        self._ready.set()

    async def next(self, idle_seconds: float) -> EventOut | Signal:
        """The next event; :attr:`Signal.idle` after ``idle_seconds`` without one."""
        while True:
            if self.closed:
                return Signal.closed
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), idle_seconds)
            except TimeoutError:
                return Signal.idle


class EventBus:
    """Listens on :data:`CHANNEL` and fans committed events out to subscriptions."""

    def __init__(self, db: Database, *, reconnect_seconds: float = 1.0) -> None:
        self.db = db
        self.reconnect_seconds = reconnect_seconds
        self._subs: set[Subscription] = set()
        self._pending: list[Notice] = []
        self._wake = asyncio.Event()
        self._listening = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="event-bus-listen"),
                       asyncio.create_task(self._fetch(), name="event-bus-fetch")]

    async def wait_listening(self, patience: float) -> bool:
        """Whether the bus is (or within ``patience`` seconds becomes) listening."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), patience)
        return self.listening

    def subscribe(self, where: EventFilter, buffer: int) -> Subscription:
        """Register before reading history, so nothing committed after it is missed."""
        sub = Subscription(where, buffer)
        if self._closing:
            sub.close("the server is shutting down")
        elif not self.listening:
            sub.close("not listening for events")
        else:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def close_streams(self, reason: str = "the server is shutting down") -> None:
        """End every stream now and refuse new ones (shutdown begins)."""
        self._closing = True
        self._drop_all(reason)

    async def close(self) -> None:
        self.close_streams()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _drop_all(self, reason: str) -> None:
        for sub in list(self._subs):
            sub.close(reason)
        self._subs.clear()

    def _dsn(self) -> str:
        url = make_url(self.db.url).set(drivername="postgresql")
        return url.render_as_string(hide_password=False)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            notice = Notice.parse(payload)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed event notification")
            return
        if any(s.where.matches_head(notice.tenant, notice.migration_id, notice.type)
               for s in self._subs):
            self._pending.append(notice)
            self._wake.set()

    async def _listen(self) -> None:
        """Hold the LISTEN connection; reconnect with backoff whenever it is lost. A lost
        connection is logged once; failed reconnects count towards the database's
        outage (:class:`~app.db.Outage`, logged once per outage), not one line each."""
        backoff = Backoff(self.reconnect_seconds, self.db.retry_cap)
        failing = False
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn(), timeout=10)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self._listening.set()
                self.db.outage.succeeded()
                backoff.reset()
                failing = False
                log.info("listening for events on %s", CHANNEL)
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), _PING_SECONDS)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.execute("SELECT 1"), _PING_SECONDS)
                raise ConnectionError("the listening connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._listening.is_set():
                    log.warning("event listener lost (%s); reconnecting", describe(exc))
                elif is_disconnect(exc):
                    self.db.outage.failed(exc)
                elif not failing:
                    log.warning("event listener cannot listen (%s); retrying with backoff",
                                describe(exc))
                failing = True
            finally:
                if self._listening.is_set():
                    self._listening.clear()
                    self._drop_all("event delivery was interrupted; resume with Last-Event-ID")
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(backoff.next())

    async def _fetch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:_FETCH_BATCH], self._pending[_FETCH_BATCH:]
                try:
                    async with self.db.session() as session:
                        rows = await repo.by_ids(session, [n.id for n in batch])
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not is_disconnect(exc):  # an outage is logged once, by Database
                        log.warning("could not read notified events (%s)", describe(exc))
                    self._drop_all("event delivery was interrupted; resume with Last-Event-ID")
                    continue
                for row in rows:
                    event: EventOut | None = None
                    for sub in list(self._subs):
                        if sub.where.matches(row):
                            event = event or EventOut.of(row)
                            sub.offer(event)
                    self._subs -= {s for s in self._subs if s.closed}

