"""The ``vmigrate`` CLI against the test database: tokens and key rotation.

The CLI runs its own event loop (``asyncio.run``), so it is invoked in a thread.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result
from cryptography.fernet import Fernet
from sqlalchemy import select

from app.cli import main
from app.crypto import SecretBox, SecretsUnreadable
from app.db import Database
from app.models.db import ApiToken, Cloud, Migration
from app.services.tokens import hash_token
from tests.conftest import auth


async def invoke(args: list[str], database_url: str, tmp_path: Path, **env: str) -> Result:
    environment = {
        "VMIGRATE_DATABASE_URL": database_url,
        "VMIGRATE_DATA_DIR": str(tmp_path / "cli-data"),
        **env,
    }
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, args, env=environment)


async def test_tokens_create_prints_token_once_and_stores_its_hash(
    database_url: str, db: Database, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    result = await invoke(
        ["tokens", "create", "--tenant", "acme", "--scopes", "clouds:read, migrations:write",
         "--name", "ci"], database_url, tmp_path,
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    assert token.startswith("vmg_")
    assert result.output.count(token) == 1
    async with db.session() as session:
        row = (await session.execute(select(ApiToken))).scalar_one()
    assert row.token_hash == hash_token(token)
    assert token not in (row.token_hash, row.prefix, row.name)
    assert row.tenant == "acme"
    assert sorted(row.scopes) == ["clouds:read", "migrations:write"]
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 200
    assert (await client.post("/v1/clouds", json={}, headers=auth(token))).status_code == 403


@pytest.mark.parametrize(
    ("tenant", "scopes"), [("acme", "clouds:fly"), ("Not A Tenant", "clouds:read")]
)
async def test_tokens_create_rejects_bad_input(
    database_url: str, db: Database, tmp_path: Path, tenant: str, scopes: str
) -> None:
    result = await invoke(["tokens", "create", "--tenant", tenant, "--scopes", scopes],
                          database_url, tmp_path)
    assert result.exit_code != 0
    async with db.session() as session:
        assert (await session.execute(select(ApiToken))).first() is None


async def test_tokens_create_all_scopes_reaches_every_area(
    database_url: str, db: Database, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    result = await invoke(["tokens", "create", "--tenant", "acme", "--all-scopes"],
                          database_url, tmp_path)
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    async with db.session() as session:
        row = (await session.execute(select(ApiToken))).scalar_one()
    assert sorted(row.scopes) == ["clouds:write", "images:write", "metrics:read",
                                  "migrations:write", "webhooks:write"]
    for path in ("/v1/clouds", "/v1/migrations", "/v1/images", "/v1/webhooks", "/v1/events",
                 "/metrics"):
        assert (await client.get(path, headers=auth(token))).status_code == 200, path


@pytest.mark.parametrize("args", [[], ["--scopes", "clouds:read", "--all-scopes"]])
async def test_tokens_create_needs_scopes_or_all_scopes_not_both(
    database_url: str, db: Database, tmp_path: Path, args: list[str]
) -> None:
    result = await invoke(["tokens", "create", "--tenant", "acme", *args], database_url,
                          tmp_path)
    assert result.exit_code == 2
    assert "either --scopes or --all-scopes" in result.output
    async with db.session() as session:
        assert (await session.execute(select(ApiToken))).first() is None


def test_tokens_create_help_lists_every_scope() -> None:
    from app.services.tokens import SCOPE_HELP

    result = CliRunner().invoke(main, ["tokens", "create", "--help"])
    assert result.exit_code == 0
    listed = result.output.split("Scopes (AREA:write implies AREA:read):", 1)[1]
    for scope, meaning in SCOPE_HELP.items():
        assert f"{scope}  " in listed, scope
        assert meaning in listed, scope


async def test_tokens_revoke(
    database_url: str, db: Database, tmp_path: Path, client: httpx.AsyncClient
) -> None:
    created = await invoke(["tokens", "create", "--tenant", "acme", "--scopes", "clouds:read"],
                           database_url, tmp_path)
    token = created.output.strip()
    revoked = await invoke(["tokens", "revoke", token[:12]], database_url, tmp_path)
    assert revoked.exit_code == 0, revoked.output
    assert (await client.get("/v1/clouds", headers=auth(token))).status_code == 401


async def test_keys_rotate(database_url: str, db: Database, tmp_path: Path) -> None:
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    old = SecretBox([key_a])
    cloud_ids, migration_ids = [], []
    async with db.session() as session:
        for i in range(5):
            cloud = Cloud(tenant="acme", kind="vmware", name=f"c{i}", settings={},
                          credentials=old.seal({"username": "u", "password": f"pw{i}"}))
            migration = Migration(tenant="acme", type="live_stream", status="pending", spec={},
                                  secrets=old.seal({"ssh_password": f"m{i}"}))
            session.add_all([cloud, migration])
            await session.flush()
            cloud_ids.append(cloud.id)
            migration_ids.append(migration.id)
        session.add(Cloud(tenant="acme", kind="xen", name="none", settings={}, credentials=None))

    result = await invoke(["keys", "rotate", "--batch-size", "2"], database_url, tmp_path,
                          VMIGRATE_ENCRYPTION_KEYS=f"{key_b.decode()},{key_a.decode()}")
    assert result.exit_code == 0, result.output
    assert "clouds.credentials: re-encrypted 5" in result.output
    assert "migrations.secrets: re-encrypted 5" in result.output

    new_only, old_only = SecretBox([key_b]), SecretBox([key_a])
    async with db.session() as session:
        clouds = {c.id: c for c in (await session.scalars(select(Cloud))).all()}
        migrations = {m.id: m for m in (await session.scalars(select(Migration))).all()}
    for i, cloud_id in enumerate(cloud_ids):
        assert new_only.open(clouds[cloud_id].credentials)["password"] == f"pw{i}"
        with pytest.raises(SecretsUnreadable):
            old_only.open(clouds[cloud_id].credentials)
    for i, migration_id in enumerate(migration_ids):
        assert new_only.open(migrations[migration_id].secrets) == {"ssh_password": f"m{i}"}
    assert [c.credentials for c in clouds.values() if c.name == "none"] == [None]


async def test_keys_rotate_reports_rows_no_key_opens(
    database_url: str, db: Database, tmp_path: Path
) -> None:
    stray = SecretBox([Fernet.generate_key()]).seal({"password": "x"})
    row_id = uuid.uuid4()
    async with db.session() as session:
        session.add(Cloud(id=row_id, tenant="acme", kind="vmware", name="c", settings={},
                          credentials=stray))
    result = await invoke(["keys", "rotate"], database_url, tmp_path,
                          VMIGRATE_ENCRYPTION_KEYS=Fernet.generate_key().decode())
    assert result.exit_code == 1
    assert str(row_id) in result.output
    async with db.session() as session:
        row = await session.get(Cloud, row_id)
    assert row is not None
    assert row.credentials == stray  # left as it was


def test_main_cli_converts_without_a_database(tmp_path: Path) -> None:
    """`vmigrate convert` and `vmigrate info` are part of the one CLI and need no service."""
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(3 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(b"data" * 1000)
    out = tmp_path / "disk.vmdk"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
    env["VMIGRATE_DATABASE_URL"] = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
    done = subprocess.run([sys.executable, "-m", "app.cli", "convert", str(raw), str(out),
                           "--to", "vmdk"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(out), str(raw)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert cmp.returncode == 0, cmp.stdout
    info = subprocess.run([sys.executable, "-m", "app.cli", "info", str(out)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert info.returncode == 0, info.stderr
    assert "vmdk" in info.stdout


def test_the_command_ends_at_once_after_an_image_command_only(tmp_path: Path) -> None:
    """`run` (the console script) skips the interpreter's teardown after a finished
    convert or info, and nowhere else: an atexit handler shows which way it went."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(64 * 1024) + bytes(64 * 1024))
    script = (
        "import atexit, sys\n"
        "atexit.register(print, 'torn down')\n"
        "sys.argv = ['vmigrate', *sys.argv[1:]]\n"
        "from app.cli import run\n"
        "run()\n"
    )

    def vmigrate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, timeout=120, check=False)

    out = tmp_path / "disk.qcow2"
    done = vmigrate("convert", str(raw), str(out), "--to", "qcow2")
    assert done.returncode == 0, done.stderr
    assert "torn down" not in done.stdout
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert cmp.returncode == 0, cmp.stdout
    info = vmigrate("info", str(out))
    assert info.returncode == 0, info.stderr
    assert "qcow2" in info.stdout  # printed before the process ended
    assert "torn down" not in info.stdout

    failed = vmigrate("convert", str(tmp_path / "missing.raw"), str(out), "--to", "raw")
    assert failed.returncode == 2, failed.stderr  # the source cannot be read
    assert "missing.raw" in failed.stderr
    assert failed.stdout.strip() == "torn down"
    helped = vmigrate("--help")
    assert helped.returncode == 0
    assert helped.stdout.rstrip().endswith("torn down")


