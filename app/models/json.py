"""The one alias for a JSON object as it is persisted (JSONB columns) or crosses the API.

Only the edges use it: the ORM columns, the repositories that read and write them, and
the API's bodies. Inside the engines, specs, step results and checkpoints are typed
models (:mod:`app.models.schemas.specs`, :mod:`app.engines.results`), dumped to this
shape only where they are stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import JsonValue

JSON = dict[str, Any]
#: What an event carries besides its type: JSON values by name (typed, unlike ``JSON``).
EventPayload = Mapping[str, JsonValue]

__all__ = ["JSON", "EventPayload"]
