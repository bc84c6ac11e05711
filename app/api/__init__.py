"""HTTP layer: one router module per resource; no business logic and no SQL here."""

from __future__ import annotations

from fastapi import APIRouter


def routers() -> list[APIRouter]:
    """Every ``/v1`` router, in the order they appear in the OpenAPI document."""
    from app.api import clouds, events, images, migrations, webhooks

    return [clouds.router, migrations.router, images.router, events.router, webhooks.router]
