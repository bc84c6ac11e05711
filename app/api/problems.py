"""RFC 9457 problem documents for every error the API returns.

Every error leaves as ``application/problem+json`` with ``type``, ``title``,
``status`` and ``detail``; validation errors add ``errors``: one entry per bad field
with its JSON pointer (``/source/port``) and what is wrong. An unreachable database
is a 503 with ``Retry-After`` (:class:`~app.db.DatabaseUnavailable`). Unexpected
exceptions become a 500 whose detail names nothing internal (the traceback goes to the
log); :class:`ContainErrors` makes sure none escapes the app, since the server would
then close the client's keep-alive connection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.db import DatabaseUnavailable, is_disconnect
from app.errors import AppError

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://vmigrate.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    pointer: str = Field(description="JSON pointer (RFC 6901) of the offending field")
    detail: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    errors: Sequence[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        type=PROBLEM_BASE + code,
        title=title,
        status=status,
        detail=detail,
        instance=instance,
        errors=list(errors) if errors is not None else None,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def json_pointer(parts: Sequence[int | str]) -> str:
    """``["source", "port"]`` -> ``/source/port`` (RFC 6901 escaping)."""
    escaped = [str(p).replace("~", "~0").replace("/", "~1") for p in parts]
    return "/" + "/".join(escaped) if escaped else ""


def _document_path(
    body: Any, loc: Sequence[int | str], error_type: str = "", ctx: dict[str, Any] | None = None
) -> list[int | str]:
    """Map a pydantic error location onto the request document.

    Pydantic inserts names that are not in the document (the tag of a discriminated
    union, ``function-after[...]`` for validators); walking the actual body tells which
    elements are real keys and indexes. The last element of a ``missing`` error is
    always a field name, even when some value in the body happens to equal it.
    Discriminator errors (``union_tag_invalid``/``union_tag_not_found``) are located at
    the union itself; the pointer names the discriminator field (``/kind``).
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        origin, parts = parts[0], parts[1:]
        if origin != "body":
            return parts
    out: list[int | str] = []
    node = body
    for i, part in enumerate(parts):
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        last_missing = error_type == "missing" and i == len(parts) - 1
        if in_dict or in_list:
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str):
            if not last_missing and (_is_synthetic(part) or part in node.values()):
                continue  # a validator name or a union tag: not part of the document
            out.append(part)  # a missing field: the pointer names where it should be
            node = None
        elif node is None:
            out.append(part)
    if error_type in ("union_tag_invalid", "union_tag_not_found") and ctx:
        discriminator = str(ctx.get("discriminator", "")).strip("'\"")
        if discriminator.isidentifier():
            out.append(discriminator)
    return out


def _is_synthetic(part: str) -> bool:
    """Validator names and union tags (``source:vm``); no document key has these shapes."""
    return "[" in part or ":" in part or part.startswith("function-")


def _validation_errors(exc: RequestValidationError) -> list[FieldError]:
    """One entry per error: its pointer and pydantic's message (never the input)."""
    out: list[FieldError] = []
    body = getattr(exc, "body", None)
    for err in exc.errors():
        error_type = str(err.get("type", ""))
        ctx = err.get("ctx") if isinstance(err.get("ctx"), dict) else None
        msg = str(err.get("msg", "invalid"))
        if error_type == "extra_forbidden":
            msg = "unknown field"
        elif error_type == "json_invalid":
            loc = err.get("loc", ())
            where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            reason = f": {ctx['error']}" if ctx and "error" in ctx else ""
            out.append(FieldError(pointer="", detail=f"malformed JSON{reason}{where}"))
            continue
        pointer = json_pointer(_document_path(body, err.get("loc", ()), error_type, ctx))
        out.append(FieldError(pointer=pointer, detail=msg))
    return out


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem document, and make
    the OpenAPI document say so (see :func:`_document_problem_media_type`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_problem_media_type(generate())
        return app.openapi_schema or generate()

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError) -> JSONResponse:
        return app_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        detail = "; ".join(f"{e.pointer or '/'}: {e.detail}" for e in errors[:5])
        return problem_response(
            422, "validation-error", "Request validation failed", detail,
            instance=request.url.path, errors=errors,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {401: "Unauthorized", 403: "Forbidden", 404: "Not found",
                  405: "Method not allowed", 406: "Not acceptable", 409: "Conflict",
                  413: "Request body too large", 415: "Unsupported media type"}
        title = titles.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        code = title.lower().replace(" ", "-")
        return problem_response(
            exc.status_code, code, title, detail,
            instance=request.url.path, headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_response(exc, request.method, request.url.path)


def app_error_response(exc: AppError, path: str) -> JSONResponse:
    errors = exc.extra.get("errors")
    field_errors = [FieldError(**e) for e in errors] if isinstance(errors, list) else None
    headers = {"Retry-After": "5"} if exc.retryable else None
    return problem_response(
        exc.status, exc.code, exc.title, exc.message,
        instance=path, errors=field_errors, headers=headers,
    )


def unexpected_response(exc: Exception, method: str, path: str) -> JSONResponse:
    """A 503 when the database is away (the outage is logged once, by the database);
    otherwise a 500 whose detail names nothing internal, the traceback logged."""
    if isinstance(exc, AppError):
        return app_error_response(exc, path)
    if isinstance(exc, ClientDisconnect):  # nobody will read the answer; nothing to log
        return problem_response(499, "client-closed-request", "Client closed the request",
                                "the client disconnected before the request was read",
                                instance=path)
    if is_disconnect(exc):
        return app_error_response(DatabaseUnavailable(
            "the database is unreachable; retry shortly"), path)
    log.exception("unhandled error on %s %s", method, path)
    return problem_response(
        500, "internal-error", "Internal error",
        "The service failed unexpectedly; the error was logged.", instance=path,
    )


class ContainErrors:
    """The outermost middleware: an exception that escaped the app (a route, a
    dependency or another middleware) becomes a problem document here and goes no
    further. Re-raised, it would make the server close the keep-alive connection after
    the 500, and the client's next request on it would fail too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # too late for a problem document: the server ends the response
                raise
            response = unexpected_response(exc, scope["method"], scope["path"])
            await response(scope, receive, send)


def _document_problem_media_type(spec: dict[str, Any]) -> None:
    """Move the Problem schema of error responses under ``application/problem+json``.

    FastAPI files a response ``model`` under the route's media type (application/json);
    errors are sent as application/problem+json, and that is what clients must be told
    to parse. Responses declared with :func:`problem_responses` carry both keys.
    """
    for item in spec.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for response in operation.get("responses", {}).values():
                content = response.get("content", {})
                if PROBLEM_MEDIA_TYPE in content and "application/json" in content:
                    content[PROBLEM_MEDIA_TYPE] = content.pop("application/json")


#: ``responses=`` entry for routes, so the OpenAPI document types every error.
def problem_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}, "description": "Problem"}
        for code in codes
    }
