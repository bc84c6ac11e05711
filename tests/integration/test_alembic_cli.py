"""The top-level Alembic set-up as an operator uses it: the real ``alembic`` command in a
child process, configured by ``alembic.ini`` at the repository root and by
``VMIGRATE_DATABASE_URL`` alone, in the URL form the service itself uses."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

import app.db
from app.db import Database, _alembic_config, alembic_ini, current_revision, head_revision
from app.models.db import Base

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC = Path(sys.executable).parent / "alembic"


async def alembic(*args: str, url: str | None, cwd: Path = ROOT) -> tuple[int, str]:
    """Run the ``alembic`` command; its exit status and its output (stdout + stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VMIGRATE_DATABASE_URL", "ALEMBIC_CONFIG")}
    if url is not None:
        env["VMIGRATE_DATABASE_URL"] = url
    proc = await asyncio.create_subprocess_exec(
        str(ALEMBIC), *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def schema_drift(db: Database) -> list[Any]:
    def diff(conn: Connection) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))

    async with db.engine.connect() as conn:
        return await conn.run_sync(diff)


def test_the_app_and_the_command_line_share_the_checkouts_alembic_ini() -> None:
    assert alembic_ini() == ROOT / "alembic.ini"
    scripts = ScriptDirectory.from_config(_alembic_config("postgresql://"))
    assert Path(scripts.dir) == ROOT / "alembic"
    assert not (ROOT / "alembic" / "__init__.py").exists(), (
        "alembic/ must not be a package: it would shadow the alembic library")
    assert {p.name for p in (ROOT / "alembic" / "versions").glob("*.py")} >= {
        "0001_initial_schema.py", "0002_events_webhooks.py", "0003_event_positions.py"}


async def test_alembic_upgrade_head_from_the_checkout(scratch: Database) -> None:
    assert scratch.url.startswith("postgresql+asyncpg://")
    assert await current_revision(scratch) is None

    status, output = await alembic("upgrade", "head", url=scratch.url)

    head = head_revision()
    assert status == 0, output
    assert "Running upgrade  -> 0001" in output
    assert f"-> {head}," in output
    assert await current_revision(scratch) == head
    assert await schema_drift(scratch) == []
    async with scratch.engine.connect() as conn:
        tables = set((await conn.execute(text(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))).scalars())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables

    status, output = await alembic("current", url=scratch.url)
    assert status == 0, output
    assert f"{head} (head)" in output


async def test_alembic_from_elsewhere_with_the_config_named(
    scratch: Database, tmp_path: Path
) -> None:
    status, output = await alembic("-c", str(ROOT / "alembic.ini"), "upgrade", "0002",
                                   url=scratch.url, cwd=tmp_path)
    assert status == 0, output
    assert await current_revision(scratch) == "0002"


async def test_alembic_without_a_database_url_says_what_to_set(
    scratch: Database, tmp_path: Path
) -> None:
    status, output = await alembic("-c", str(ROOT / "alembic.ini"), "upgrade", "head",
                                   url=None, cwd=tmp_path)
    assert status != 0
    assert "set VMIGRATE_DATABASE_URL" in output
    assert await current_revision(scratch) is None


async def test_alembic_sql_prints_the_schema_without_touching_a_database() -> None:
    # A URL nothing listens on: offline mode must never connect.
    status, output = await alembic(
        "upgrade", "head", "--sql", url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    assert status == 0, output
    assert "CREATE TABLE clouds" in output
    stamps = re.findall(r"alembic_version SET version_num='(\w+)'", output)
    assert stamps[-1] == head_revision()


async def test_an_installed_app_finds_the_scripts_under_share_vmigrate(
    scratch: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The container image's layout: no alembic.ini beside the installed package, the
    # file and the scripts copied to <prefix>/share/vmigrate by the Dockerfile.
    share = tmp_path / "share" / "vmigrate"
    shutil.copytree(ROOT / "alembic", share / "alembic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "alembic.ini", share / "alembic.ini")
    monkeypatch.setattr(app.db, "ALEMBIC_INI_PLACES",
                        (tmp_path / "site-packages" / "alembic.ini", share / "alembic.ini"))

    assert alembic_ini() == share / "alembic.ini"
    await app.db.upgrade(scratch)
    assert await current_revision(scratch) == head_revision()
    assert await schema_drift(scratch) == []


def test_the_dockerfile_puts_the_scripts_where_the_installed_app_looks() -> None:
    # No image is built here; this ties the Dockerfile to ALEMBIC_INI_PLACES instead.
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile.rsplit("\nFROM ", 1)[1]
    assert runtime.startswith("python:3"), "the official Python images install under /usr/local"
    installed = app.db.ALEMBIC_INI_PLACES[-1].relative_to(sys.prefix)
    ini = PurePosixPath("/usr/local", *installed.parts)
    assert f"COPY alembic.ini {ini}\n" in runtime
    assert f"COPY alembic {ini.parent / 'alembic'}\n" in runtime
    assert f"ALEMBIC_CONFIG={ini}" in runtime


def test_missing_scripts_are_reported_with_the_places_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    places = (tmp_path / "a" / "alembic.ini", tmp_path / "b" / "alembic.ini")
    monkeypatch.setattr(app.db, "ALEMBIC_INI_PLACES", places)
    with pytest.raises(FileNotFoundError) as caught:
        alembic_ini()
    assert str(places[0]) in str(caught.value)
    assert str(places[1]) in str(caught.value)
