"""/v1/migrations."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/migrations", tags=["migrations"])
