"""The one gate every request body passes (a pure ASGI middleware).

Every body is bounded: a declared ``Content-Length`` over the limit is refused with a
413 before a byte is read, and a body that grows past it while arriving (chunked, or
a lying header) is refused as soon as it does. The body is then handed on whole, so
the routes and :class:`~app.api.idempotency.Idempotency` see at most ``max_bytes``.

JSON bodies are also checked for what no database column can store: the NUL
character and unpaired surrogates (``"\\u0000"``, ``"\\ud800"`` are valid JSON).
Such a body is a 422 problem naming the offending member, never a driver error.

The only exemption is a streamed upload, and only on its own method and path
(``POST /v1/images``): its body is the image itself, counted by its own limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.media import is_json
from app.api.problems import FieldError, json_pointer, problem_response

#: (method, path) of the routes whose bodies are streamed, not buffered.
Streamed = frozenset[tuple[str, str]]

_MAX_DEPTH = 256


class BodyLimit:
    """Counts body bytes as they arrive (Content-Length may be absent or wrong)."""

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: Streamed = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streamed:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and (
                len(declared) > 18 or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if b"\\u" in body and is_json(headers.get(b"content-type", b"").decode("latin-1")):
            bad = _unstorable(body)
            if bad is not None:
                detail = "must not contain NUL characters or unpaired surrogates"
                await problem_response(
                    422, "validation-error", "Request validation failed",
                    f"{bad or '/'}: {detail}", instance=scope["path"],
                    errors=[FieldError(pointer=bad, detail=detail)],
                )(scope, receive, send)
                return
        await self.app(scope, replay_body(body, receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(
            413, "request-body-too-large", "Request body too large",
            f"request bodies are limited to {self.max_bytes} bytes", instance=scope["path"],
            headers={"Connection": "close"},
        )(scope, receive, send)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive that yields the buffered body once, then defers to the real one."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _bad_text(text: str) -> bool:
    return "\x00" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def _unstorable(body: bytes) -> str | None:
    """The JSON pointer of the first string (or member name) that holds a NUL or an
    unpaired surrogate; None when there is none or the body is not JSON (the route's
    own validation answers that)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    for path, text in _strings(doc, [], 0):
        if _bad_text(text):
            return json_pointer(path)
    return None


def _strings(node: Any, path: list[int | str], depth: int
             ) -> Iterator[tuple[list[int | str], str]]:
    if depth > _MAX_DEPTH:
        return
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            if _bad_text(key):  # point at the object: the key itself cannot be shown
                yield path, key
            yield from _strings(value, [*path, key], depth + 1)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, [*path, i], depth + 1)
