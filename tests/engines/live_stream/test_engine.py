"""Live stream end to end: migrations created through the API and run by a real worker
with the real engine, from the QEMU guest's LVM volume (``vg0/data``, 48 MiB ext4) over
real SSH to the guest's second disk or a namespace host's loop device.

The guest's reset (``lvm_guest`` fixture) leaves the LV exactly as hashed in
``lv_sha256`` and the destination disk zeroed; what the destination holds afterwards is
read on this side from the disk images, at native speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.crypto import SecretBox
from app.db import Database
from app.engines.live_stream import Tuning
from app.models.db import Migration
from tests.conftest import TokenFactory, auth
from tests.engines.live_stream.support import (
    TERMINAL,
    create,
    events,
    get,
    helper_session_pids,
    run_until,
    ssh_part,
    status_in,
    step,
    worker,
)
from tests.infra.fixtures import NsHostFactory
from tests.infra.guest import LvmGuest

MiB = 1024 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture
def box(settings: Any) -> SecretBox:
    return SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])


def _sha256_head(path: os.PathLike[str] | str, size: int) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def _debugfs(image: os.PathLike[str] | str, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, timeout=60, check=False)
    return proc.stdout + proc.stderr


async def _snapshots(guest: LvmGuest) -> list[str]:
    out = (await guest.arun("lvs --noheadings -o lv_name vg0", check=True))[1]
    return [name for name in out.split() if name != "data"]


async def _dest_sectors_written(guest: LvmGuest) -> int:
    dev = guest.device.removeprefix("/dev/")
    return int((await guest.arun(f"cat /sys/block/{dev}/stat", check=True))[1].split()[6])


async def _checkpoint(db: Database, mid: str) -> dict[str, Any]:
    async with db.session() as session:
        row = await session.get(Migration, uuid.UUID(mid))
        assert row is not None
        await session.refresh(row)
        return dict(row.checkpoint or {})


async def test_streams_the_snapshot_not_later_writes(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    size = g.lv_size_mib * MiB
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(g, g.device),
                       throttle_bytes_per_second=3_000_000)
    wrote_after = False

    async def until() -> bool:
        nonlocal wrote_after
        m = await get(client, token, mid)
        if not wrote_after and step(m, "snapshot")["status"] == "completed":
            # The volume changes after the snapshot: none of it may reach the destination.
            await g.arun("set -e; mkdir -p /mnt/data; mount /dev/vg0/data /mnt/data; "
                         "echo late > /mnt/data/after.txt; echo changed > /mnt/data/hello.txt; "
                         "umount /mnt/data", check=True)
            wrote_after = True
        return m["status"] in TERMINAL

    await run_until(worker(db, box), until)
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert wrote_after
    assert [s["status"] for s in m["steps"]] == ["completed"] * len(m["steps"])
    await g.arun("sync", check=True)
    # Byte for byte the snapshot-time volume (untouched between reset and snapshot).
    assert _sha256_head(g.dest_image, size) == g.lv_sha256
    fsck = subprocess.run(["e2fsck", "-fn", str(g.dest_image)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert _debugfs(g.dest_image, "cat /hello.txt").startswith("hello from vmigrate test guest")
    assert "after.txt" not in _debugfs(g.dest_image, "ls -l /")
    assert await _snapshots(g) == []
    done = next(e for e in await events(client, token, mid)
                if e["type"] == "live_stream.transfer.completed")
    assert done["payload"]["data_bytes"] < size // 3  # zero blocks never crossed


async def test_cancel_mid_transfer_removes_the_snapshot(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    """Also the sudo path: the source login is the password user with passwordless sudo."""
    g = lvm_guest
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path, password_login=True),
                       ssh_part(g, g.device), throttle_bytes_per_second=500_000)
    cancelled = False

    async def until() -> bool:
        nonlocal cancelled
        m = await get(client, token, mid)
        if not cancelled and step(m, "transfer")["status"] == "running" \
                and m["progress"]["bytes_done"] > 0:
            r = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
            assert r.status_code == 200, r.text
            cancelled = True
        return m["status"] in TERMINAL

    await run_until(worker(db, box), until)
    m = await get(client, token, mid)
    assert m["status"] == "cancelled"
    assert step(m, "remove_snapshot")["status"] == "completed"
    assert step(m, "verify")["status"] == "pending"
    assert await _snapshots(g) == []
    incomplete = [e for e in await events(client, token, mid)
                  if e["type"] == "live_stream.destination.incomplete"]
    assert len(incomplete) == 1
    assert incomplete[0]["payload"]["device"] == g.device
    assert incomplete[0]["payload"]["outcome"] == "cancelled"


async def test_dropped_connection_is_retried_and_resumed(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest, ns_host_factory: NsHostFactory) -> None:
    g = lvm_guest
    dest = ns_host_factory(device_mib=64)
    assert dest.sshd is not None
    size = g.lv_size_mib * MiB
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(dest, dest.device),
                       throttle_bytes_per_second=1_000_000)
    killed: list[int] = []

    async def until() -> bool:
        m = await get(client, token, mid)
        if not killed and (await _checkpoint(db, mid)).get("offset", 0) > 0:
            pids = helper_session_pids(dest.sshd.pid)  # type: ignore[union-attr]
            if pids:
                os.kill(pids[0], signal.SIGKILL)  # the destination's sshd session
                killed.append(pids[0])
        return m["status"] in TERMINAL

    await run_until(worker(db, box), until)
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert killed
    types = [e["type"] for e in await events(client, token, mid)]
    assert "migration.step.retrying" in types
    resumed = [e for e in await events(client, token, mid)
               if e["type"] == "live_stream.transfer.resumed"]
    assert resumed
    assert resumed[0]["payload"]["offset"] > 0
    assert _sha256_head(dest.backing_file, size) == g.lv_sha256
    assert await _snapshots(g) == []


async def test_snapshot_overflow_fails_with_that_reason(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(g, g.device),
                       throttle_bytes_per_second=500_000, snapshot_size_bytes=4 * MiB)
    flooded = False

    async def until() -> bool:
        nonlocal flooded
        m = await get(client, token, mid)
        if not flooded and step(m, "snapshot")["status"] == "completed":
            # 12 MiB of new data into the origin: far more than 4 MiB of COW space.
            await g.arun("dd if=/dev/urandom of=/dev/vg0/data bs=1M count=12 seek=24 "
                         "oflag=direct conv=fsync status=none", check=True)
            flooded = True
        return m["status"] in TERMINAL

    await run_until(worker(db, box), until)
    m = await get(client, token, mid)
    assert m["status"] == "failed"
    assert m["error"]["type"].endswith("/snapshot-overflow"), m["error"]
    assert "overflowed" in m["error"]["detail"]
    assert await _snapshots(g) == []


async def test_unthrottled_transfer_is_handed_over(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest, ns_host_factory: NsHostFactory) -> None:
    """Without a throttle, the source's ssh feeds the destination's directly (the
    default for two python3 hosts): from the guest (python3-minimal: buffered reads) to
    a namespace host holding stale data (punched holes, O_DIRECT writes), verified."""
    g = lvm_guest
    dest = ns_host_factory(device_mib=64)
    size = g.lv_size_mib * MiB
    with dest.backing_file.open("r+b") as f:
        f.write(b"\x5a" * size)
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(dest, dest.device))
    await run_until(worker(db, box), status_in(client, token, mid, *TERMINAL))
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert _sha256_head(dest.backing_file, size) == g.lv_sha256
    done = next(e for e in await events(client, token, mid)
                if e["type"] == "live_stream.transfer.completed")
    assert done["payload"]["handed_over"] is True
    assert done["payload"]["data_bytes"] < size // 3  # zero blocks never crossed
    assert step(m, "verify")["status"] == "completed"
    assert await _snapshots(g) == []


async def test_dd_fallback_end_to_end(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest, ns_host_factory: NsHostFactory) -> None:
    """Both hosts as if they had no python3: dd at both ends, dd+sha256sum to verify."""
    g = lvm_guest
    dest = ns_host_factory(device_mib=64)
    size = g.lv_size_mib * MiB
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(dest, dest.device))
    await run_until(worker(db, box, Tuning(force_dd=True)),
                    status_in(client, token, mid, *TERMINAL))
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert _sha256_head(dest.backing_file, size) == g.lv_sha256
    types = [e["type"] for e in await events(client, token, mid)]
    assert types.count("live_stream.dd_fallback") == 2


async def test_warm_mode_later_passes_send_only_changes(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    size = g.lv_size_mib * MiB
    dd = "dd if=/dev/urandom of=/dev/vg0/data bs=1M oflag=direct conv=fsync status=none"
    # More data than the pass limit below, so a second pass must follow the first.
    await g.arun(f"{dd} count=8 seek=32", check=True)
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(g, g.device),
                       sync="warm", warm_delta_bytes=4 * MiB)
    changed = False

    async def until() -> bool:
        nonlocal changed
        m = await get(client, token, mid)
        if not changed and any(e["type"] == "live_stream.warm.pass"
                               for e in await events(client, token, mid)):
            await g.arun(f"{dd} count=2 seek=20", check=True)  # between pass 1 and 2
            changed = True
        return m["status"] in TERMINAL

    await run_until(worker(db, box, Tuning(warm_pause_seconds=5)), until)
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    assert [s["name"] for s in m["steps"]][:3] == ["validate", "precopy", "snapshot"]
    all_events = await events(client, token, mid)
    passes = [e["payload"] for e in all_events if e["type"] == "live_stream.warm.pass"]
    assert len(passes) == 2, passes
    assert passes[0]["bytes"] > 8 * MiB
    assert passes[1]["bytes"] == 2 * MiB
    assert passes[1]["changed_blocks"] == 2
    assert all(p["seconds"] > 0 for p in passes)
    final = next(e["payload"] for e in all_events
                 if e["type"] == "live_stream.transfer.completed")
    assert final["data_bytes"] == 0  # nothing changed between pass 2 and the snapshot
    await g.arun("sync", check=True)
    assert _sha256_head(g.dest_image, size) == hashlib.sha256(g.read_lv()).hexdigest()
    assert await _snapshots(g) == []


async def test_killed_worker_is_resumed_by_another(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        settings: Any, database_url: str, tmp_path: Path, lvm_guest: LvmGuest,
        ns_host_factory: NsHostFactory) -> None:
    """A ``vmigrate worker`` process is SIGKILLed mid-transfer; once its lease expires an
    in-process worker claims the migration and resumes from the checkpoint."""
    g = lvm_guest
    dest = ns_host_factory(device_mib=64)
    size = g.lv_size_mib * MiB
    token = await make_token()
    mid = await create(client, token, db, ssh_part(g, g.lv_path), ssh_part(dest, dest.device),
                       throttle_bytes_per_second=1_000_000)
    env = {**os.environ, "VMIGRATE_DATABASE_URL": database_url,
           "VMIGRATE_ENCRYPTION_KEYS": ",".join(k.get_secret_value()
                                                 for k in settings.encryption_keys),
           "VMIGRATE_DATA_DIR": str(tmp_path / "worker"), "VMIGRATE_WORKER_LEASE_SECONDS": "3",
           "VMIGRATE_WORKER_HEARTBEAT_SECONDS": "0.5", "VMIGRATE_WORKER_POLL_SECONDS": "0.2"}
    log = (tmp_path / "worker.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(180):
            while (await _checkpoint(db, mid)).get("offset", 0) < 4 * MiB:
                assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                await asyncio.sleep(0.2)
        sent = (await get(client, token, mid))["progress"]["bytes_done"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
    await run_until(worker(db, box), status_in(client, token, mid, *TERMINAL))
    m = await get(client, token, mid)
    assert m["status"] == "completed", m["error"]
    all_events = await events(client, token, mid)
    claims = [e for e in all_events
              if e["type"] in ("migration.started", "migration.reclaimed")]
    assert len({e["payload"]["worker"] for e in claims}) == 2
    resumed = [e["payload"]["offset"] for e in all_events
               if e["type"] == "live_stream.transfer.resumed"]
    assert resumed
    assert resumed[0] >= 4 * MiB
    # Re-sent at most twice the pipeline's queue bound (3 queues x 4 x 1 MiB).
    assert sent - resumed[0] <= 2 * 12 * MiB
    assert _sha256_head(dest.backing_file, size) == g.lv_sha256
    assert await _snapshots(g) == []


# --- validation: each failure before anything is written, with a clear reason ---------


async def _fails_validation(client: httpx.AsyncClient, token: str, db: Database,
                            box: SecretBox, g: LvmGuest, source: dict[str, Any],
                            destination: dict[str, Any], expected: str,
                            writes_checked: bool = True, **options: Any) -> None:
    before = await _dest_sectors_written(g)
    mid = await create(client, token, db, source, destination, **options)
    await run_until(worker(db, box), status_in(client, token, mid, *TERMINAL))
    m = await get(client, token, mid)
    assert m["status"] == "failed"
    assert m["error"]["step"] == "validate"
    assert expected in m["error"]["detail"], m["error"]
    assert [s["name"] for s in m["steps"] if s["status"] != "pending"] == ["validate"]
    assert await _snapshots(g) == []
    if writes_checked:  # (a mounted filesystem writes its own journal meanwhile)
        assert await _dest_sectors_written(g) == before


async def test_validation_unknown_host_key(client: httpx.AsyncClient,
                                           make_token: TokenFactory, db: Database,
                                           box: SecretBox, lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    await _fails_validation(client, await make_token(), db, box, g,
                            ssh_part(g, g.lv_path, pin=False), ssh_part(g, g.device),
                            f"the server presented ssh-ed25519 {g.host_key_fingerprint}")


async def test_validation_wrong_password(client: httpx.AsyncClient, make_token: TokenFactory,
                                         db: Database, box: SecretBox,
                                         lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    source = ssh_part(g, g.lv_path, password_login=True, password="wrong-" + g.password)
    await _fails_validation(client, await make_token(), db, box, g, source,
                            ssh_part(g, g.device),
                            f"authentication failed for {g.password_user}@{g.host}:{g.port}")


async def test_validation_missing_volume(client: httpx.AsyncClient, make_token: TokenFactory,
                                         db: Database, box: SecretBox,
                                         lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    await _fails_validation(client, await make_token(), db, box, g,
                            ssh_part(g, "/dev/vg0/nope"), ssh_part(g, g.device),
                            "logical volume /dev/vg0/nope not found")


async def test_validation_vg_too_small(client: httpx.AsyncClient, make_token: TokenFactory,
                                       db: Database, box: SecretBox,
                                       lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    await _fails_validation(client, await make_token(), db, box, g, ssh_part(g, g.lv_path),
                            ssh_part(g, g.device), "the snapshot needs 1073741824",
                            snapshot_size_bytes=1024 * MiB)


async def test_validation_destination_too_small(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest, ns_host_factory: NsHostFactory) -> None:
    g = lvm_guest
    small = ns_host_factory(device_mib=16)
    await _fails_validation(client, await make_token(), db, box, g, ssh_part(g, g.lv_path),
                            ssh_part(small, small.device), "less than the source's")
    with small.backing_file.open("rb") as f:
        assert not any(f.read())


async def test_validation_destination_mounted(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    await g.arun(f"mkfs.ext4 -q -F {g.device} && mkdir -p /mnt/dest && "
                 f"mount {g.device} /mnt/dest", check=True)
    try:
        await _fails_validation(client, await make_token(), db, box, g,
                                ssh_part(g, g.lv_path), ssh_part(g, g.device),
                                "is in use read-write", writes_checked=False)
    finally:
        await g.arun("umount /mnt/dest", check=True)


async def test_validation_destination_holding_the_source(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox,
        lvm_guest: LvmGuest) -> None:
    g = lvm_guest
    await _fails_validation(client, await make_token(), db, box, g, ssh_part(g, g.lv_path),
                            ssh_part(g, g.pv_device), "holds the source volume")


@pytest.mark.parametrize("device", ["/dev/vg0/data;reboot", "/dev/vg0/$(id)",
                                    "/dev/vg0/../../etc/passwd", "/dev/sdb`id`"])
async def test_shell_metacharacters_are_refused_by_the_api(
        client: httpx.AsyncClient, make_token: TokenFactory, db: Database,
        device: str) -> None:
    from tests.api.migrations_support import add_cloud, assert_problem, live_stream

    token = await make_token()
    body = live_stream(await add_cloud(db, "linux"))
    body["source"]["device"] = device
    body["destination"]["device"] = device
    r = await client.post("/v1/migrations", json=body, headers=auth(token))
    assert_problem(r, 422, "/source/device", "/destination/device")
