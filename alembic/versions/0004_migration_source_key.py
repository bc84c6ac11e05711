"""migrations.source_key, and the hypervisor steps' new names

Workers limit how many migrations run against one source host. They used to compute
the key in SQL from the stored request (``spec->source->host``, else its cloud id),
which tied the claim query to the JSON layout of one migration type. The key is now a
column written when the migration is created; this revision adds it and backfills it
from the stored specs with the same rule.

The hypervisor and conversion plans renamed three steps after what they do (``export``
-> ``transfer``, ``convert`` -> ``check_image``, ``remove_exports`` ->
``discard_staged``). Step rows (and the phase) of existing migrations are renamed, so a
migration created before the upgrade resumes with the new code; the transfer checkpoint
moves from ``exported`` to ``transferred``. Events keep the names they were written with.

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


#: (old, new) step names of the hypervisor and conversion plans.
_RENAMED = (("export", "transfer"), ("convert", "check_image"),
            ("remove_exports", "discard_staged"))


def _rename(pairs: tuple[tuple[str, str], ...]) -> None:
    for old, new in pairs:
        names = {"old": old, "new": new}
        op.execute(sa.text(
            "UPDATE migration_steps SET name = CAST(:new AS text) WHERE name = CAST(:old AS text)"
            " AND migration_id IN (SELECT id FROM migrations"
            " WHERE type IN ('hypervisor', 'conversion'))").bindparams(**names))
        op.execute(sa.text(
            "UPDATE migrations SET phase = CAST(:new AS text) WHERE phase = CAST(:old AS text)"
            " AND type IN ('hypervisor', 'conversion')").bindparams(**names))


def _move_checkpoint(old: str, new: str) -> None:
    op.execute(sa.text(
        "UPDATE migrations SET checkpoint = (checkpoint - CAST(:old AS text))"
        " || jsonb_build_object(CAST(:new AS text), checkpoint -> CAST(:old AS text))"
        " WHERE type IN ('hypervisor', 'conversion')"
        " AND checkpoint -> CAST(:old AS text) IS NOT NULL").bindparams(old=old, new=new))


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
    _rename(_RENAMED)
    _move_checkpoint("exported", "transferred")


def downgrade() -> None:
    _move_checkpoint("transferred", "exported")
    _rename(tuple((new, old) for old, new in _RENAMED))
    op.drop_index("ix_migrations_source_key", table_name="migrations")
    op.drop_column("migrations", "source_key")
