"""``vmigrate worker`` as a real process: killed with SIGKILL mid-export, another worker
resumes after the lease expires; stopped with SIGTERM, it hands the migration back at
once. Against vcsim and the real pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.formats.digest import digest_file
from app.storage.local import LocalStore
from tests.conftest import TokenFactory, auth
from tests.e2e.vmware_support import (
    MiB,
    add_vmware_cloud,
    borrowed_vm,
    disk_with_holes,
    make_worker,
    run_until,
    vm_state,
)
from tests.infra.vcsim import Vcsim

SIZE = 12 * MiB


async def _get(client: httpx.AsyncClient, token: str, mid: str) -> dict[str, Any]:
    return dict((await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json())


async def _start_migration(client: httpx.AsyncClient, token: str, vcsim: Vcsim,
                           tmp_path: Path, vm: str, stack: contextlib.ExitStack
                           ) -> tuple[str, Path]:
    raw = disk_with_holes(tmp_path / "source.raw", SIZE, seed=5)
    stack.enter_context(borrowed_vm(vcsim, vm, SIZE, raw))
    cloud = await add_vmware_cloud(client, token, vcsim)
    r = await client.post("/v1/migrations", headers=auth(token), json={
        "type": "hypervisor", "name": "killed mid-export", "mode": "store",
        "platform": "linux", "format": "qcow2", "run": True,
        "source": {"cloud_id": cloud, "server": {"name": vm}},
        "options": {"throttle_bytes_per_second": 3 * MiB}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), raw


async def _wait_exporting(client: httpx.AsyncClient, token: str, mid: str,
                          proc: subprocess.Popen[bytes]) -> None:
    async with asyncio.timeout(90):
        while True:
            assert proc.poll() is None, "the worker process died on its own"
            m = await _get(client, token, mid)
            if m["phase"] == "transfer" and m["progress"]["bytes_done"] > 0:
                return
            await asyncio.sleep(0.1)


@pytest.fixture
def vm_stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as stack:
        yield stack


async def test_sigkill_mid_export_resumes_on_another_worker(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    vcsim: Vcsim, tmp_path: Path, spawn: Any, vm_stack: contextlib.ExitStack,
) -> None:
    token = await make_token()
    mid, raw = await _start_migration(client, token, vcsim, tmp_path, "DC0_C0_RP0_VM0",
                                      vm_stack)
    proc = spawn()
    await _wait_exporting(client, token, mid, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert (await _get(client, token, mid))["status"] == "running"  # nobody released it

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    store = LocalStore(settings.library_dir)

    async def ended() -> bool:
        return (await _get(client, token, mid))["status"] in ("completed", "failed")

    await run_until(make_worker(settings, db, box, store), ended)
    m = await _get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert m["attempt"] == 1  # the same attempt, resumed
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    types = [e["type"] for e in events]
    assert "migration.reclaimed" in types
    assert "migration.transfer.restarted" in types
    (image,) = (await client.get("/v1/images", headers=auth(token))).json()["items"]
    assert image["digest"] == digest_file(str(raw))


async def test_sigterm_hands_the_migration_back(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    vcsim: Vcsim, tmp_path: Path, spawn: Any, vm_stack: contextlib.ExitStack,
) -> None:
    token = await make_token()
    vm = "DC0_C0_RP0_VM1"
    mid, _ = await _start_migration(client, token, vcsim, tmp_path, vm, vm_stack)
    proc = spawn()
    await _wait_exporting(client, token, mid, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    m = await _get(client, token, mid)
    assert m["status"] == "queued"  # released: claimable at once, no lease to wait out
    r = await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                         params={"limit": 200})
    assert r.status_code == 200, r.text
    events = r.json()["items"]
    assert events[-1]["type"] == "migration.released"
    # cancelled while nobody holds it, after it powered the VM off and snapshotted it:
    # a worker must unwind that before the migration is cancelled
    assert vm_state(vcsim, vm)[0] == "poweredOff"
    cancel = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
    assert cancel.json()["status"] == "cancelling"
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])

    async def cancelled() -> bool:
        return bool((await _get(client, token, mid))["status"] == "cancelled")

    await run_until(make_worker(settings, db, box, LocalStore(settings.library_dir)),
                    cancelled)
    assert vm_state(vcsim, vm) == ("poweredOn", [])
    assert list((settings.library_dir / "staging").glob("*")) == []
