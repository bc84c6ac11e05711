"""Cursor pagination, newest first: the cursor encodes the last row's (created_at, id)."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, Field

from app.errors import InvalidInput

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        default=None, description="Pass as `cursor` to get the next page; null on the last page."
    )


def encode_cursor(created_at: datetime, row_id: uuid.UUID | int) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_OLDEST = datetime.min.replace(tzinfo=UTC)
_NEWEST = datetime.max.replace(tzinfo=UTC)


def utc(value: datetime) -> datetime:
    """``value`` in UTC (no offset: taken as UTC), clamped to what Python can represent:
    ``0001-01-01T00:00:00+14:00`` is before every row, not an ``OverflowError``."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        offset = value.utcoffset()
        return _OLDEST if offset is not None and offset.total_seconds() > 0 else _NEWEST


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at in UTC, id) of a cursor; 422 for anything this API did not make
    (its timestamps always carry an offset)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("no offset")
        return when.astimezone(UTC), str(row_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, RecursionError) as exc:
        raise InvalidInput(
            "cursor is not one this API returned",
            extra={"errors": [{"pointer": "/cursor", "detail": "malformed cursor"}]},
        ) from exc


Limit = Annotated[int, Query(ge=1, le=200, description="Page size.")]
Cursor = Annotated[str | None, Query(max_length=512, description="From `next_cursor`.")]


def after_uuid(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """Decode a cursor over rows keyed by (created_at, UUID id); None for the first page."""
    if cursor is None:
        return None
    created, raw_id = decode_cursor(cursor)
    try:
        return created, uuid.UUID(raw_id)
    except ValueError:
        raise InvalidInput(
            "cursor is not one this API returned",
            extra={"errors": [{"pointer": "/cursor", "detail": "malformed cursor"}]},
        ) from None
