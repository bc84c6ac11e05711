"""/v1/events: the tenant's event log, as pages or as a live Server-Sent Events stream.

A token sees the event types its scopes can read (``image.*`` with ``images:read``,
``webhook.*`` with ``webhooks:read``, ...) and, with ``migrations:read``, every event
that belongs to a migration.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from app.api.deps import Context, Session, require_any
from app.api.pagination import Limit, utc
from app.api.problems import problem_responses
from app.api.sse import STREAM_CONTENT, LastEventId, stream_response, wants_stream
from app.errors import InvalidInput
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import EventPage
from app.services import events as service
from app.services.events import StreamStart
from app.services.tokens import SCOPES, Principal

router = APIRouter(prefix="/events", tags=["events"])

Reader = Annotated[
    Principal, Depends(require_any(*(s for s in SCOPES if s.endswith(":read"))))
]

TypeFilter = Annotated[
    list[Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[a-z0-9_.*]+$")]] | None,
    Query(max_length=50,
          description="Only these types; repeatable. `migration.` or `migration.*` is a "
          "prefix (every migration event)."),
]


def aware(value: datetime | None) -> datetime | None:
    """Timestamps in UTC (those without an offset are UTC), clamped to the range of
    timestamps (:func:`~app.api.pagination.utc`)."""
    return None if value is None else utc(value)


def event_filter(
    principal: Principal, types: list[str] | None, since: datetime | None,
    until: datetime | None,
) -> EventFilter:
    since, until = aware(since), aware(until)
    if since is not None and until is not None and since > until:
        raise InvalidInput("since is after until", extra={"errors": [
            {"pointer": "/since", "detail": "must not be after until"}]})
    return EventFilter(tenant=principal.tenant, types=tuple(types or ()),
                       areas=service.readable_areas(principal),
                       migration_events=principal.allows("migrations:read"),
                       since=since, until=until)


@router.get(
    "",
    response_model=EventPage,
    operation_id="list_events",
    summary="The tenant's events, oldest first (or a live stream)",
    responses={200: {"content": STREAM_CONTENT}, **problem_responses(401, 403, 422, 503)},
)
async def list_events(
    request: Request,
    ctx: Context,
    session: Session,
    who: Reader,
    type: TypeFilter = None,
    since: Annotated[datetime | None, Query(description="Created at or after.")] = None,
    until: Annotated[datetime | None, Query(description="Created before.")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=2**63 - 1,
              description="Only events with a greater id (a previous page's `next_after`). "
              "A stream without it (and without Last-Event-ID) starts with new events."),
    ] = None,
    limit: Limit = 50,
    last_event_id: LastEventId = None,
) -> EventPage | Response:
    """With `Accept: text/event-stream`, the same events as Server-Sent Events: history
    after `after` (or `Last-Event-ID`), then live ones as they happen."""
    where = event_filter(who, type, since, until)
    if wants_stream(request):
        if last_event_id is not None:
            start: StreamStart | None = StreamStart(position=last_event_id)
        else:
            start = StreamStart(event_id=after) if after is not None else None
        return await stream_response(ctx, where, start=start)
    return await service.page(session, where, after=after or 0, limit=limit)
