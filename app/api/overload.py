"""Overload is answered, not queued: a bound on the requests one process works on.

:class:`InFlightLimit` is a pure ASGI middleware. It counts the requests the process is
working on; past ``max_in_flight`` a request gets a 503 problem document with
``Retry-After`` at once, before routing, authentication or any database work, so a
flood costs a few dozen microseconds a request and the requests already admitted keep
their latency. A client sees a quick 503 it can retry (or send to another replica),
never a request that sits in a queue until the client has given up.

It also stops work nobody waits for: a request whose client disconnects before the
response has been sent is cancelled (its transaction rolls back, its connection goes
back to the pool), where the framework would otherwise finish it and write into a
closed socket.

Long-lived requests (event streams) and probes are neither counted nor cancelled: an
event stream ends when its client goes and a probe must answer however loaded the
process is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

#: Paths never limited (liveness and readiness probes).
PROBES = frozenset({"/healthz", "/readyz"})


def is_event_stream(scope: Scope) -> bool:
    """Whether the request asks for Server-Sent Events (a response without an end)."""
    for name, value in scope.get("headers", ()):
        if name == b"accept" and b"text/event-stream" in value:
            return True
    return False


#: How often the event loop's lag is sampled while requests arrive.
LAG_SAMPLE_SECONDS = 0.05
#: The lag sampler stops after this long without a request (and starts again with one).
LAG_IDLE_SECONDS = 5.0


class InFlightLimit:
    """At most ``max_in_flight`` requests at once in this process; the rest get a 503
    problem with ``Retry-After: retry_after`` at once. Disconnected clients' requests
    are cancelled.

    Counting requests in flight does not see the ones still waiting for the event loop
    (parsed but not yet run, or not yet parsed): under a flood the loop itself becomes
    the queue. So the loop's lag is sampled too (how late a short sleep wakes up); while
    consecutive samples exceed ``max_loop_lag`` seconds, new requests are refused as
    well, which drains that queue at the cost of a 503 each instead of a full request
    each. One late sample (a single long request, a pause) refuses nothing."""

    def __init__(
        self,
        app: ASGIApp,
        max_in_flight: int,
        retry_after: int = 1,
        max_loop_lag: float = 0.5,
        exempt_paths: frozenset[str] = PROBES,
        exempt: Callable[[Scope], bool] = is_event_stream,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_loop_lag = max_loop_lag
        #: The latest sample of the event loop's lag (seconds).
        self.lag = 0.0
        #: How many samples in a row were later than ``max_loop_lag``, and in all.
        self.late_samples = 0
        self.samples = 0
        self._sampler: asyncio.Task[None] | None = None
        self._last_request = 0.0
        self.exempt_paths = exempt_paths
        self.exempt = exempt
        self.in_flight = 0
        #: Requests answered 503 and requests cancelled because the client left.
        self.refused = 0
        self.cancelled = 0
        body = json.dumps({
            "type": PROBLEM_BASE + "overloaded",
            "title": "Server overloaded",
            "status": 503,
            "detail": f"this API process is at capacity ({max_in_flight} requests in "
                      f"flight, or running {max_loop_lag} s behind); retry in {retry_after} s (or "
                      "on another replica)",
        }).encode()
        self._refusal_start: Message = {
            "type": "http.response.start", "status": 503,
            "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", str(retry_after).encode())],
        }
        self._refusal_body: Message = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in self.exempt_paths
                or self.exempt(scope)):
            await self.app(scope, receive, send)
            return
        self._sample_lag()
        if self.in_flight >= self.max_in_flight or self.late_samples >= 2:
            self.refused += 1
            await send(self._refusal_start)
            await send(self._refusal_body)
            return
        self.in_flight += 1
        try:
            await self._cancel_on_disconnect(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _sample_lag(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_request = loop.time()
        if self._sampler is None or self._sampler.done():
            self._sampler = loop.create_task(self._sample(), name="loop-lag")

    async def _sample(self) -> None:
        """Measure how late a short sleep wakes up, until requests stop coming."""
        loop = asyncio.get_running_loop()
        while loop.time() - self._last_request < LAG_IDLE_SECONDS:
            before = loop.time()
            await asyncio.sleep(LAG_SAMPLE_SECONDS)
            self.lag = max(0.0, loop.time() - before - LAG_SAMPLE_SECONDS)
            self.late_samples = self.late_samples + 1 if self.lag > self.max_loop_lag else 0
            self.samples += 1
        self.lag = 0.0
        self.late_samples = 0

    async def _cancel_on_disconnect(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; cancel it if the client disconnects before the response ended.

        The body is read only when the app asks for it (a refused upload is never
        read, an accepted one is read as fast as the app takes it). Once it has been
        read whole (at once for a request without a body), a watcher waits for the
        disconnect the server reports, which after a complete response just means
        "done"; from then on the app's own ``receive`` waits for the same event."""
        responded = False
        gone = asyncio.Event()
        watcher: asyncio.Task[None] | None = None
        bodyless = not any(name in (b"content-length", b"transfer-encoding")
                           for name, _ in scope.get("headers", ()))
        body_given = False

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not responded and not app_task.done():
                        self.cancelled += 1
                        app_task.cancel()
                    return
                await asyncio.sleep(0)  # (the empty body of a bodyless request)

        def start_watching() -> None:
            nonlocal watcher
            if watcher is None:
                watcher = asyncio.ensure_future(watch())

        async def app_receive() -> Message:
            nonlocal body_given
            if bodyless and not body_given:
                body_given = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if watcher is not None:
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body"):
                start_watching()
            return message

        async def app_send(message: Message) -> None:
            nonlocal responded
            if message["type"] == "http.response.body" and not message.get("more_body"):
                responded = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        if bodyless:
            start_watching()
        try:
            await asyncio.wait({app_task})
        finally:
            if not app_task.done():  # we were cancelled ourselves (server shutdown)
                app_task.cancel()
                await asyncio.wait({app_task})
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        if app_task.cancelled():
            return  # the client left: nobody to answer
        app_task.result()  # re-raises what the app raised
