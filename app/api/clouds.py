"""/v1/clouds: register the clouds and hypervisors migrations read from and write to.

Credentials are write-only: accepted on create and update, never returned (only the
names of the fields set, ``credentials_set``). Updates are conditional on the ETag
(``"v<version>"``) when ``If-Match`` is sent.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response

from app.api.deps import Context, Session, require
from app.api.idempotency import IdempotencyKeyHeader
from app.api.media import JsonOnly
from app.api.pagination import Cursor, Limit, Page, decode_cursor, encode_cursor
from app.api.problems import problem_responses
from app.errors import InvalidInput
from app.models.enums import CloudKind
from app.models.schemas.clouds import CloudOut, CloudUpdate
from app.services import clouds as service
from app.services.clouds import CloudCreate, CloudKindOut
from app.services.tokens import Principal

router = APIRouter(prefix="/clouds", tags=["clouds"])

Reader = Annotated[Principal, Depends(require("clouds:read"))]
Writer = Annotated[Principal, Depends(require("clouds:write"))]
IfMatch = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description='The ETag from a GET (`"v3"`): the change applies only if the cloud '
        "is still at that version, else 412.",
    ),
]

_ETAG_HEADER = {"ETag": {"description": 'The version, for If-Match: `"v<version>"`.',
                         "schema": {"type": "string"}}}
_CREATED_HEADERS = {**_ETAG_HEADER, "Location": {"description": "URL of the new cloud.",
                                                 "schema": {"type": "string"}}}

_ETAG = re.compile(r'^"v([0-9]{1,9})"$')


def etag(version: int) -> str:
    return f'"v{version}"'


def parse_if_match(value: str | None) -> frozenset[int] | None:
    """The versions an ``If-Match`` accepts; None for no header or ``*``.

    Weak (``W/``) or foreign tags never match (RFC 9110 uses strong comparison), so
    they end up as an empty set: always 412.
    """
    if value is None or value.strip() == "*":
        return None
    versions = set()
    for tag in value.split(","):
        match = _ETAG.match(tag.strip())
        if match:
            versions.add(int(match.group(1)))
    return frozenset(versions)


def _after(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    created, raw_id = decode_cursor(cursor)
    try:
        return created, uuid.UUID(raw_id)
    except ValueError:
        raise InvalidInput(
            "cursor is not one this API returned",
            extra={"errors": [{"pointer": "/cursor", "detail": "malformed cursor"}]},
        ) from None


@router.post(
    "", status_code=201, operation_id="create_cloud", response_model=CloudOut,
    responses={201: {"headers": _CREATED_HEADERS},
               **problem_responses(400, 401, 403, 409, 413, 415, 422)},
)
async def create_cloud(
    body: Annotated[CloudCreate, Body()], request: Request, response: Response,
    principal: Writer, _json: JsonOnly, session: Session, ctx: Context,
    idempotency_key: IdempotencyKeyHeader = None,
) -> CloudOut:
    """Register a cloud. The settings and credentials fields depend on `kind`."""
    cloud = await service.create_cloud(session, ctx.box, principal.tenant, body)
    response.headers["Location"] = request.url_for("get_cloud", cloud_id=cloud.id).path
    response.headers["ETag"] = etag(cloud.version)
    return cloud


@router.get(
    "", operation_id="list_clouds", response_model=Page[CloudOut],
    responses=problem_responses(401, 403, 422),
)
async def list_clouds(
    principal: Reader, session: Session, ctx: Context,
    kind: Annotated[CloudKind | None, Query(description="Only clouds of this kind.")] = None,
    limit: Limit = 50, cursor: Cursor = None,
) -> Page[CloudOut]:
    """The tenant's clouds, newest first."""
    page = await service.list_clouds(
        session, ctx.box, principal.tenant, kind=kind, after=_after(cursor), limit=limit
    )
    last = page.items[-1] if page.more else None
    return Page[CloudOut](
        items=page.items,
        next_cursor=encode_cursor(last.created_at, last.id) if last else None,
    )


@router.get(
    "/kinds", operation_id="list_cloud_kinds", response_model=list[CloudKindOut],
    responses=problem_responses(401, 403),
)
async def list_cloud_kinds(principal: Reader) -> list[CloudKindOut]:
    """The cloud kinds this deployment has drivers for: what each can do in a migration,
    its disk formats, and its settings, credentials and placement schemas. A kind not
    listed is refused by `POST /v1/clouds`."""
    return service.cloud_kinds()


@router.get(
    "/{cloud_id}", operation_id="get_cloud", response_model=CloudOut,
    responses={200: {"headers": _ETAG_HEADER}, **problem_responses(401, 403, 404, 422)},
)
async def get_cloud(
    cloud_id: uuid.UUID, response: Response, principal: Reader, session: Session, ctx: Context
) -> CloudOut:
    """One cloud (never its credentials' values). The ETag is its version."""
    cloud = await service.get_cloud(session, ctx.box, principal.tenant, cloud_id)
    response.headers["ETag"] = etag(cloud.version)
    return cloud


@router.patch(
    "/{cloud_id}", operation_id="update_cloud", response_model=CloudOut,
    responses={200: {"headers": _ETAG_HEADER},
               **problem_responses(400, 401, 403, 404, 409, 412, 413, 415, 422)},
)
async def update_cloud(
    cloud_id: uuid.UUID, patch: Annotated[CloudUpdate, Body()], response: Response,
    principal: Writer, _json: JsonOnly, session: Session, ctx: Context,
    if_match: IfMatch = None,
) -> CloudOut:
    """Change the name, settings or credentials (each replaced as a whole when given)."""
    cloud = await service.update_cloud(
        session, ctx.box, principal.tenant, cloud_id, patch, versions=parse_if_match(if_match)
    )
    response.headers["ETag"] = etag(cloud.version)
    return cloud


@router.delete(
    "/{cloud_id}", status_code=204, operation_id="delete_cloud",
    responses=problem_responses(401, 403, 404, 409, 412, 422),
)
async def delete_cloud(
    cloud_id: uuid.UUID, principal: Writer, session: Session, if_match: IfMatch = None
) -> Response:
    """Remove a cloud; 409 while an unfinished migration uses it."""
    await service.delete_cloud(
        session, principal.tenant, cloud_id, versions=parse_if_match(if_match)
    )
    return Response(status_code=204)
