"""migrations.source_key: the per-source-host claim limit counts a column, not a JSON path

Workers limit how many migrations run against one source host. They used to compute
the key in SQL from the stored request (``spec->source->host``, else its cloud id),
which tied the claim query to the JSON layout of one migration type. The key is now a
column written when the migration is created; this revision adds it and backfills it
from the stored specs with the same rule.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "migrations",
        sa.Column("source_key", sa.String(length=255), server_default="", nullable=False),
    )
    op.execute(
        "UPDATE migrations SET source_key = left(coalesce("
        "spec -> 'source' ->> 'host', spec -> 'source' ->> 'cloud_id', ''), 255)"
    )
    op.create_index(
        "ix_migrations_source_key", "migrations", ["source_key", "status"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_migrations_source_key", table_name="migrations")
    op.drop_column("migrations", "source_key")
