"""``Idempotency-Key`` for every POST: a retried request gets the first answer.

A pure ASGI middleware, so it covers every POST route without each one opting in.
For a POST carrying the header and a valid bearer token:

- the first request claims ``(tenant, key)`` (a committed row, visible to every API
  process) and runs. The key is bound to it only if the service accepted it (a 2xx):
  then its response (status, body, ``Location``/``ETag``/...) is stored. A request that
  was refused (4xx: a body that fails validation, a conflict, a missing scope) changed
  nothing, since its transaction rolled back; it releases the claim like a 5xx or an
  exception does, so the corrected request may use the same key (Stripe's semantics:
  no idempotent result is kept for a request that never started);
- a repeat with the same method, path and body gets the stored response, marked
  ``Idempotent-Replayed: true``, without the route running again;
- a repeat with a different request is a 422 problem (the key was reused by mistake);
- a repeat while the first is still running is a 409 problem with ``Retry-After``.

Keys are per tenant (resolved from the token's hash) and expire after
``settings.idempotency_ttl_seconds``. Requests without a usable token pass through
untouched: the route answers 401 and nothing is stored. Bodies are hashed after JSON
canonicalisation, so a client re-serialising the same object is still a repeat.
The middleware sits inside :class:`~app.api.limits.BodyLimit`, so the body it buffers
is bounded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from datetime import timedelta
from typing import Annotated, Any

import anyio
from fastapi import Header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import AppContext
from app.api.limits import replay_body
from app.api.problems import problem_response
from app.crypto import SecretBox
from app.models.idempotency import Claimed, StoredKey
from app.services import idempotency as service

log = logging.getLogger(__name__)

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
#: What a key may hold: visible ASCII (see :func:`_valid_key`).
_KEY_PATTERN = "^[!-~]+$"
#: Response headers worth replaying; others (date, server, ...) are per response.
_KEPT_HEADERS = frozenset({b"content-type", b"location", b"etag", b"link", b"retry-after"})
#: Larger responses are not stored (the claim is released): a retry runs again.
_MAX_STORED = 4 * 1024 * 1024


_HEADER_DESCRIPTION = (
    "Makes the POST safe to retry: a repeat with the same key and body returns the first "
    "response instead of running again (keys last `idempotency_ttl_seconds`). Same key, "
    "different request: 422; while the first is still running: 409. Only an accepted "
    "request (2xx) binds the key: after a refusal (4xx) correct the request and send it "
    "again with the same key.")


#: Declare on a POST route (``key: IdempotencyKeyHeader = None``) to document the header
#: in the OpenAPI document; the middleware does the work whether declared or not.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", max_length=MAX_KEY_LENGTH, description=_HEADER_DESCRIPTION,
    ),
]


def document_header(spec: dict[str, Any], streamed: frozenset[tuple[str, str]]) -> None:
    """Declare ``Idempotency-Key`` on every POST of the OpenAPI document that the
    middleware covers (all but the streamed uploads), whether or not the route declared
    it with :data:`IdempotencyKeyHeader`, with the 400 a malformed key gets: the
    document says what the service does."""
    for path, item in spec.get("paths", {}).items():
        operation = item.get("post")
        if not isinstance(operation, dict) or ("POST", path) in streamed:
            continue
        operation.get("responses", {}).setdefault("400", {
            "description": "Problem", "content": {"application/problem+json": {
                "schema": {"$ref": "#/components/schemas/Problem"}}}})
        params = operation.setdefault("parameters", [])
        for param in params:
            if param.get("in") == "header" and param.get("name", "").lower() == HEADER:
                param["schema"]["anyOf"][0]["pattern"] = _KEY_PATTERN
                break
        else:
            params.append({
                "name": "Idempotency-Key", "in": "header", "required": False,
                "description": _HEADER_DESCRIPTION,
                "schema": {"anyOf": [{"type": "string", "minLength": 1,
                                      "maxLength": MAX_KEY_LENGTH, "pattern": _KEY_PATTERN},
                                     {"type": "null"}],
                           "description": _HEADER_DESCRIPTION, "title": "Idempotency-Key"},
            })


class Idempotency:
    """Make POSTs with an ``Idempotency-Key`` safe to retry."""

    def __init__(
        self, app: ASGIApp, *, in_flight_timeout: float = 300.0,
        streamed: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.app = app
        #: A claim older than this with no response is taken to be orphaned (its
        #: process died) and may be claimed again.
        self.in_flight_timeout = timedelta(seconds=in_flight_timeout)
        #: (method, path) of streamed uploads: not buffered, hence not covered.
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http" or scope["method"] != "POST"
            or (scope["method"], scope["path"]) in self.streamed
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = headers.get(HEADER)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not _valid_key(key):
            await _problem(scope, receive, send, 400, "invalid-idempotency-key",
                           "Invalid Idempotency-Key",
                           f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} visible ASCII characters")
            return
        ctx: AppContext = scope["app"].state.ctx
        tenant = await self._tenant(ctx, headers.get("authorization", ""))
        if tenant is None:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)  # bounded: BodyLimit already read it
        if body is None:  # the client went away
            return
        await self._handle(ctx, tenant, key, body, scope, receive, send)

    async def _tenant(self, ctx: AppContext, authorization: str) -> str | None:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        async with ctx.db.session() as session:
            return await service.tenant_for_token(session, token.strip())

    async def _handle(
        self, ctx: AppContext, tenant: str, key: str, body: bytes,
        scope: Scope, receive: Receive, send: Send,
    ) -> None:
        method, path = scope["method"], scope["path"]
        request_hash = _request_hash(method, path, scope.get("query_string", b""), body)
        async with ctx.db.session() as session:
            outcome = await service.claim(
                session, tenant=tenant, key=key, method=method, path=path,
                request_hash=request_hash,
                ttl=timedelta(seconds=ctx.settings.idempotency_ttl_seconds),
                in_flight_timeout=self.in_flight_timeout,
            )
        if isinstance(outcome, StoredKey):
            await _answer_repeat(outcome, method, path, request_hash, ctx.box, scope, receive,
                                 send)
            return
        captured = _Capture(send)
        try:
            await self.app(scope, replay_body(body, receive), captured.send)
        except BaseException:
            await self._release(ctx, tenant, key, outcome)
            raise
        status = captured.status
        if status is None or not 200 <= status < 300 or captured.size > _MAX_STORED:
            await self._release(ctx, tenant, key, outcome)
            return
        try:
            async with ctx.db.session() as session:
                await service.complete(
                    session, tenant=tenant, key=key, held=outcome,
                    status_code=status, response=captured.stored(ctx.box),
                )
        except Exception:
            # The response is already on its way; a retry will find the claim in flight
            # until it times out, which is the safe side.
            log.exception("could not store the response for an Idempotency-Key")

    async def _release(
        self, ctx: AppContext, tenant: str, key: str, held: Claimed
    ) -> None:
        with anyio.CancelScope(shield=True):  # also when the request was cancelled
            try:
                async with ctx.db.session() as session:
                    await service.release(session, tenant=tenant, key=key, held=held)
            except Exception:
                log.exception("could not release an Idempotency-Key claim")


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and all(0x20 < ord(c) < 0x7F for c in key)


def _request_hash(method: str, path: str, query: bytes, body: bytes) -> str:
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (ValueError, RecursionError):
        canonical = body  # not JSON: the bytes themselves
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)




class _Capture:
    """Passes the response through while keeping a copy of it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = [(k.lower(), v) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size <= _MAX_STORED:
                self.chunks.append(chunk)
        await self._send(message)

    def stored(self, box: SecretBox) -> dict[str, Any]:
        """Headers as they are; the body sealed, since some responses show a secret
        once (a webhook's signing secret) and it must not rest in clear text."""
        body = b"".join(self.chunks)
        kept = [[k.decode("latin-1"), v.decode("latin-1")]
                for k, v in self.headers if k in _KEPT_HEADERS]
        sealed = box.seal({"body_b64": base64.b64encode(body).decode()})
        return {"headers": kept, "sealed": sealed.decode() if sealed else ""}


async def _answer_repeat(
    stored: StoredKey, method: str, path: str, request_hash: str, box: SecretBox,
    scope: Scope, receive: Receive, send: Send,
) -> None:
    if (stored.method, stored.path, stored.request_hash) != (method, path, request_hash):
        await _problem(scope, receive, send, 422, "idempotency-key-reused",
                       "Idempotency-Key reused",
                       "this Idempotency-Key was already used for a different request; "
                       "use a new key for a new request")
        return
    if stored.status_code is None or stored.response is None:
        await _problem(scope, receive, send, 409, "idempotency-key-in-flight",
                       "Request in progress",
                       "a request with this Idempotency-Key is still being processed; "
                       "retry shortly", headers={"Retry-After": "1"})
        return
    response = stored.response
    if "sealed" in response:
        body = base64.b64decode(box.open(str(response["sealed"]).encode())["body_b64"])
    elif "body_b64" in response:
        body = base64.b64decode(response["body_b64"])
    else:
        body = str(response.get("body", "")).encode("utf-8")
    headers = [(str(k).encode("latin-1"), str(v).encode("latin-1"))
               for k, v in response.get("headers", [])]
    headers += [(b"content-length", str(len(body)).encode()),
                (b"idempotent-replayed", b"true")]
    await send({"type": "http.response.start", "status": stored.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _problem(
    scope: Scope, receive: Receive, send: Send, status: int, code: str, title: str,
    detail: str, headers: dict[str, str] | None = None,
) -> None:
    response = problem_response(status, code, title, detail,
                                instance=scope["path"], headers=headers)
    await response(scope, receive, send)
