"""A library conversion resumes after its worker dies: ``vmigrate worker`` is killed
with SIGKILL mid-conversion, and the next worker continues the staged output from the
durable offset the first one checkpointed, reading only the rest of the source; the
result is identical to the source (qemu-img compare)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.storage.local import LocalStore
from tests.conftest import TokenFactory, auth
from tests.e2e.vmware_support import MiB, make_worker, run_until
from tests.formats.oracle import qemu_img

SIZE = 64 * MiB
THROTTLE = 6 * MiB  # data bytes per second: the first worker takes ~10 s


def _disk(path: Path) -> Path:
    """Random data in 60 of the 64 MiB (so reading it counts), holes in the rest."""
    rng = random.Random(7)
    with path.open("wb") as f:
        f.truncate(SIZE)
        for mib in range(SIZE // MiB):
            if mib % 16 != 5:
                f.seek(mib * MiB)
                f.write(rng.randbytes(MiB))
    return path


async def _checkpoint(db: Database, mid: str) -> dict[str, Any] | None:
    async with db.session() as s:
        row = (await s.execute(text("SELECT checkpoint FROM migrations WHERE id = :id"),
                               {"id": uuid.UUID(mid)})).scalar_one()
    return dict(row) if row else None


async def test_sigkill_mid_conversion_resumes_from_the_checkpoint(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    tmp_path: Path, spawn: Callable[[], subprocess.Popen[bytes]],
) -> None:
    token = await make_token()
    raw = _disk(tmp_path / "source.raw")
    qcow = tmp_path / "source.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    up = await client.post("/v1/images", params={"name": "big"}, content=qcow.read_bytes(),
                           headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert up.status_code == 201, up.text
    image = up.json()
    r = await client.post(f"/v1/images/{image['id']}/conversions", headers=auth(token),
                          json={"format": "raw"})
    assert r.status_code == 202, r.text
    mid = str(r.json()["id"])
    # slow it down (nothing claims it before a worker starts) so the kill lands mid-way
    async with db.session() as s:
        await s.execute(text(
            "UPDATE migrations SET spec = jsonb_set(spec, '{options}', "
            "jsonb_build_object('throttle_bytes_per_second', CAST(:bps AS bigint))) "
            "WHERE id = :id"),
            {"bps": THROTTLE, "id": uuid.UUID(mid)})

    proc = spawn()
    async with asyncio.timeout(90):
        while True:
            assert proc.poll() is None, "the worker process died on its own"
            checkpoint = await _checkpoint(db, mid)
            if checkpoint and (checkpoint.get("partial") or {}).get("offset", 0) > 0:
                break
            await asyncio.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    killed_at = int(checkpoint["partial"]["offset"])
    assert 0 < killed_at < SIZE

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])

    async def ended() -> bool:
        got = (await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json()
        return bool(got["status"] in ("completed", "failed"))

    await run_until(make_worker(settings, db, box, LocalStore(settings.library_dir)), ended)
    m = (await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json()
    assert m["status"] == "completed", m["error"]
    assert m["attempt"] == 1  # the same attempt, resumed by another worker
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    types = [e["type"] for e in events]
    assert "migration.reclaimed" in types
    assert "migration.transfer.restarted" not in types
    (resumed,) = [e["payload"] for e in events if e["type"] == "migration.transfer.resumed"]
    assert resumed["offset"] >= killed_at  # at least where the killed worker got to
    assert resumed["skipped_reading"] is True
    # the second run read the rest of the image only, not the part already converted
    assert resumed["source_bytes_read"] < qcow.stat().st_size - resumed["offset"] + 4 * MiB
    second = [e["payload"] for e in events if e["type"] == "migration.disk.transferred"]
    assert second[-1]["resumed_from"] == resumed["offset"]
    assert second[-1]["data_bytes"] <= SIZE - resumed["offset"]

    new_id = next(s["result"]["images"][0] for s in m["steps"] if s["name"] == "store")
    new = (await client.get(f"/v1/images/{new_id}", headers=auth(token))).json()
    assert (new["format"], new["parent_id"]) == ("raw", image["id"])
    assert new["digest"] == image["digest"]
    out = tmp_path / "converted.raw"
    out.write_bytes((await client.get(f"/v1/images/{new_id}/content",
                                      headers=auth(token))).content)
    cmp = qemu_img("compare", "-f", "raw", "-F", "raw", out, raw, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
