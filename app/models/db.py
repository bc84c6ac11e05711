"""Typed ORM tables. Alembic (``alembic/``) is the only way the schema changes;
``tests/integration/test_schema.py`` proves these models and the migrations agree."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.models.enums import MigrationStatus, StepStatus
from app.models.json import JSON

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: type[MigrationStatus] | type[StepStatus]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {JSON: JSONB, datetime: DateTime(timezone=True)}


def _now() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    #: SHA-256 of the whole token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The first characters of the token, to recognise it in listings.
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(64)))
    created_at: Mapped[datetime] = _now()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Cloud(Base):
    __tablename__ = "clouds"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_clouds_tenant_name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    settings: Mapped[JSON] = mapped_column(default=dict)
    #: Fernet token of the JSON credentials; never leaves the service decrypted.
    credentials: Mapped[bytes | None] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class Migration(Base):
    __tablename__ = "migrations"
    __table_args__ = (
        Index("ix_migrations_tenant_created", "tenant", "created_at", "id"),
        Index("ix_migrations_runnable", "status", "lease_expires_at"),
        Index("ix_migrations_source_key", "source_key", "status"),
        CheckConstraint(_one_of("status", MigrationStatus), name="status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128), default="")
    type: Mapped[str] = mapped_column(String(32))
    mode: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    #: Name of the step being run (or last run).
    phase: Mapped[str | None] = mapped_column(String(32))
    #: The validated request, without secrets.
    spec: Mapped[JSON]
    #: What the per-source-host claim limit counts by: the source's host when the
    #: request names one, else its cloud id; "" when the source is no host (a library
    #: image). Written on insert from the typed request (revision 0004 backfilled it).
    source_key: Mapped[str] = mapped_column(String(255), default="", server_default="")
    #: Fernet token of the request's secrets (passwords, keys).
    secrets: Mapped[bytes | None] = mapped_column(LargeBinary)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rate: Mapped[int] = mapped_column(BigInteger, default=0)
    checkpoint: Mapped[JSON | None]
    error: Mapped[JSON | None]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    #: Fencing token: bumped on every claim; writes carry the epoch they read.
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1)
    #: Sequence number of the last event written for this migration; bumped by the
    #: same UPDATE that writes the event, so events are numbered without gaps or races.
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    steps: Mapped[list[MigrationStep]] = relationship(
        order_by="MigrationStep.position", cascade="all, delete-orphan", lazy="selectin"
    )


class MigrationStep(Base):
    __tablename__ = "migration_steps"
    __table_args__ = (
        UniqueConstraint("migration_id", "position", name="uq_migration_steps_pos"),
        CheckConstraint(_one_of("status", StepStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    migration_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("migrations.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(32))
    #: Cleanup steps also run (in reverse order) after a failure or cancel.
    cleanup: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    result: Mapped[JSON | None]
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class MigrationEvent(Base):
    """Append-only log of transitions and notable steps (events API, SSE, webhooks)."""

    __tablename__ = "migration_events"
    __table_args__ = (
        UniqueConstraint("migration_id", "seq", name="uq_migration_events_seq"),
        Index("ix_migration_events_tenant_id", "tenant", "id"),
        Index("ix_migration_events_tenant_position", "tenant", "position"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64))
    migration_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("migrations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[JSON] = mapped_column(default=dict)
    created_at: Mapped[datetime] = _now()
    #: Commit order across all events: set by a trigger when the writing transaction
    #: commits (migration 0003), so None only inside that transaction. Streams resume
    #: by position, never by id (ids are allocated before commit).
    position: Mapped[int | None] = mapped_column(BigInteger, default=None)


class VirtualImage(Base):
    __tablename__ = "virtual_images"
    __table_args__ = (Index("ix_virtual_images_tenant_created", "tenant", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    virtual_size: Mapped[int] = mapped_column(BigInteger, default=0)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    digest: Mapped[str | None] = mapped_column(String(80))
    location: Mapped[str | None] = mapped_column(Text)
    migration_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("migrations.id", ondelete="SET NULL")
    )
    cloud_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("clouds.id", ondelete="SET NULL"))
    server: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("virtual_images.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = _now()


class IdempotencyKey(Base):
    """The first response to a POST carrying an ``Idempotency-Key``."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[JSON | None]
    created_at: Mapped[datetime] = _now()


class Webhook(Base):
    """An endpoint that receives the tenant's events, signed per Standard Webhooks."""

    __tablename__ = "webhooks"
    __table_args__ = (Index("ix_webhooks_tenant_created", "tenant", "created_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(255), default="")
    #: Exact types or ``prefix.*`` patterns; empty means every event.
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String(64)), default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Fernet token of ``{"current": "whsec_...", "previous": "whsec_..." | null}``.
    secrets: Mapped[bytes] = mapped_column(LargeBinary)
    #: Until then deliveries are signed with the previous secret too.
    previous_secret_expires_at: Mapped[datetime | None]
    #: Start of the current run of failed attempts; None after any success.
    failing_since: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()


class WebhookDelivery(Base):
    """The transactional outbox: one row per (event, matching webhook).

    Written by the ``migration_events`` insert trigger in the event's own transaction,
    so a committed event always has its deliveries and a rolled-back one has none.
    The event is copied, because events go with their migration when it is removed.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_webhook_created", "webhook_id", "created_at", "id"),
        CheckConstraint("status IN ('pending', 'succeeded', 'dead')", name="status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(64))
    migration_id: Mapped[uuid.UUID | None]
    event_seq: Mapped[int] = mapped_column(Integer)
    payload: Mapped[JSON]
    event_created_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    #: When due (pending); while an attempt is in flight, when its claim lapses.
    next_attempt_at: Mapped[datetime] = _now()
    #: Retries stop (status ``dead``) once this plus the retry window has passed.
    retry_from: Mapped[datetime] = _now()
    last_attempt_at: Mapped[datetime | None]
    response_status: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
