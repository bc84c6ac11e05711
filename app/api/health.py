"""Liveness and readiness probes (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.api.deps import Context
from app.api.problems import problem_responses
from app.db import current_revision, head_revision
from app.errors import AppError

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    schema_revision: str | None
    worker: str | None = Field(
        default=None, description="The in-process worker (`vmigrate serve` without "
        "`--no-worker`): `ok`, or why not; null when this process runs none.")
    webhooks: str | None = Field(
        default=None, description="The in-process webhook dispatcher: `ok`, or why not; "
        "null when this process runs none.")


class NotReady(AppError):
    status = 503
    code = "not-ready"
    title = "Not ready"
    retryable = True


@router.get("/healthz", operation_id="health", response_model=Health)
async def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get(
    "/readyz", operation_id="readiness", response_model=Readiness,
    responses=problem_responses(503),
)
async def readyz(ctx: Context, request: Request) -> Readiness:
    """The database is reachable, its schema is at the head and the in-process worker
    and webhook dispatcher (if any) work."""
    try:
        await ctx.db.ping()
        revision = await current_revision(ctx.db)
    except Exception as exc:  # any driver error means "not ready"
        raise NotReady(f"database unreachable: {type(exc).__name__}") from exc
    if revision != head_revision():
        raise NotReady(f"database schema at {revision}, expected {head_revision()}")
    background = getattr(request.app.state, "background", None)
    parts = background.health() if background is not None else {}
    broken = {name: state for name, state in parts.items() if state != "ok"}
    if broken:
        raise NotReady("; ".join(f"{name}: {state}" for name, state in broken.items()),
                       extra={"errors": [{"pointer": f"/{name}", "detail": state}
                                         for name, state in broken.items()]})
    return Readiness(status="ok", database="ok", schema_revision=revision, **parts)
