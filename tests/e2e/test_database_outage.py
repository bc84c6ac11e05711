"""PostgreSQL stops (fast shutdown, or SIGKILL of the postmaster) in the middle of a
conversion, for 8 seconds, under real processes: ``vmigrate serve`` with its worker,
or ``vmigrate serve --no-worker`` with two ``vmigrate worker`` processes. Nobody
touches anything: the migration completes once, with the source's exact disk; API
calls during the outage are 503 problems with Retry-After; the outage costs a bounded
number of log lines and no tracebacks; every process is still running afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from app.db import Database, upgrade
from app.formats.digest import digest_file
from app.services.tokens import SCOPES, create_token
from tests.e2e.pg_control import OwnPostgres
from tests.formats.oracle import qemu_img

MiB = 1024 * 1024
OUTAGE_SECONDS = 8.0
#: Log lines all processes together may write from the stop until the migration
#: completes: each says something once (database away, back, a run given up).
MAX_OUTAGE_LOG_LINES = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    mode: str
    base_url: str
    token: str
    logs: list[Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def log_lines(self) -> list[str]:
        out: list[str] = []
        for path in self.logs:
            out += path.read_text(errors="replace").splitlines()
        return out


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    # Outside pytest's tmp dirs: the server runs as another user, which must reach it.
    root = Path(tempfile.mkdtemp(prefix="vmigrate-outage-pg-"))
    pg = OwnPostgres(root)
    try:
        yield pg
    finally:
        pg.stop_for_good()
        shutil.rmtree(root, ignore_errors=True)


async def _token(url: str) -> str:
    db = Database(url, pool_size=1)
    try:
        await upgrade(db)
        async with db.session() as session:
            _, token = await create_token(session, "acme", list(SCOPES))
        return token
    finally:
        await db.dispose()


@pytest.fixture(params=["serve", "workers"])
async def service(request: pytest.FixtureRequest, own_pg: OwnPostgres, tmp_path: Path
                  ) -> AsyncIterator[Service]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMIGRATE_")}
    env.update({
        "VMIGRATE_DATABASE_URL": own_pg.url,
        "VMIGRATE_DATA_DIR": str(tmp_path / "data"),
        "VMIGRATE_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "VMIGRATE_WORKER_LEASE_SECONDS": "3",
        "VMIGRATE_WORKER_HEARTBEAT_SECONDS": "0.5",
        "VMIGRATE_WORKER_POLL_SECONDS": "0.2",
        "VMIGRATE_DB_RETRY_MAX_SECONDS": "1",
        "VMIGRATE_DB_CONNECT_TIMEOUT_SECONDS": "3",
        "VMIGRATE_LOG_LEVEL": "WARNING",
    })
    token = await _token(own_pg.url)
    svc = Service(request.param, f"http://127.0.0.1:{port}", token, [])
    commands = [["serve", "--port", str(port)]] if request.param == "serve" else [
        ["serve", "--no-worker", "--port", str(port)], ["worker"], ["worker"]]
    try:
        for i, args in enumerate(commands):
            log = tmp_path / f"{args[0]}{i}.log"
            svc.logs.append(log)
            svc.procs.append(subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args], env=env,
                stdout=log.open("wb"), stderr=subprocess.STDOUT))
        async with httpx.AsyncClient(base_url=svc.base_url, timeout=10) as c:
            async with asyncio.timeout(60):
                while True:
                    assert all(p.poll() is None for p in svc.procs), svc.log_lines()
                    try:
                        if (await c.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.2)
        yield svc
    finally:
        for proc in svc.procs:  # only what this test started, by PID
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def _source_image(tmp_path: Path) -> Path:
    raw = tmp_path / "source.raw"
    with raw.open("wb") as f:
        for i in range(24):  # 24 MiB of data, one hole in the middle
            f.write(bytes(MiB) if i == 12 else os.urandom(MiB))
    qcow = tmp_path / "source.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    return qcow


async def _wait_for(c: httpx.AsyncClient, headers: dict[str, str], mid: str,
                    predicate: Any, timeout: float) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            r = await c.get(f"/v1/migrations/{mid}", headers=headers)
            if r.status_code == 200 and predicate(r.json()):
                result: dict[str, Any] = r.json()
                return result
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("how", ["fast", "kill9"])
async def test_conversion_survives_a_database_restart(
    service: Service, own_pg: OwnPostgres, tmp_path: Path, how: str
) -> None:
    headers = {"Authorization": f"Bearer {service.token}"}
    source = _source_image(tmp_path)
    async with httpx.AsyncClient(base_url=service.base_url, timeout=15) as c:
        r = await c.post("/v1/images", params={"name": "source"}, content=source.read_bytes(),
                         headers={**headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        image = r.json()
        r = await c.post(f"/v1/images/{image['id']}/conversions", headers=headers,
                         json={"format": "vmdk", "name": "through the outage",
                               "options": {"throttle_bytes_per_second": 3 * MiB}})
        assert r.status_code == 202, r.text
        mid = r.json()["id"]
        await _wait_for(c, headers, mid, lambda m: m["progress"]["bytes_done"] > 0, 60)

        lines_before = len(service.log_lines())
        (own_pg.stop_fast if how == "fast" else own_pg.kill9)()
        stopped = time.monotonic()
        statuses: list[int] = []
        retry_after: list[str] = []
        while time.monotonic() - stopped < OUTAGE_SECONDS:
            for path in (f"/v1/migrations/{mid}", "/v1/images", "/readyz"):
                r = await c.get(path, headers=headers)
                statuses.append(r.status_code)
                if r.status_code == 503:
                    assert r.headers["content-type"] == "application/problem+json"
                    retry_after.append(r.headers.get("retry-after", ""))
            await asyncio.sleep(0.5)
        await asyncio.to_thread(own_pg.start)

        assert set(statuses) == {503}, statuses
        assert all(v.isdigit() and int(v) > 0 for v in retry_after)

        done = await _wait_for(c, headers, mid, lambda m: m["status"] in (
            "completed", "failed", "cancelled"), 180)
        assert done["status"] == "completed", done["error"]
        assert all(p.poll() is None for p in service.procs), "a process died"
        async with asyncio.timeout(30):  # readiness comes back with the worker
            while (await c.get("/readyz")).status_code != 200:
                await asyncio.sleep(0.2)
        ready = (await c.get("/readyz")).json()

        images = (await c.get("/v1/images", headers=headers)).json()["items"]
        (new,) = [i for i in images if i["id"] != image["id"]]
        assert new["name"] == "through the outage"
        assert new["digest"] == image["digest"]
        content = await c.get(f"/v1/images/{new['id']}/content", headers=headers)
        out = tmp_path / "out.vmdk"
        out.write_bytes(content.content)
        events = (await c.get(f"/v1/migrations/{mid}/events", headers=headers,
                              params={"limit": 200})).json()["items"]

    assert qemu_img("compare", "-f", "vmdk", "-F", "qcow2", out, source,
                    check=False).returncode == 0
    back = tmp_path / "out.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", out, back)
    assert digest_file(str(back)) == image["digest"]
    types = [e["type"] for e in events]
    assert "migration.reclaimed" in types  # the run was given up, then resumed
    assert types.count("migration.completed") == 1
    assert types.count("image.created") == 1
    # /readyz speaks for the in-process worker (serve), not for separate ones
    assert ready.get("worker") == ("ok" if service.mode == "serve" else None)

    outage_lines = service.log_lines()[lines_before:]
    assert not [line for line in outage_lines if "Traceback" in line], outage_lines
    assert len(outage_lines) <= MAX_OUTAGE_LOG_LINES, outage_lines
    print(f"{how}: {len(outage_lines)} log lines over the outage; "
          f"{len(statuses)} API calls during it, all 503:\n" + "\n".join(outage_lines))
