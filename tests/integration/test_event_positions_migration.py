"""Migration 0003 on a database that already holds events: old events keep their id as
position (so a Last-Event-ID sent before the upgrade still resumes in place), new
events are numbered after them at commit, and the downgrade removes it all."""

from __future__ import annotations

from alembic import command
from sqlalchemy import Connection, text

from app.db import Database, _alembic_config


async def _migrate(db: Database, action: str, revision: str) -> None:
    def run(sync_conn: Connection) -> None:
        cfg = _alembic_config(db.url)
        cfg.attributes["connection"] = sync_conn
        getattr(command, action)(cfg, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def _add_event(db: Database, kind: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO migration_events (tenant, migration_id, seq, type, payload, created_at)"
            " VALUES ('acme', NULL, 0, :kind, '{}', now())"), {"kind": kind})


async def test_upgrade_keeps_old_ids_as_positions_and_numbers_new_events_after(
    scratch: Database,
) -> None:
    await _migrate(scratch, "upgrade", "0002")
    for kind in ("image.created", "image.deleted", "image.created"):
        await _add_event(scratch, kind)
    async with scratch.engine.begin() as conn:  # a gap in the ids, as a rollback leaves
        await conn.execute(text("SELECT nextval('migration_events_id_seq')"))
    await _add_event(scratch, "image.created")
    await _migrate(scratch, "upgrade", "head")
    async with scratch.engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT id, position FROM migration_events ORDER BY id"))).all()
    assert [p for _, p in rows] == [i for i, _ in rows]
    assert rows[-1][0] == 5  # ids 1, 2, 3, 5
    await _add_event(scratch, "image.deleted")
    async with scratch.engine.connect() as conn:
        new_id, new_position = (await conn.execute(text(
            "SELECT id, position FROM migration_events ORDER BY id DESC LIMIT 1"))).one()
    assert new_id == 6
    assert new_position > 5
    await _migrate(scratch, "downgrade", "0002")
    async with scratch.engine.connect() as conn:
        columns = (await conn.execute(text(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'migration_events'"))).scalars().all()
        triggers = (await conn.execute(text(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'migration_events'::regclass "
            "AND NOT tgisinternal"))).scalars().all()
    assert "position" not in columns
    assert list(triggers) == ["migration_events_published"]
