"""events and webhooks: webhooks, webhook_deliveries (the outbox), and the event trigger

The trigger on ``migration_events`` makes every inserted event, whoever inserts it,
(1) write one ``webhook_deliveries`` row per active webhook of the tenant whose type
filter matches, and (2) ``pg_notify`` the event's id, tenant, type and migration on
channel ``vmigrate_events``. Both happen in the inserting transaction: a rolled-back
event leaves no delivery and wakes nobody (NOTIFY is sent at commit).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

#: The NOTIFY channel ``vmigrate_events`` is ``app.events.bus.CHANNEL``.
_FUNCTION = """
CREATE FUNCTION vmigrate_event_published() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (
        id, tenant, webhook_id, event_id, event_type, migration_id, event_seq, payload,
        event_created_at, status, attempts, next_attempt_at, retry_from, created_at
    )
    SELECT gen_random_uuid(), w.tenant, w.id, NEW.id, NEW.type, NEW.migration_id, NEW.seq,
           NEW.payload, NEW.created_at, 'pending', 0, now(), now(), now()
    FROM webhooks w
    WHERE w.tenant = NEW.tenant
      AND w.active
      AND (cardinality(w.event_types) = 0 OR EXISTS (
            SELECT 1 FROM unnest(w.event_types) AS pattern
            WHERE pattern = NEW.type
               OR pattern = '*'
               OR (right(pattern, 2) = '.*'
                   AND starts_with(NEW.type, left(pattern, -1)))));
    PERFORM pg_notify('vmigrate_events', json_build_object(
        'id', NEW.id, 'tenant', NEW.tenant, 'type', NEW.type,
        'migration_id', NEW.migration_id)::text);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("description", sa.String(length=255), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.String(length=64)), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("secrets", sa.LargeBinary(), nullable=False),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    op.create_index(
        "ix_webhooks_tenant_created", "webhooks", ["tenant", "created_at", "id"], unique=False
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("webhook_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("migration_id", sa.Uuid(), nullable=True),
        sa.Column("event_seq", sa.Integer(), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("event_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column(
            "next_attempt_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "retry_from", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'dead')",
            name=op.f("ck_webhook_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"],
        unique=False,
    )
    op.create_index(
        "ix_webhook_deliveries_webhook_created", "webhook_deliveries",
        ["webhook_id", "created_at", "id"], unique=False,
    )
    op.execute(_FUNCTION)
    op.execute(
        "CREATE TRIGGER migration_events_published AFTER INSERT ON migration_events "
        "FOR EACH ROW EXECUTE FUNCTION vmigrate_event_published()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS migration_events_published ON migration_events")
    op.execute("DROP FUNCTION IF EXISTS vmigrate_event_published()")
    op.drop_index("ix_webhook_deliveries_webhook_created", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_due", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_webhooks_tenant_created", table_name="webhooks")
    op.drop_table("webhooks")
