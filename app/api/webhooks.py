"""/v1/webhooks: endpoints that receive the tenant's events, and their deliveries.

The signing secret is in the create and rotate-secret responses only. Updates and
deletes are conditional on the ETag (``"v<version>"``) when ``If-Match`` is sent.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from app.api.clouds import IfMatch, etag, parse_if_match
from app.api.deps import Context, Session, require
from app.api.idempotency import IdempotencyKeyHeader
from app.api.media import JsonOnly
from app.api.pagination import Cursor, Limit, Page, after_uuid, encode_cursor
from app.api.problems import problem_responses
from app.models.schemas.webhooks import (
    DeliveryOut,
    DeliveryStatus,
    WebhookCreate,
    WebhookCreated,
    WebhookOut,
    WebhookSecret,
    WebhookUpdate,
)
from app.services import webhooks as service
from app.services.tokens import Principal
from app.webhooks.policy import TargetPolicy

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

Reader = Annotated[Principal, Depends(require("webhooks:read"))]
Writer = Annotated[Principal, Depends(require("webhooks:write"))]
WebhookId = Annotated[uuid.UUID, Path(description="The webhook's id.")]
DeliveryId = Annotated[uuid.UUID, Path(description="The delivery's id.")]

_ETAG_HEADER = {"ETag": {"description": 'The version, for If-Match: `"v<version>"`.',
                         "schema": {"type": "string"}}}


class WebhookPage(Page[WebhookOut]):
    """A page of webhooks, newest first."""


class DeliveryPage(Page[DeliveryOut]):
    """A page of deliveries, newest first."""


def _policy(ctx: Context) -> TargetPolicy:
    return TargetPolicy.from_settings(ctx.settings)


@router.post(
    "", status_code=201, operation_id="create_webhook", response_model=WebhookCreated,
    summary="Register an endpoint (the response shows its signing secret, once)",
    responses={201: {"headers": _ETAG_HEADER},
               **problem_responses(400, 401, 403, 409, 413, 415, 422)},
)
async def create_webhook(
    body: Annotated[WebhookCreate, Body()], request: Request, response: Response,
    principal: Writer, _json: JsonOnly, session: Session, ctx: Context,
    idempotency_key: IdempotencyKeyHeader = None,
) -> WebhookCreated:
    created = await service.create(session, ctx.box, _policy(ctx), principal.tenant, body)
    response.headers["Location"] = str(request.url_for("get_webhook",
                                                       webhook_id=created.id).path)
    response.headers["ETag"] = etag(created.version)
    return created


@router.get(
    "", operation_id="list_webhooks", response_model=WebhookPage,
    summary="List endpoints, newest first", responses=problem_responses(401, 403, 422),
)
async def list_webhooks(
    principal: Reader, session: Session, limit: Limit = 50, cursor: Cursor = None,
) -> WebhookPage:
    page = await service.list_page(session, principal.tenant, after=after_uuid(cursor),
                                   limit=limit)
    return WebhookPage(items=page.items,
                       next_cursor=encode_cursor(*page.next_key) if page.next_key else None)


@router.get(
    "/{webhook_id}", operation_id="get_webhook", response_model=WebhookOut,
    summary="Read an endpoint (never its secret)",
    responses={200: {"headers": _ETAG_HEADER}, **problem_responses(401, 403, 404, 422)},
)
async def get_webhook(
    webhook_id: WebhookId, response: Response, principal: Reader, session: Session
) -> WebhookOut:
    hook = await service.get(session, principal.tenant, webhook_id)
    response.headers["ETag"] = etag(hook.version)
    return hook


@router.patch(
    "/{webhook_id}", operation_id="update_webhook", response_model=WebhookOut,
    summary="Change the URL, event types, description or active flag",
    responses={200: {"headers": _ETAG_HEADER},
               **problem_responses(400, 401, 403, 404, 412, 413, 415, 422)},
)
async def update_webhook(
    webhook_id: WebhookId, patch: Annotated[WebhookUpdate, Body()], response: Response,
    principal: Writer, _json: JsonOnly, session: Session, ctx: Context,
    if_match: IfMatch = None,
) -> WebhookOut:
    hook = await service.update(session, _policy(ctx), principal.tenant, webhook_id, patch,
                                versions=parse_if_match(if_match))
    response.headers["ETag"] = etag(hook.version)
    return hook


@router.delete(
    "/{webhook_id}", status_code=204, operation_id="delete_webhook",
    summary="Remove an endpoint and its deliveries",
    responses=problem_responses(401, 403, 404, 412, 422),
)
async def delete_webhook(
    webhook_id: WebhookId, principal: Writer, session: Session, if_match: IfMatch = None
) -> Response:
    await service.delete(session, principal.tenant, webhook_id,
                         versions=parse_if_match(if_match))
    return Response(status_code=204)


@router.post(
    "/{webhook_id}/rotate-secret", operation_id="rotate_webhook_secret",
    response_model=WebhookSecret,
    summary="Replace the signing secret (the old one keeps signing for an overlap)",
    responses=problem_responses(400, 401, 403, 404, 409, 422),
)
async def rotate_webhook_secret(
    webhook_id: WebhookId, principal: Writer, session: Session, ctx: Context,
    idempotency_key: IdempotencyKeyHeader = None,
) -> WebhookSecret:
    """Deliveries are signed with both secrets for `webhook_secret_overlap_seconds`,
    so receivers can switch to the new one without dropping any."""
    overlap = timedelta(seconds=ctx.settings.webhook_secret_overlap_seconds)
    return await service.rotate_secret(session, ctx.box, principal.tenant, webhook_id,
                                       overlap=overlap)


@router.get(
    "/{webhook_id}/deliveries", operation_id="list_webhook_deliveries",
    response_model=DeliveryPage, summary="Its deliveries, newest first",
    responses=problem_responses(401, 403, 404, 422),
)
async def list_webhook_deliveries(
    webhook_id: WebhookId, principal: Reader, session: Session,
    status: Annotated[list[DeliveryStatus] | None, Query(description="Any of these.")] = None,
    limit: Limit = 50, cursor: Cursor = None,
) -> DeliveryPage:
    page = await service.deliveries(session, principal.tenant, webhook_id,
                                    statuses=status or [], after=after_uuid(cursor),
                                    limit=limit)
    return DeliveryPage(items=page.items,
                        next_cursor=encode_cursor(*page.next_key) if page.next_key else None)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/redeliver", operation_id="redeliver_webhook",
    response_model=DeliveryOut, status_code=202,
    summary="Send a delivery again now (any status), with a fresh retry window",
    responses=problem_responses(400, 401, 403, 404, 409, 422),
)
async def redeliver_webhook(
    webhook_id: WebhookId, delivery_id: DeliveryId, principal: Writer, session: Session,
    idempotency_key: IdempotencyKeyHeader = None,
) -> DeliveryOut:
    return await service.redeliver(session, principal.tenant, webhook_id, delivery_id)
