"""/v1/migrations: create, list, read, run, cancel, remove, and the event log.

HTTP only: authentication, parameters, status codes and headers. The use cases are in
:mod:`app.services.migrations`; every error is a problem document typed in OpenAPI.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from app.api import sse
from app.api.deps import Context, get_session, require
from app.api.pagination import Cursor, Limit, Page, decode_cursor, encode_cursor
from app.api.problems import problem_responses
from app.errors import InvalidInput
from app.models.enums import MigrationStatus, MigrationType
from app.models.event_filter import EventFilter
from app.models.schemas.migrations import (
    EventPage,
    MigrationCreate,
    MigrationOut,
    MigrationView,
    dump_view,
)
from app.services import migrations as service
from app.services.events import StreamStart
from app.services.migrations import PageKey
from app.services.tokens import Principal

router = APIRouter(prefix="/migrations", tags=["migrations"])

Reader = Annotated[Principal, Depends(require("migrations:read"))]
Writer = Annotated[Principal, Depends(require("migrations:write"))]
#: Function-scoped so the transaction commits *before* the response is sent: a client
#: that got 201 can rely on the row (request-scoped cleanup runs after sending).
Tx = Annotated[AsyncSession, Depends(get_session, scope="function")]
MigrationId = Annotated[uuid.UUID, Path(description="The migration's id.")]

_READ = problem_responses(401, 403, 404, 422)


class MigrationPage(Page[MigrationOut]):
    """A page of migrations, newest first."""


class MigrationBatch(BaseModel):
    """Migrations to create together: all of them, or (any problem) none."""

    items: list[MigrationCreate] = Field(
        min_length=1, max_length=service.MAX_BATCH,
        description=f"1 to {service.MAX_BATCH} create bodies, as `POST /v1/migrations` "
        "takes them. A problem in any item refuses the whole batch, each problem at "
        "`/items/<index>/...`.")


class CreatedMigrations(BaseModel):
    items: list[MigrationOut] = Field(description="The migrations created, in the "
                                      "order of the request's items.")


JSON_MEDIA_TYPE = "application/json"


def _json(content: bytes, status_code: int = 200) -> Response:
    """The response as already serialised: validated once by the service, not again by
    FastAPI's response model (which still documents it in OpenAPI)."""
    return Response(content=content, status_code=status_code, media_type=JSON_MEDIA_TYPE)


_ACT = problem_responses(401, 403, 404, 409, 422)


def _page_key(cursor: str | None) -> PageKey | None:
    if cursor is None:
        return None
    created_at, raw_id = decode_cursor(cursor)
    try:
        row_id = uuid.UUID(raw_id)
    except ValueError:
        row_id = None
    if row_id is None or created_at.tzinfo is None:
        raise InvalidInput(
            "cursor is not one this API returned",
            extra={"errors": [{"pointer": "/cursor", "detail": "malformed cursor"}]},
        )
    return created_at, row_id


@router.post(
    "",
    status_code=201,
    response_model=MigrationOut,
    operation_id="create_migration",
    summary="Create a migration (and queue it with `run: true`)",
    responses=problem_responses(400, 401, 403, 413, 422),
)
async def create_migration(
    body: MigrationCreate,
    request: Request,
    ctx: Context,
    tx: Tx,
    who: Writer,
) -> Response:
    view = await service.create(tx, ctx.box, who.tenant, body)
    out = _json(dump_view(view), 201)
    out.headers["Location"] = request.url_for("get_migration", migration_id=view.id).path
    return out


@router.post(
    "/batch",
    status_code=201,
    response_model=CreatedMigrations,
    operation_id="create_migrations",
    summary="Create many migrations at once (all or none)",
    responses=problem_responses(400, 401, 403, 413, 422),
)
async def create_migrations(
    batch: Annotated[MigrationBatch, Body()],
    ctx: Context,
    tx: Tx,
    who: Writer,
) -> Response:
    """The cheap way to create many: one transaction and a few multi-row statements for
    the whole batch (items with `run: true` are queued one by one). The request body is
    limited like every other (`VMIGRATE_MAX_BODY_BYTES`)."""
    items = await service.create_many(tx, ctx.box, who.tenant, batch.items)
    return _json(b'{"items":[' + b",".join(items) + b"]}", 201)


@router.get(
    "",
    response_model=MigrationPage,
    operation_id="list_migrations",
    summary="List migrations, newest first",
    responses=problem_responses(401, 403, 422),
)
async def list_migrations(
    tx: Tx,
    who: Reader,
    status: Annotated[list[MigrationStatus] | None, Query(description="Any of these.")] = None,
    type: Annotated[list[MigrationType] | None, Query(description="Any of these.")] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    page = await service.list_json(
        tx,
        who.tenant,
        statuses=status or [],
        types=type or [],
        limit=limit,
        before=_page_key(cursor),
    )
    key = page.next_key
    cursor_json = json.dumps(encode_cursor(*key)).encode() if key else b"null"
    return _json(b'{"items":[' + b",".join(page.items) + b'],"next_cursor":'
                 + cursor_json + b"}")


@router.get(
    "/{migration_id}",
    response_model=MigrationOut,
    operation_id="get_migration",
    summary="Read a migration",
    responses=_READ,
)
async def get_migration(migration_id: MigrationId, tx: Tx, who: Reader) -> Response:
    return _json(await service.get_json(tx, who.tenant, migration_id))


@router.post(
    "/{migration_id}/run",
    response_model=MigrationOut,
    operation_id="run_migration",
    summary="Queue it (from pending, failed or cancelled)",
    responses=_ACT,
)
async def run_migration(migration_id: MigrationId, tx: Tx, who: Writer) -> MigrationView:
    return await service.run(tx, who.tenant, migration_id)


@router.post(
    "/{migration_id}/cancel",
    response_model=MigrationOut,
    operation_id="cancel_migration",
    responses=_ACT,
    summary="Cancel it (pending/queued: at once; running: after cleanup)",
)
async def cancel_migration(migration_id: MigrationId, tx: Tx, who: Writer) -> MigrationView:
    return await service.cancel(tx, who.tenant, migration_id)


@router.delete(
    "/{migration_id}",
    status_code=204,
    operation_id="delete_migration",
    summary="Remove it (not while queued, running or cancelling)",
    responses=_ACT,
)
async def delete_migration(migration_id: MigrationId, tx: Tx, who: Writer) -> Response:
    await service.delete(tx, who.tenant, migration_id)
    return Response(status_code=204)


@router.get(
    "/{migration_id}/events",
    response_model=EventPage,
    operation_id="list_migration_events",
    summary="Its event log, oldest first (or a live stream)",
    responses={200: {"content": sse.STREAM_CONTENT}, **problem_responses(401, 403, 404, 422,
                                                                         503)},
)
async def list_migration_events(
    migration_id: MigrationId,
    request: Request,
    ctx: Context,
    tx: Tx,
    who: Reader,
    after: Annotated[
        int,
        Query(
            ge=0,
            le=2**31 - 1,
            description="Only events with a greater seq (a previous page's `next_after`).",
        ),
    ] = 0,
    limit: Limit = 50,
    last_event_id: sse.LastEventId = None,
) -> EventPage | Response:
    """With `Accept: text/event-stream`, its whole log (or what follows `Last-Event-ID`)
    as Server-Sent Events, then live events as they happen."""
    page = await service.events(tx, who.tenant, migration_id, after=after, limit=limit)
    if sse.wants_stream(request):
        where = EventFilter(tenant=who.tenant, migration_id=migration_id)
        return await sse.stream_response(
            ctx, where, start=StreamStart(position=last_event_id or 0))
    return page
