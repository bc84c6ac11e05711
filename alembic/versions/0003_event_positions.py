"""event positions: a commit-ordered cursor for event streams

Event ids come from a sequence when the row is written, so an event can commit after
another with a greater id, and a stream resumed "after id N" would skip it. Each event
now also gets a ``position`` when its transaction commits: a deferred constraint
trigger takes a transaction-level advisory lock (held until the commit completes) and
numbers the transaction's events from ``migration_events_position_seq``. Transactions
that write events therefore commit them in position order, and a reader that has seen
position P has seen every committed event below it. Rows written before this revision
take their id as position (the SSE id they were streamed with).

Only the commit itself is serialised (the lock is taken by the deferred trigger, at
commit time), and the holder waits on nothing else, so this cannot deadlock.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

# The advisory lock key is 0x766D696765767473, the bytes of "vmigevts".
_FUNCTION = """
CREATE FUNCTION vmigrate_event_position() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(8533592761741767795);
    UPDATE migration_events SET position = nextval('migration_events_position_seq')
    WHERE id = NEW.id;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.add_column("migration_events", sa.Column("position", sa.BigInteger(), nullable=True))
    op.execute("CREATE SEQUENCE migration_events_position_seq OWNED BY migration_events.position")
    # Earlier events keep their id as position, so a Last-Event-ID sent by a client
    # that connected before this revision (an event id then) resumes where it was.
    op.execute("UPDATE migration_events SET position = id")
    op.execute(
        "SELECT setval('migration_events_position_seq', "
        "COALESCE((SELECT max(position) FROM migration_events), 0) + 1, false)"
    )
    op.create_index(
        "ix_migration_events_tenant_position", "migration_events", ["tenant", "position"],
        unique=False,
    )
    op.execute(_FUNCTION)
    op.execute(
        "CREATE CONSTRAINT TRIGGER migration_events_position AFTER INSERT ON migration_events "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION vmigrate_event_position()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS migration_events_position ON migration_events")
    op.execute("DROP FUNCTION IF EXISTS vmigrate_event_position()")
    op.drop_index("ix_migration_events_tenant_position", table_name="migration_events")
    op.drop_column("migration_events", "position")  # drops the owned sequence too
