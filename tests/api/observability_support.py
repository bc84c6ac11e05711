"""A real migration for the metrics and log tests: a library conversion (qcow2 -> vmdk)
run by a real worker on the test database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.worker import Worker, WorkerConfig
from app.storage.local import LocalStore
from tests.conftest import auth
from tests.formats.oracle import make_sparse_raw, qemu_img

SIZE = 3 * 1024 * 1024
#: Bytes of data (not holes) in the source image.
DATA = 4096 + 70000 + 512


async def run_conversion(client: httpx.AsyncClient, token: str, settings: Settings,
                         db: Database, tmp_path: Path, target: str = "vmdk") -> dict[str, Any]:
    """Upload a small qcow2 image, convert it to ``target`` with a worker, and return the
    finished migration as the API shows it."""
    raw = tmp_path / "disk.raw"
    make_sparse_raw(raw, SIZE, [(0, 4096), (1024 * 1024 + 7, 70000), (SIZE - 512, 512)], seed=5)
    qcow = tmp_path / "disk.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    uploaded = await client.post(
        "/v1/images", params={"name": qcow.name}, content=qcow.read_bytes(),
        headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert uploaded.status_code == 201, uploaded.text
    r = await client.post(f"/v1/images/{uploaded.json()['id']}/conversions",
                          headers=auth(token), json={"format": target})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    deps = EngineDeps(settings=settings, db=db, box=box, store=LocalStore(settings.library_dir))
    worker = Worker(db, box, default_engines(deps), WorkerConfig(poll_seconds=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while True:
                now = (await client.get(f"/v1/migrations/{job['id']}", headers=auth(token)))
                if now.json()["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    done: dict[str, Any] = now.json()
    return done