def test_image_commands_do_not_load_the_service(tmp_path: Path) -> None:
    """`vmigrate info`/`convert` import neither the settings model, the database layer
    nor the web app: they cost about 0.6 s of start-up, more than qemu-img needs for a
    small conversion. Nor do they import the modules of formats they do not read or
    write: probing looks at signatures only (all five format modules: ~16 ms)."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"x" * 4096)
    probe = (
        "import sys\n"
        "from app.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = ('sqlalchemy', 'fastapi', 'pydantic_settings', 'app.db', 'app.config', 'yaml')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
        "formats = ('raw', 'qcow2', 'vmdk', 'vhd', 'vhdx')\n"
        "print(sorted(f for f in formats if f'app.formats.{f}' in sys.modules))\n"
    )
    for args, formats in (
        (["info", str(raw)], "['raw']"),
        (["convert", str(raw), str(tmp_path / "o.qcow2"), "--to", "qcow2"], "['qcow2', 'raw']"),
    ):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-2:] == ["[]", formats], (args, done.stdout)


def test_image_commands_run_on_uvloop_where_installed() -> None:
    """uvloop is a dependency (the API runs on it through uvicorn): the image commands
    use it too, and fall back to asyncio's loop without it."""
    from app.commands import images

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert images._event_loop_run(loop_module()).startswith("uvloop")
    blocked = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.modules['uvloop'] = None\n"
         "import asyncio\n"
         "from app.commands.images import _event_loop_run\n"
         "async def m():\n"
         "    return type(asyncio.get_running_loop()).__module__\n"
         "print(_event_loop_run(m()))\n"],
        capture_output=True, text=True, timeout=120, check=False)
    assert blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.strip() == "asyncio.unix_events"
