"""A migration whose source cannot be reached fails with a reason a person can read:
the step, the platform, the host and the resolver's words, each once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.retry import RetryPolicy
from app.engines.worker import Worker, WorkerConfig
from app.storage.local import LocalStore
from tests.conftest import TokenFactory, auth


def _vmware(cloud_id: str) -> dict[str, Any]:
    return {"type": "hypervisor", "name": "m", "mode": "store", "platform": "linux",
            "format": "qcow2", "run": True,
            "source": {"cloud_id": cloud_id, "server": {"name": "web-01"}}}


def _live_stream(cloud_id: str) -> dict[str, Any]:
    return {"type": "live_stream", "name": "m", "run": True,
            "source": {"cloud_id": cloud_id, "server": {"name": "db1"},
                       "host": "db1.invalid", "username": "root", "password": "p",
                       "device": "/dev/vg0/root", "host_key_fingerprint":
                       "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"},
            "destination": {"kind": "existing", "host": "db2.invalid", "username": "root",
                            "password": "p", "device": "/dev/sdb", "host_key_fingerprint":
                            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"}}


@pytest.mark.parametrize(("kind", "host", "body"), [
    ("vmware", "vcenter.invalid", _vmware), ("linux", "db1.invalid", _live_stream)])
async def test_an_unresolvable_source_fails_with_one_plain_reason(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings, db: Database,
    kind: str, host: str, body: Callable[[str], dict[str, Any]],
) -> None:
    token = await make_token("acme")
    cloud = (await client.post("/v1/clouds", headers=auth(token), json={
        "name": "c", "kind": kind, "settings": {"host": host},
        "credentials": {"username": "u", "password": "p"}})).json()
    created = await client.post("/v1/migrations", headers=auth(token), json=body(cloud["id"]))
    assert created.status_code == 201, created.text
    url = f"/v1/migrations/{created.json()['id']}"

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    deps = EngineDeps(settings=settings, db=db, box=box, store=LocalStore(settings.library_dir))
    worker = Worker(db, box, default_engines(deps), WorkerConfig(
        poll_seconds=0.05, retry=RetryPolicy(max_attempts=1)))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while (m := (await client.get(url, headers=auth(token))).json())["status"] not in (
                    "failed", "completed"):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    detail = m["error"]["detail"]
    assert m["status"] == "failed"
    assert host in detail
    words = re.findall(r"\b(\w+):", detail)
    assert len(words) == len(set(words)), f"a label repeats in {detail!r}"
