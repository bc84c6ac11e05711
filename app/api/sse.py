"""Server-Sent Events on the event endpoints (``Accept: text/event-stream``).

Each event is one frame: ``id:`` the event's stream position (what the client sends
back as ``Last-Event-ID`` when it reconnects; positions follow commit order, so a
resumed stream misses nothing), ``event:`` its type, ``data:`` the same JSON object
the list endpoints return. Idle streams get a ``:`` comment line every
``events_keepalive_seconds``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import Header, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.api.deps import AppContext
from app.events.bus import EventBus
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import EventOut
from app.services import events as service
from app.services.events import StreamLimits, StreamStart

MEDIA_TYPE = "text/event-stream"
#: Reconnection delay suggested to EventSource clients (ms).
RETRY_MS = 2000

LastEventId = Annotated[
    int | None,
    Header(alias="Last-Event-ID", ge=0, le=2**63 - 1,
           description="With `Accept: text/event-stream`: resume after this stream "
           "position, the SSE `id` of the last event received (EventSource sends it "
           "when it reconnects)."),
]

#: The extra ``200`` content documenting the stream in OpenAPI.
STREAM_CONTENT: dict[str, Any] = {
    MEDIA_TYPE: {
        "schema": {"type": "string"},
        "example": 'id: 40\nevent: migration.completed\ndata: {"id": 42, ...}\n\n',
    }
}


def wants_stream(request: Request) -> bool:
    """Whether the Accept header asks for an event stream (with a q above 0)."""
    for part in request.headers.get("accept", "").split(","):
        media, _, params = part.partition(";")
        if media.strip().lower() != MEDIA_TYPE:
            continue
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            return True
    return False


def frame(event: EventOut) -> bytes:
    kind = event.type.replace("\r", "").replace("\n", "")
    head = f"id: {event.position}\n" if event.position is not None else ""
    return f"{head}event: {kind}\ndata: {event.model_dump_json()}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """A streaming response that stops as soon as the client disconnects.

    Starlette only notices a gone client at the next write on ASGI 2.4 servers; an
    idle event stream writes rarely, so this one always listens for the disconnect.
    ``on_close`` runs however the response ends, even if the body never started.
    """

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], None],
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type=MEDIA_TYPE, headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._run(receive, send)
        finally:
            self.on_close()

    async def _run(self, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-write
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _frames(events: AsyncIterator[EventOut | None]) -> AsyncIterator[bytes]:
    yield f"retry: {RETRY_MS}\n\n".encode()
    async for event in events:
        yield b": keep-alive\n\n" if event is None else frame(event)


async def stream_response(
    ctx: AppContext, where: EventFilter, *, start: StreamStart | None
) -> EventStreamResponse:
    """Check live delivery works (503 if not), then stream history after ``start``
    (none when None) followed by live events."""
    bus: EventBus | None = ctx.events
    if bus is None:
        raise service.NotListening("live events are not enabled in this process")
    await service.ensure_live(bus)
    s = ctx.settings
    limits = StreamLimits(s.events_keepalive_seconds, s.events_stream_max_seconds,
                          s.events_stream_buffer)
    sub = bus.subscribe(where, limits.buffer)
    events = service.follow(ctx.db, bus, sub, start=start, limits=limits)
    return EventStreamResponse(
        _frames(events), on_close=lambda: bus.unsubscribe(sub),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
