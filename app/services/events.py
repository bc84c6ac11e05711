"""The event log as a use case: pages of past events, and live streams that resume.

A stream registers with the bus *before* reading history, so an event committed
while history is being read is either in the history or notified (or both: the ids
sent from history are remembered and skipped when notified again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import Database
from app.errors import TransientError
from app.events.bus import EventBus, Signal, Subscription
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import EventOut, EventPage
from app.repositories import events as repo
from app.services.tokens import SCOPES, Principal

log = logging.getLogger(__name__)

#: Rows per query while replaying history into a stream.
_REPLAY_PAGE = 200


def readable_areas(principal: Principal) -> tuple[str, ...]:
    """Event-type prefixes the caller may read: ``migration.`` needs ``migrations:read``,
    ``image.`` needs ``images:read``, ``webhook.`` needs ``webhooks:read``, ..."""
    areas = []
    for scope in SCOPES:
        area, _, action = scope.partition(":")
        if action == "read" and principal.allows(scope):
            areas.append(area.removesuffix("s") + ".")
    return tuple(areas)


async def page(session: AsyncSession, where: EventFilter, *, after: int, limit: int) -> EventPage:
    """Events with ``id > after``, oldest first; ``next_after`` when more follow."""
    rows = await repo.page(session, where, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(items=[EventOut.of(r) for r in rows],
                     next_after=rows[-1].id if more else None)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    keepalive_seconds: float
    max_seconds: float
    buffer: int


class NotListening(TransientError):
    code = "events-unavailable"
    title = "Live events unavailable"


async def ensure_live(bus: EventBus) -> None:
    """Raise :class:`NotListening` (503, retryable) unless the bus can deliver live
    events; called before a stream's response starts, while a status can still be set."""
    if not await bus.wait_listening(patience=5.0):
        raise NotListening("live events are not available right now; retry shortly")


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Where a stream's history starts: after stream position ``position`` (what a
    client sends back as ``Last-Event-ID``: gap-free, positions follow commit order),
    or after event id ``event_id`` (a page's cursor; an event with a smaller id that
    commits later is not replayed)."""

    position: int | None = None
    event_id: int | None = None


async def follow(
    db: Database, bus: EventBus, sub: Subscription, *, start: StreamStart | None,
    limits: StreamLimits,
) -> AsyncIterator[EventOut | None]:
    """Past events after ``start`` (none when None), then live ones as they commit.

    ``sub`` must be taken from ``bus`` before this starts (so no commit falls between
    history and live events); it is released when this ends. Yields None when
    ``keepalive_seconds`` pass without an event (the caller writes a keep-alive).
    Ends after ``max_seconds``, when the bus closes the subscription (shutdown, lost
    listener, a consumer too slow for the buffer), or when the caller stops iterating
    (client gone).
    """
    where = sub.where
    deadline = time.monotonic() + limits.max_seconds
    try:
        sent: set[int] = set()
        if start is not None:
            async for event in _history(db, where, start):
                sent.add(event.id)
                yield event
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            item = await sub.next(min(limits.keepalive_seconds, left))
            if item is Signal.closed:
                log.debug("event stream closed: %s", sub.reason)
                return
            if item is Signal.idle:
                if deadline - time.monotonic() > 0:
                    yield None
                continue
            if item.id not in sent:
                yield item
    finally:
        bus.unsubscribe(sub)


async def _history(db: Database, where: EventFilter, start: StreamStart
                   ) -> AsyncIterator[EventOut]:
    """Events after ``start`` in commit order, a page per short transaction (no
    connection is held while the client reads)."""
    position = start.position or 0
    if start.position is None and start.event_id is not None:
        # After an event id: the committed events with greater ids, in commit order,
        # from the earliest-committed of them on.
        async with db.session() as session:
            first = await repo.first_position_after_id(session, where, start.event_id)
        if first is None:
            return
        position = first - 1
    while True:
        async with db.session() as session:
            rows = await repo.page(session, where, after=position, limit=_REPLAY_PAGE,
                                   by_position=True)
        for row in rows:
            if start.event_id is None or row.id > start.event_id:
                yield EventOut.of(row)
        if len(rows) < _REPLAY_PAGE:
            return
        position = rows[-1].position or position
