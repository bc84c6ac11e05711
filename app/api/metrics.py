"""``GET /metrics`` (Prometheus text format, scope ``metrics:read``) and the HTTP
middleware that counts, times and logs every request.

Requests are labelled by their route *template* (``/v1/migrations/{migration_id}``),
never the concrete path, so ids do not multiply the series; a request no route matched
is labelled ``<unmatched>``. The middleware also writes the access log (uvicorn's own is
off): one line per request at INFO, except probes and scrapes (``/healthz``,
``/readyz``, ``/metrics``), which are logged only at DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Response, params
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.deps import require
from app.api.problems import problem_responses
from app.services.tokens import Principal

log = logging.getLogger("app.access")

SCOPE = "metrics:read"
QUIET = frozenset({"/healthz", "/readyz", "/metrics"})

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics", operation_id="metrics", response_class=Response,
    responses={200: {"description": "Every metric in the Prometheus text format.",
                     "content": {"text/plain": {}}}, **problem_responses(401, 403)},
)
async def scrape(_: Annotated[Principal, Depends(require(SCOPE))]) -> Response:
    """Prometheus metrics of this process: HTTP requests, migrations, steps, bytes moved,
    worker leases and webhook deliveries. Needs a token with the `metrics:read` scope."""
    return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)


def route_template(scope: Scope) -> str:
    """The full path template of the route that handled ``scope``.

    FastAPI records the route it picked in the scope: its own per-request record of the
    effective route (FastAPI >= 0.16x, where a route included with a prefix keeps its
    router-relative ``path``), else ``scope["route"]`` (whose ``path`` is complete in
    older versions). ``<unmatched>`` when no route matched."""
    chosen = (scope.get("fastapi") or {}).get("effective_route_context")
    for candidate in (chosen, scope.get("route")):
        path = getattr(candidate, "path_format", None) or getattr(candidate, "path", None)
        if isinstance(path, str):
            return path
    return "<unmatched>"


class RequestMetrics:
    """Pure ASGI middleware (it never buffers a body, so streamed uploads, downloads and
    event streams pass through untouched). A streamed response is timed to its end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            method = str(scope.get("method", ""))
            route = route_template(scope)
            metrics.http_requests.labels(method, route, str(status)).inc()
            metrics.http_request_seconds.labels(method, route).observe(elapsed)
            path = str(scope.get("path", ""))
            level = logging.DEBUG if path in QUIET else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "%s %s %d %.1f ms", method, path, status, elapsed * 1000,
                        extra={"http_route": route, "http_status": status,
                               "duration_ms": round(elapsed * 1000, 1)})


def install(app: FastAPI, dependencies: Sequence[params.Depends] = ()) -> None:
    """Add ``GET /metrics`` (with ``dependencies``: the app's bearer scheme, so the
    OpenAPI document declares it) and the request middleware (outermost of those added
    so far: it sees the final status of every request)."""
    app.include_router(router, dependencies=list(dependencies))
    app.add_middleware(RequestMetrics)
