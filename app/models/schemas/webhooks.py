"""Schemas of webhook endpoints and their deliveries.

The signing secret appears in exactly two responses: :class:`WebhookCreated` (create)
and :class:`WebhookSecret` (rotate). Every other response omits it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

EventTypePattern = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^(\*|[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?)$",
          description="An event type (`migration.completed`), a prefix pattern "
          "(`migration.*`) or `*`."),
]
Url = Annotated[
    str,
    Field(min_length=8, max_length=2048,
          description="Where deliveries are POSTed: https (plain http only for hosts the "
          "service allows), not resolving to loopback, private, link-local or metadata "
          "addresses unless the service allows them."),
]
#: Text without control characters (PostgreSQL text cannot even hold NUL).
Description = Annotated[str, Field(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]
EventTypes = Annotated[
    list[EventTypePattern],
    Field(max_length=50, description="Which events to deliver; empty: all of them."),
]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    event_types: EventTypes = Field(default_factory=list)
    description: Description = ""
    active: bool = True


class WebhookUpdate(BaseModel):
    """Fields to change; the ones left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    event_types: EventTypes | None = None
    description: Description | None = None
    active: bool | None = Field(
        default=None, description="false pauses deliveries (they wait); true resumes, "
        "also after the service disabled a failing endpoint.")


class WebhookOut(BaseModel):
    """A webhook endpoint. Its secret is never shown again after create/rotate."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    description: str
    event_types: list[str]
    active: bool
    disabled_reason: str | None = Field(
        description="Why the service disabled it (failing for too long); null otherwise.")
    failing_since: datetime | None = Field(
        description="Start of the current run of failed deliveries; null when healthy.")
    previous_secret_expires_at: datetime | None = Field(
        description="Until then deliveries also carry a signature made with the previous "
        "secret (after a rotation).")
    version: int
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookOut):
    """The new endpoint and its signing secret, shown this once."""

    secret: str = Field(description="`whsec_...`: verify deliveries with it (Standard "
                        "Webhooks). Store it now: it is never shown again.")


class WebhookSecret(BaseModel):
    """A freshly rotated signing secret, shown this once."""

    secret: str = Field(description="The new `whsec_...` secret.")
    previous_secret_expires_at: datetime | None = Field(
        description="Until then deliveries are signed with the old secret as well.")


class DeliveryStatus(StrEnum):
    pending = "pending"
    succeeded = "succeeded"
    dead = "dead"


class DeliveryOut(BaseModel):
    """One event's delivery to one endpoint, with the outcome of its last attempt."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    webhook_id: uuid.UUID
    event_id: int
    event_type: str
    status: DeliveryStatus = Field(
        description="pending (waiting for its first attempt or a retry), succeeded, or "
        "dead (retries exhausted; redeliver to try again).")
    attempts: int
    last_attempt_at: datetime | None
    response_status: int | None = Field(description="HTTP status of the last attempt.")
    latency_ms: int | None = Field(description="Duration of the last attempt.")
    last_error: str | None = Field(description="Why the last attempt failed.")
    next_attempt_at: datetime | None = Field(description="When it is tried next (pending).")
    created_at: datetime
