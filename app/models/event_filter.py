"""Which events a reader sees: the filter the events API, the SSE streams and the event
bus share, matched in memory here and turned into SQL by :mod:`app.repositories.events`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from app.models.db import MigrationEvent


def split_type_filter(value: str) -> tuple[str, bool]:
    """``migration.completed`` -> exact; ``migration.`` or ``migration.*`` -> a prefix."""
    if value.endswith("*"):
        return value[:-1], True
    return value, value.endswith(".")


def type_matches(type_: str, patterns: Sequence[str]) -> bool:
    """Whether ``type_`` matches any filter value (see :func:`split_type_filter`)."""
    for pattern in patterns:
        text, prefix = split_type_filter(pattern)
        if type_ == text or (prefix and type_.startswith(text)):
            return True
    return False


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a reader sees: one tenant, optionally one migration, some types.

    ``areas`` are the type prefixes the caller's scopes allow (``migration.``,
    ``image.``, ...); None allows every type. With ``migration_events``, every event
    that belongs to a migration is allowed too, whatever its type (engines emit
    ``live_stream.*``, ``image.created``, ... inside a migration). The same filter
    drives the SQL of a page (:func:`app.repositories.events.clauses`) and the
    in-memory matching of live events (:meth:`matches`).
    """

    tenant: str
    migration_id: uuid.UUID | None = None
    types: tuple[str, ...] = ()
    areas: tuple[str, ...] | None = None
    migration_events: bool = False
    since: datetime | None = None
    until: datetime | None = None

    def matches_head(self, tenant: str, migration_id: uuid.UUID | None, type_: str) -> bool:
        """The checks a NOTIFY payload allows (no timestamp)."""
        if tenant != self.tenant:
            return False
        if self.migration_id is not None and migration_id != self.migration_id:
            return False
        if self.areas is not None and not any(type_.startswith(a) for a in self.areas) \
                and not (self.migration_events and migration_id is not None):
            return False
        return not self.types or type_matches(type_, self.types)

    def matches(self, row: MigrationEvent) -> bool:
        if not self.matches_head(row.tenant, row.migration_id, row.type):
            return False
        if self.since is not None and row.created_at < self.since:
            return False
        return self.until is None or row.created_at < self.until
