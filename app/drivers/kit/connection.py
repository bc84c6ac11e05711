"""What a driver is built from: a cloud's kind, typed settings and decrypted credentials.

The engines read the cloud row and decrypt its credentials
(:func:`app.engines.clouds.open_cloud`); drivers never touch the database.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydantic import BaseModel

from app.models.enums import CloudKind


@dataclass(frozen=True, slots=True)
class CloudConnection:
    """Typed settings (the kind's settings model) and credentials (or None)."""

    id: uuid.UUID
    kind: CloudKind
    settings: BaseModel
    credentials: BaseModel | None

    def __repr__(self) -> str:  # credentials are SecretStr already; keep them out anyway
        return f"CloudConnection(id={self.id}, kind={self.kind.value})"
