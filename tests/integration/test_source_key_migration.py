"""Migration 0004 on a database that already holds migrations: ``source_key`` is
backfilled from the stored specs by the rule workers used to apply in SQL (the source's
host, else its cloud, else nothing); the hypervisor steps of existing migrations take
their new names (with the phase and the transfer checkpoint), so they resume under the
new code; the downgrade undoes both."""

from __future__ import annotations

import json
import uuid

from sqlalchemy import text

from app.db import Database
from tests.integration.test_event_positions_migration import _migrate

CLOUD = "6f1d1a8e-3a55-4b0a-9a43-96d6a1f4c2b7"
SPECS: dict[str, dict[str, object]] = {
    "host": {"type": "hypervisor", "source": {"cloud_id": CLOUD, "host": "esx7.example.com"}},
    "cloud": {"type": "hypervisor", "source": {"cloud_id": CLOUD, "host": None}},
    "image": {"type": "hypervisor", "source": {"image_id": CLOUD}},
    "conversion": {"type": "conversion", "image_id": CLOUD, "format": "raw"},
}


async def test_upgrade_backfills_source_key_from_the_specs(scratch: Database) -> None:
    await _migrate(scratch, "upgrade", "0003")
    ids = {name: uuid.uuid4() for name in SPECS}
    async with scratch.engine.begin() as conn:
        for name, spec in SPECS.items():
            await conn.execute(text(
                "INSERT INTO migrations (id, tenant, name, type, status, spec, bytes_total,"
                " bytes_done, rate, attempt, cancel_requested, epoch, version, event_seq)"
                " VALUES (:id, 'acme', :name, :type, 'pending', CAST(:spec AS jsonb),"
                " 0, 0, 0, 0, false, 0, 1, 0)"),
                {"id": ids[name], "name": name, "type": str(spec["type"]),
                 "spec": json.dumps(spec)})
        # a hypervisor migration half-way through its transfer (old step names)
        for position, name in enumerate(("validate", "export", "convert", "remove_exports")):
            await conn.execute(text(
                "INSERT INTO migration_steps (migration_id, position, name, cleanup, status,"
                " bytes_total, bytes_done) VALUES (:id, :pos, :name, :cleanup, 'pending', 0, 0)"),
                {"id": ids["host"], "pos": position, "name": name,
                 "cleanup": name == "remove_exports"})
        await conn.execute(text(
            "UPDATE migrations SET phase = 'export', checkpoint = CAST(:cp AS jsonb) "
            "WHERE id = :id"), {"id": ids["host"], "cp": json.dumps({"exported": {"d": 1}})})
    await _migrate(scratch, "upgrade", "0004")
    async with scratch.engine.connect() as conn:
        result = await conn.execute(text("SELECT name, source_key FROM migrations"))
        rows = {str(name): str(key) for name, key in result.all()}
        steps = (await conn.execute(text(
            "SELECT name FROM migration_steps ORDER BY position"))).scalars().all()
        phase, checkpoint = (await conn.execute(text(
            "SELECT phase, checkpoint FROM migrations WHERE id = :id"),
            {"id": ids["host"]})).one()
    assert rows == {"host": "esx7.example.com", "cloud": CLOUD, "image": "", "conversion": ""}
    assert list(steps) == ["validate", "transfer", "check_image", "discard_staged"]
    assert (phase, checkpoint) == ("transfer", {"transferred": {"d": 1}})

    await _migrate(scratch, "downgrade", "0003")
    async with scratch.engine.connect() as conn:
        steps = (await conn.execute(text(
            "SELECT name FROM migration_steps ORDER BY position"))).scalars().all()
        checkpoint = (await conn.execute(text(
            "SELECT checkpoint FROM migrations WHERE id = :id"), {"id": ids["host"]})).scalar()
    assert list(steps) == ["validate", "export", "convert", "remove_exports"]
    assert checkpoint == {"exported": {"d": 1}}
    async with scratch.engine.connect() as conn:
        columns = (await conn.execute(text(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'migrations' AND column_name = 'source_key'"))).all()
    assert columns == []
