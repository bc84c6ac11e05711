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
from app.models.schemas.migrations import EventOut, EventPage
from app.repositories import events as repo
from app.repositories.events import EventFilter
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


async def follow(
    db: Database, bus: EventBus, sub: Subscription, *, after: int | None,
    limits: StreamLimits,
) -> AsyncIterator[EventOut | None]:
    """Past events after ``after`` (none when None), then live ones as they commit.

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
        if after is not None:
            async for event in _history(db, where, after):
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


async def _history(db: Database, where: EventFilter, after: int) -> AsyncIterator[EventOut]:
    """Events after ``after``, a page per short transaction (no connection is held
    while the client reads)."""
    cursor = after
    while True:
        async with db.session() as session:
            batch = [EventOut.of(r) for r in await repo.page(session, where, after=cursor,
                                                             limit=_REPLAY_PAGE)]
        for event in batch:
            yield event
        if len(batch) < _REPLAY_PAGE:
            return
        cursor = batch[-1].id
