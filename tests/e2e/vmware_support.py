"""Helpers for end-to-end migrations against vcsim: clouds via the API, disks with
data, power and snapshot state as vSphere itself reports it."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.crypto import SecretBox
from app.db import Database
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.retry import RetryPolicy
from app.engines.worker import Worker, WorkerConfig
from app.storage.base import ImageStore
from tests.conftest import auth
from tests.infra.vcsim import Vcsim, find_vm, wait_for_task

MiB = 1024 * 1024


def disk_with_holes(path: Path, size: int, seed: int) -> Path:
    """Random data in about half of the 256 KiB blocks plus an unaligned run; holes elsewhere."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        f.truncate(size)
        for offset in range(0, size, 256 * 1024):
            if rng.random() < 0.5:
                f.seek(offset + rng.randrange(0, 64 * 1024))
                f.write(rng.randbytes(rng.randrange(1, 128 * 1024)))
        f.seek(size // 3 + 7)
        f.write(b"unaligned" * 100)
    return path


@contextlib.contextmanager
def borrowed_vm(vcsim: Vcsim, vm_name: str, size: int, data: Path) -> Iterator[None]:
    """Give a model VM a ``size`` disk holding ``data``, powered on; on exit put it back
    as the other tests expect it (1 MiB disk, powered on): the simulator is shared."""
    original = disk_capacity(vcsim, vm_name)
    resize_disk(vcsim, vm_name, size)
    vcsim.upload_disk(vm_name, data)
    set_power(vcsim, vm_name, on=True)
    try:
        yield
    finally:
        resize_disk(vcsim, vm_name, original)
        set_power(vcsim, vm_name, on=True)


def disk_capacity(vcsim: Vcsim, vm_name: str) -> int:
    from pyVmomi import vim

    with vcsim.connect() as si:
        vm: Any = find_vm(si, vm_name)
        disk: Any = next(d for d in vm.config.hardware.device
                         if isinstance(d, vim.vm.device.VirtualDisk))
        return int(disk.capacityInKB) * 1024


def resize_disk(vcsim: Vcsim, vm_name: str, size: int) -> None:
    """Set the VM's first disk capacity (the model VMs start with 1 MiB disks)."""
    from pyVmomi import vim

    api: Any = vim  # pyVmomi's data objects are untyped
    with vcsim.connect() as si:
        vm: Any = find_vm(si, vm_name)
        disk: Any = next(d for d in vm.config.hardware.device
                         if isinstance(d, vim.vm.device.VirtualDisk))
        disk.capacityInKB = size // 1024
        disk.capacityInBytes = size
        change = api.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
        wait_for_task(si, vm.ReconfigVM_Task(spec=api.vm.ConfigSpec(deviceChange=[change])))


def vm_state(vcsim: Vcsim, vm_name: str) -> tuple[str, list[str]]:
    """(power state, snapshot names) as vSphere reports them."""
    with vcsim.connect() as si:
        vm: Any = find_vm(si, vm_name)
        names: list[str] = []
        pending = list(vm.snapshot.rootSnapshotList) if vm.snapshot else []
        while pending:
            node = pending.pop()
            names.append(str(node.name))
            pending.extend(node.childSnapshotList or [])
        return str(vm.runtime.powerState), names


def set_power(vcsim: Vcsim, vm_name: str, on: bool) -> None:
    with vcsim.connect() as si:
        vm: Any = find_vm(si, vm_name)
        is_on = str(vm.runtime.powerState) == "poweredOn"
        if on and not is_on:
            wait_for_task(si, vm.PowerOnVM_Task())
        elif not on and is_on:
            wait_for_task(si, vm.PowerOffVM_Task())


async def add_vmware_cloud(client: httpx.AsyncClient, token: str, vcsim: Vcsim,
                           password: str | None = None, name: str = "vcsim") -> str:
    r = await client.post("/v1/clouds", headers=auth(token), json={
        "name": name, "kind": "vmware",
        "settings": {"host": vcsim.host, "port": vcsim.port,
                     "ca_bundle": vcsim.ca_bundle.read_text(), "datacenter": vcsim.datacenter},
        "credentials": {"username": vcsim.username, "password": password or vcsim.password},
    })
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def make_worker(settings: Any, db: Database, box: SecretBox, store: ImageStore,
                **config: Any) -> Worker:
    deps = EngineDeps(settings=settings, db=db, box=box, store=store)
    defaults: dict[str, Any] = dict(lease_seconds=5.0, heartbeat_seconds=0.2,
                                    poll_seconds=0.05,
                                    retry=RetryPolicy(max_attempts=2, initial_delay=0.05))
    return Worker(db, box, default_engines(deps), WorkerConfig(**{**defaults, **config}))


async def run_until(worker: Worker, done: Callable[[], Awaitable[bool]],
                    timeout: float = 120.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
