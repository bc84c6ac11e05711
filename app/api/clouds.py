"""/v1/clouds."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/clouds", tags=["clouds"])
