"""Request media types.

FastAPI parses a body as JSON only when the Content-Type says so; any other body is
handed to validation as raw bytes and fails with a puzzling "Input should be a valid
dictionary". :func:`require_json` answers such requests with a 415 problem that says
what to send instead. Declare ``_: JsonOnly`` after the principal in a route's
signature: dependencies run in that order, so authentication is still checked first.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_json(content_type: str) -> bool:
    """``application/json`` or a ``+json`` suffix type, parameters ignored."""
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


async def require_json(request: Request) -> None:
    """415 when a request carries a body that is not declared as JSON."""
    if request.method not in _BODY_METHODS:
        return
    headers = request.headers
    length = headers.get("content-length")
    has_body = (length is not None and length.strip() != "0") or "transfer-encoding" in headers
    if has_body and not is_json(headers.get("content-type", "")):
        raise HTTPException(
            415,
            "request bodies must be JSON: send Content-Type: application/json",
            headers={"Accept-Patch": "application/json, application/merge-patch+json"}
            if request.method == "PATCH" else None,
        )


JsonOnly = Annotated[None, Depends(require_json)]
