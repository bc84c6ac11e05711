"""What engines get from the process: built once at start, passed to every engine."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.storage.base import ImageStore


@dataclass(frozen=True, slots=True)
class EngineDeps:
    """Process-wide things engines use (built once, passed in)."""

    settings: Settings
    db: Database
    box: SecretBox
    store: ImageStore
