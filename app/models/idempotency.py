"""What an ``Idempotency-Key`` claim returns: the key is this request's, or it was
already claimed (and perhaps answered) by an earlier one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request holds the key. ``created_at`` identifies the claim: completing or
    releasing it never touches a later claim of the same key."""

    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An existing claim: who made it, for what request, and its response if done."""

    method: str
    path: str
    request_hash: str
    status_code: int | None
    response: dict[str, Any] | None
