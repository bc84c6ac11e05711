"""/v1/images: the virtual image library.

Uploads are streamed (``Content-Type: application/octet-stream``), never buffered
whole; downloads honour ``Range`` (one range) and ``ETag``/``If-None-Match``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import Context, Session, require
from app.api.pagination import Cursor, Limit, Page, after_uuid, encode_cursor
from app.api.problems import problem_responses
from app.errors import AppError
from app.formats.base import FORMATS, RandomAccessSource
from app.models.schemas.images import ConversionFormat, ImageOut
from app.models.schemas.migrations import MigrationOut, MigrationView, Options
from app.services import images as service
from app.services.tokens import Principal

router = APIRouter(prefix="/images", tags=["images"])

Reader = Annotated[Principal, Depends(require("images:read"))]
Writer = Annotated[Principal, Depends(require("images:write"))]

_CHUNK = 1024 * 1024
#: Names are text without control characters (PostgreSQL text cannot even hold NUL).
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(AppError):
    status = 416
    code = "range-not-satisfiable"
    title = "Range not satisfiable"


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """Returns once the client has gone (call after the body was read: then the only
    message left to receive is the disconnect)."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


def _etag(image_id: uuid.UUID) -> str:
    return f'"{image_id}"'  # images are immutable: the id names the bytes


@router.post(
    "", status_code=201, operation_id="upload_image", response_model=ImageOut,
    responses=problem_responses(401, 403, 413, 422),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_image(
    request: Request, response: Response, principal: Writer, session: Session, ctx: Context,
    name: Annotated[str, Query(min_length=1, max_length=255, pattern=_PRINTABLE,
                               description="Image name.")],
    format: Annotated[
        Literal["raw", "qcow2", "vmdk", "vhd", "vhdx"] | None,
        Query(description=f"Declared format ({', '.join(FORMATS)}); checked against the "
              "bytes. Unset: detected."),
    ] = None,
) -> ImageOut:
    """Upload a disk image into the library (streamed; format probed and checked)."""
    image = await service.upload(
        session, ctx.store, principal.tenant, name=name, declared_format=format,
        body=request.stream(), max_bytes=ctx.settings.max_image_bytes,
        budget=service.CheckBudget(ctx.settings.image_check_min_seconds,
                                   ctx.settings.image_check_min_bytes_per_second),
        gone=_disconnected(request),
    )
    response.headers["Location"] = f"/v1/images/{image.id}"
    return ImageOut.model_validate(image)


@router.get(
    "", operation_id="list_images", response_model=Page[ImageOut],
    responses=problem_responses(401, 403, 422),
)
async def list_images(
    principal: Reader, session: Session, limit: Limit = 50, cursor: Cursor = None,
) -> Page[ImageOut]:
    """The tenant's library images, newest first."""
    rows = await service.list_images(session, principal.tenant, limit=limit + 1,
                                     after=after_uuid(cursor))
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if more else None
    return Page[ImageOut](
        items=[ImageOut.model_validate(r) for r in rows],
        next_cursor=encode_cursor(last.created_at, last.id) if last else None,
    )


@router.get(
    "/{image_id}", operation_id="get_image", response_model=ImageOut,
    responses=problem_responses(401, 403, 404, 422),
)
async def get_image(image_id: uuid.UUID, principal: Reader, session: Session) -> ImageOut:
    return ImageOut.model_validate(await service.get(session, principal.tenant, image_id))


#: Positions longer than this many digits are past the end of any image (and ``int`` of
#: thousands of digits is refused by Python, or slow).
_MAX_DIGITS = 19


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 1 << 63


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single ``bytes=`` range, None for the whole object."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None  # unsupported forms (multiple ranges) get the whole object (RFC 9110)
    first, last = match.group(1), match.group(2)
    if first:
        start = _position(first)
        end = min(_position(last) + 1, size) if last else size
    else:
        start, end = max(size - _position(last), 0), size
    if start >= size or start >= end:
        shown = header if len(header) <= 64 else header[:61] + "..."
        raise RangeNotSatisfiable(f"range {shown!r} is outside the {size}-byte image",
                                  extra={"size": size})
    return start, end


async def _stream(source: RandomAccessSource, start: int, end: int) -> AsyncIterator[bytes]:
    try:
        pos = start
        while pos < end:
            data = await source.read_at(pos, min(_CHUNK, end - pos))
            if not data:
                break
            pos += len(data)
            yield data
    finally:
        await source.close()


@router.get(
    "/{image_id}/content", operation_id="download_image",
    responses={200: {"content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}, "description": "The image bytes"},
        206: {"description": "The requested range"}, 304: {"description": "Not modified"},
        **problem_responses(401, 403, 404, 416, 422)},
)
async def download_image(
    image_id: uuid.UUID, principal: Reader, session: Session, ctx: Context,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(alias="If-None-Match")] = None,
) -> Response:
    """The stored image file, streamed; supports one byte range."""
    image = await service.get(session, principal.tenant, image_id)
    etag = _etag(image.id)
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    source = await service.open_content(ctx.store, image)
    try:
        wanted = _parse_range(range_, source.size)
    except RangeNotSatisfiable:
        await source.close()
        raise
    start, end = wanted or (0, source.size)
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Content-Length": str(end - start),
               "Content-Disposition": f'attachment; filename="{image.id}.{image.format}"'}
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{source.size}"
    return StreamingResponse(_stream(source, start, end), status_code=206 if wanted else 200,
                             media_type="application/octet-stream", headers=headers)


class ConversionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: ConversionFormat = Field(description="The format of the new image.")
    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=_PRINTABLE,
                             description="Name of the job and the new image.")
    options: Options = Field(default_factory=Options,
                             description="Bandwidth cap of the conversion.")


@router.post(
    "/{image_id}/conversions", status_code=202, operation_id="convert_image",
    response_model=MigrationOut, responses=problem_responses(400, 401, 403, 404, 409, 422),
)
async def convert_image(
    image_id: uuid.UUID, body: ConversionRequest, response: Response, principal: Writer,
    session: Session,
) -> MigrationView:
    """Convert a library image into another format: a job run by workers like a
    migration (watch it at the Location); it ends by adding the new image, whose
    ``parent_id`` is this one."""
    job = await service.request_conversion(session, principal.tenant, image_id, body.format,
                                           body.name, body.options.model_dump(mode="json"))
    response.headers["Location"] = f"/v1/migrations/{job.id}"
    return job


@router.delete(
    "/{image_id}", status_code=204, operation_id="delete_image",
    responses=problem_responses(401, 403, 404, 422),
)
async def delete_image(
    image_id: uuid.UUID, principal: Writer, session: Session, ctx: Context,
    after: BackgroundTasks,
) -> Response:
    """Remove an image from the library (its bytes too)."""
    location = await service.remove(session, principal.tenant, image_id)
    # Background tasks run after the session dependency committed (and not at all when
    # the commit fails), so the bytes go only once the row is gone for good.
    after.add_task(service.delete_content, ctx.store, location)
    return Response(status_code=204)
