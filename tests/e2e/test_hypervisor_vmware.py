"""Hypervisor migrations end to end: the API, a real worker, the VMware driver against
vcsim (a real vSphere API simulator, see tests/infra/vcsim.py), the real pipeline and
formats, and the library on local disk; qemu-img and the vmd1 digest as oracles."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
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
from tests.formats.oracle import qemu_img
from tests.infra.vcsim import Vcsim

SIZE = 12 * MiB


@pytest.fixture
def box(settings: Settings) -> SecretBox:
    return SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(settings.library_dir)


@pytest.fixture
def vm_disk(vcsim: Vcsim, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """DC0_H0_VM1 with a 12 MiB disk of data and holes, powered on."""
    name = "DC0_H0_VM1"
    raw = disk_with_holes(tmp_path / "source.raw", SIZE, seed=11)
    with borrowed_vm(vcsim, name, SIZE, raw):
        yield name, raw


async def _migration(client: httpx.AsyncClient, token: str, mid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/migrations/{mid}", headers=auth(token))
    return dict(r.json())


def _ends(client: httpx.AsyncClient, token: str, mid: str) -> Callable[[], Awaitable[bool]]:
    async def done() -> bool:
        return (await _migration(client, token, mid))["status"] in (
            "completed", "failed", "cancelled")
    return done


async def _create(client: httpx.AsyncClient, token: str, cloud: str, vm: str,
                  **extra: Any) -> str:
    body: dict[str, Any] = {
        "type": "hypervisor", "name": f"{vm} to library", "mode": "store",
        "platform": "linux", "format": "qcow2",
        "source": {"cloud_id": cloud, "server": {"name": vm}}, "run": True,
        "options": {"power_off": True},
    }
    body.update(extra)
    r = await client.post("/v1/migrations", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhd", "raw"])
async def test_store_into_library(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim, vm_disk: tuple[str, Path],
    tmp_path: Path, fmt: str,
) -> None:
    vm, raw = vm_disk
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim)
    mid = await _create(client, token, cloud, vm, format=fmt)
    await run_until(make_worker(settings, db, box, store), _ends(client, token, mid))

    m = await _migration(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert m["progress"]["bytes_done"] == m["progress"]["bytes_total"] == SIZE
    images = (await client.get("/v1/images", headers=auth(token))).json()["items"]
    assert len(images) == 1
    image = images[0]
    assert (image["format"], image["virtual_size"]) == (fmt, SIZE)
    assert image["digest"] == digest_file(str(raw))
    assert image["migration_id"] == mid
    assert image["cloud_id"] == cloud
    assert image["server"] == vm
    content = await client.get(f"/v1/images/{image['id']}/content", headers=auth(token))
    stored = tmp_path / f"stored.{fmt}"
    stored.write_bytes(content.content)
    qfmt = "vpc" if fmt == "vhd" else fmt
    cmp = qemu_img("compare", "-f", qfmt, "-F", "raw", stored, raw, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    # the source is as it was: powered on again, no snapshot left behind
    assert vm_state(vcsim, vm) == ("poweredOn", [])
    assert list((settings.library_dir / "staging").glob("*")) == []
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    types = [e["type"] for e in events]
    assert "migration.snapshot.created" in types
    assert "image.created" in types
    assert vcsim.password not in str(events)


async def test_wrong_password_fails_at_validate_and_changes_nothing(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim, vm_disk: tuple[str, Path],
) -> None:
    vm, _ = vm_disk
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim, password="not-the-password-42")
    mid = await _create(client, token, cloud, vm)
    await run_until(make_worker(settings, db, box, store), _ends(client, token, mid))
    m = await _migration(client, token, mid)
    assert m["status"] == "failed"
    assert m["error"]["step"] == "validate"
    assert "authentication" in m["error"]["detail"].lower()
    assert "not-the-password-42" not in str(m)
    steps = {s["name"]: s["status"] for s in m["steps"]}
    assert steps["power_off"] == "pending"
    assert steps["restore_power"] == "pending"
    assert vm_state(vcsim, vm) == ("poweredOn", [])


async def test_unknown_vm_fails_at_validate(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim,
) -> None:
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim)
    mid = await _create(client, token, cloud, "no-such-vm-here")
    await run_until(make_worker(settings, db, box, store), _ends(client, token, mid))
    m = await _migration(client, token, mid)
    assert m["status"] == "failed"
    assert m["error"]["step"] == "validate"
    assert "no-such-vm-here" in m["error"]["detail"]


async def test_cancel_during_export_restores_the_source(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim, vm_disk: tuple[str, Path],
) -> None:
    vm, _ = vm_disk
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim)
    # a slow export (throttled) so the cancel lands mid-stream
    mid = await _create(client, token, cloud, vm,
                        options={"power_off": True, "throttle_bytes_per_second": 2 * MiB})

    async def exporting() -> bool:
        m = await _migration(client, token, mid)
        in_export = m["phase"] == "transfer" and int(m["progress"]["bytes_done"]) > 0
        return in_export or m["status"] not in ("running", "queued")

    worker = make_worker(settings, db, box, store)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while not await exporting():
                await asyncio.sleep(0.05)
            r = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
            assert r.status_code == 200, r.text
            while not await _ends(client, token, mid)():
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    m = await _migration(client, token, mid)
    assert m["status"] == "cancelled"
    steps = {s["name"]: s["status"] for s in m["steps"]}
    assert steps["store"] == "pending"
    assert steps["remove_snapshot"] == "completed"
    assert steps["restore_power"] == "completed"
    assert vm_state(vcsim, vm) == ("poweredOn", [])
    assert (await client.get("/v1/images", headers=auth(token))).json()["items"] == []
    assert list((settings.library_dir / "staging").glob("*")) == []


async def test_new_vm_on_another_host(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim, vm_disk: tuple[str, Path],
) -> None:
    vm, raw = vm_disk
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim)
    target = "vmigrated-copy"
    mid = await _create(client, token, cloud, vm, mode="new", format=None, destination={
        "cloud_id": cloud, "server_name": target, "cluster": "DC0_C0",
        "datastore": "LocalDS_0", "network": "VM Network"})
    await run_until(make_worker(settings, db, box, store), _ends(client, token, mid))
    m = await _migration(client, token, mid)
    assert m["status"] == "completed", m["error"]
    steps = {s["name"]: s for s in m["steps"]}
    assert steps["verify"]["status"] == "completed"
    assert steps["verify"]["result"]["digests"] == [digest_file(str(raw))]
    # cutover: the source stays off, the snapshot is gone
    assert vm_state(vcsim, vm) == ("poweredOff", [])
    assert vm_state(vcsim, target)[1] == []


async def test_library_image_reprovisioned_to_vmware(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    box: SecretBox, store: LocalStore, vcsim: Vcsim, tmp_path: Path,
) -> None:
    """The spec's "re-provisioned": a library image becomes a new VM."""
    token = await make_token()
    cloud = await add_vmware_cloud(client, token, vcsim)
    raw = disk_with_holes(tmp_path / "golden.raw", 6 * MiB, seed=21)
    qcow = tmp_path / "golden.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    up = await client.post("/v1/images", params={"name": "golden"}, content=qcow.read_bytes(),
                           headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert up.status_code == 201, up.text
    image = up.json()

    store_mode = await client.post("/v1/migrations", headers=auth(token), json={
        "type": "hypervisor", "name": "nope", "mode": "store", "platform": "linux",
        "source": {"image_id": image["id"]}})
    assert store_mode.status_code == 422
    assert store_mode.json()["errors"][0]["pointer"] == "/source/image_id"

    target = "from-golden"
    r = await client.post("/v1/migrations", headers=auth(token), json={
        "type": "hypervisor", "name": "golden to vcsim", "mode": "new", "platform": "linux",
        "run": True, "source": {"image_id": image["id"]},
        "destination": {"cloud_id": cloud, "server_name": target, "cluster": "DC0_C0",
                        "datastore": "LocalDS_0"}})
    assert r.status_code == 201, r.text
    mid = r.json()["id"]
    assert [s["name"] for s in r.json()["steps"]][:3] == ["validate", "transfer", "check_image"]
    await run_until(make_worker(settings, db, box, store), _ends(client, token, mid))
    m = await _migration(client, token, mid)
    assert m["status"] == "completed", m["error"]
    steps = {s["name"]: s for s in m["steps"]}
    assert steps["verify"]["result"]["digests"] == [image["digest"]] == [digest_file(str(raw))]
    assert vm_state(vcsim, target)[1] == []
