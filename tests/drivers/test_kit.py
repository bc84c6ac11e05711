"""The driver kit: session life cycle, SDK calls in threads with their errors mapped,
polling, and the power/snapshot rules, on a small in-memory platform.

The platform below is the kit's own test stand-in (what a platform package provides:
primitives over an "SDK" that here is a dict of servers). The VMware driver runs the
same kit code against vcsim in ``test_vmware.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from app.drivers.base import (
    CloudAuthError,
    CloudError,
    CloudStateError,
    CloudUnavailable,
    ImportDisk,
    PowerState,
    ShutdownMethod,
    SnapshotRef,
)
from app.drivers.kit.errors import cloud_boundary
from app.drivers.kit.power import PowerOps
from app.drivers.kit.session import DriverSession, poll
from app.drivers.kit.transfer import disk_filler, probe_stream_format
from app.errormap import ErrorRule
from app.errors import InvalidInput, NotFound
from app.formats.io import BytesSource
from app.formats.probes import QCOW2_MAGIC, VMDK_MAGIC
from app.formats.registry import open_reader
from app.models.enums import ImageFormat

SECRET = "platform-Password-99"


class SdkDenied(Exception):
    """What the stand-in "SDK" raises for a refused call."""


class SdkMissing(Exception):
    pass


@dataclass
class Server:
    power: PowerState = PowerState.on
    guest_tools: bool = True
    guest_shutdown_seconds: float = 0.0
    snapshots: list[SnapshotRef] = field(default_factory=list)


@dataclass
class Sdk:
    servers: dict[str, Server] = field(default_factory=dict)
    threads: set[str] = field(default_factory=set)
    logins: int = 0
    logouts: int = 0
    fail_login: Exception | None = None
    fail_logout: bool = False
    calls: list[str] = field(default_factory=list)

    def server(self, sid: str) -> Server:
        self.threads.add(threading.current_thread().name)
        if sid not in self.servers:
            raise SdkMissing(f"server {sid} not found")
        return self.servers[sid]


class StandInDriver(PowerOps, DriverSession):
    errors_table = DriverSession.errors_table.extend([
        ErrorRule(SdkDenied, lambda exc, b, action: CloudAuthError(
            b.scrub(f"{action}: {b.username} denied on {b.where}: {exc}")), hide_cause=True),
        ErrorRule(SdkMissing, lambda exc, b, action: NotFound(f"{action}: {exc}")),
    ])
    shutdown_poll = 0.01

    def __init__(self, sdk: Sdk) -> None:
        super().__init__(cloud_boundary("Stand-in api:443", username="svc", trust="test",
                                        secrets=(SECRET,)))
        self.sdk = sdk

    async def _open(self) -> None:
        def login() -> None:
            if self.sdk.fail_login is not None:
                raise self.sdk.fail_login
            self.sdk.logins += 1
        await self.call("log in", login)

    async def _close(self) -> None:
        self.sdk.logouts += 1
        if self.sdk.fail_logout:
            raise RuntimeError(f"logout failed for {SECRET}")

    async def _read_power(self, server_id: str) -> PowerState:
        return await self.call("read power", lambda: self.sdk.server(server_id).power)

    async def _request_guest_shutdown(self, server_id: str) -> None:
        server = await self.call("shut down", lambda: self.sdk.server(server_id))
        self.sdk.calls.append("guest")
        if not server.guest_tools:
            raise CloudError("no guest tools")
        loop = asyncio.get_running_loop()
        loop.call_later(server.guest_shutdown_seconds,
                        lambda: setattr(server, "power", PowerState.off))

    async def _hard_power_off(self, server_id: str) -> None:
        server = await self.call("power off", lambda: self.sdk.server(server_id))
        self.sdk.calls.append("off")
        if server.power is PowerState.off:
            raise CloudStateError("already off")
        server.power = PowerState.off

    async def _hard_power_on(self, server_id: str) -> None:
        self.sdk.calls.append("on")
        (await self.call("power on", lambda: self.sdk.server(server_id))).power = PowerState.on

    async def _list_snapshots(self, server_id: str) -> Sequence[SnapshotRef]:
        return tuple(await self.call("list", lambda: self.sdk.server(server_id).snapshots))

    async def _take_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        server = await self.call("snapshot", lambda: self.sdk.server(server_id))
        ref = SnapshotRef(id=f"snap-{len(server.snapshots)}", name=name)
        server.snapshots.append(ref)
        return ref

    async def _delete_snapshot(self, server_id: str, snapshot: SnapshotRef) -> None:
        server = await self.call("delete", lambda: self.sdk.server(server_id))
        if snapshot not in server.snapshots:
            raise NotFound("gone")
        server.snapshots.remove(snapshot)


async def test_session_life_cycle_and_safe_close(caplog: pytest.LogCaptureFixture) -> None:
    sdk = Sdk(fail_logout=True)
    caplog.set_level(logging.INFO)
    async with StandInDriver(sdk) as driver:
        assert driver.connected
        assert sdk.logins == 1
        await driver.connect()  # idempotent
        assert sdk.logins == 1
    assert not driver.connected
    await driver.close()  # twice: never raises, even when logout fails
    assert sdk.logouts == 2
    assert SECRET not in caplog.text
    assert "***" in caplog.text


async def test_a_failed_login_is_translated_and_closes() -> None:
    sdk = Sdk(fail_login=SdkDenied(f"bad password {SECRET}"))
    with pytest.raises(CloudAuthError) as info:
        async with StandInDriver(sdk):
            pytest.fail("not reached")
    assert str(info.value) == "log in: svc denied on Stand-in api:443: bad password ***"
    assert info.value.__cause__ is None
    assert sdk.logouts == 1
    sdk.fail_login = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(CloudUnavailable, match="cannot reach Stand-in api:443"):
        await StandInDriver(sdk).connect()


async def test_sdk_calls_run_in_threads_with_errors_mapped() -> None:
    sdk = Sdk(servers={"s1": Server()})
    async with StandInDriver(sdk) as driver:
        assert await driver.power_state("s1") is PowerState.on
        with pytest.raises(NotFound, match="read power: server s2 not found"):
            await driver.power_state("s2")
    assert threading.main_thread().name not in sdk.threads


async def test_poll_backs_off_and_gives_up_at_its_limit() -> None:
    seen: list[float] = []
    loop = asyncio.get_running_loop()

    async def never() -> int | None:
        seen.append(loop.time())
        return None

    with pytest.raises(CloudUnavailable, match=r"the task: not done after 0\.3 s"):
        await poll(never, what="the task", limit=0.3, first_delay=0.02, max_delay=0.08)
    # Waits of 0.02, 0.04, 0.08, 0.08, ... within 0.3 s: about six probes (fifteen
    # without the backoff), the last one at the limit.
    assert 3 <= len(seen) <= 8
    assert seen[-1] - seen[0] >= 0.29
    countdown = iter([None, None, 7])

    async def third() -> int | None:
        return next(countdown)

    assert await poll(third, what="x", limit=5, first_delay=0.001) == 7
    with pytest.raises(CloudError, match="custom"):
        await poll(never, what="x", limit=0, on_timeout=lambda: CloudError("custom"))


async def test_shutdown_asks_the_guest_then_powers_off() -> None:
    sdk = Sdk(servers={"s1": Server(guest_shutdown_seconds=0.05),
                       "slow": Server(guest_shutdown_seconds=10),
                       "no-tools": Server(guest_tools=False),
                       "asleep": Server(power=PowerState.suspended)})
    async with StandInDriver(sdk) as d:
        assert await d.shutdown("s1", grace=5) is ShutdownMethod.guest
        assert await d.shutdown("s1", grace=5) is ShutdownMethod.already_off
        assert await d.shutdown("slow", grace=0.1) is ShutdownMethod.power_off
        assert await d.shutdown("no-tools", grace=5) is ShutdownMethod.power_off
        await d.power_on("no-tools")
        sdk.calls.clear()
        assert await d.shutdown("no-tools", grace=0) is ShutdownMethod.power_off
        assert sdk.calls == ["off"]  # grace 0: the guest is not asked
        with pytest.raises(CloudStateError, match="suspended"):
            await d.shutdown("asleep", grace=5)


async def test_power_on_and_restore_are_idempotent() -> None:
    sdk = Sdk(servers={"s1": Server(power=PowerState.off)})
    async with StandInDriver(sdk) as d:
        await d.power_on("s1")
        await d.power_on("s1")
        assert sdk.calls == ["on"]
        await d.restore_power("s1", PowerState.off)
        assert await d.power_state("s1") is PowerState.off
        await d.restore_power("s1", PowerState.unknown)  # left alone
        assert await d.power_state("s1") is PowerState.off
        await d.restore_power("s1", PowerState.on)
        await d.restore_power("s1", PowerState.on)
        assert await d.power_state("s1") is PowerState.on


async def test_snapshots_by_name_are_idempotent() -> None:
    sdk = Sdk(servers={"s1": Server()})
    async with StandInDriver(sdk) as d:
        first = await d.create_snapshot("s1", "vmigrate-m1")
        assert await d.create_snapshot("s1", "vmigrate-m1") == first  # no second one
        assert await d.find_snapshot("s1", "vmigrate-m1") == first
        assert await d.find_snapshot("s1", "other") is None
        assert await d.remove_snapshot("s1", "vmigrate-m1")
        assert not await d.remove_snapshot("s1", "vmigrate-m1")
        assert not await d.remove_snapshot("gone", "vmigrate-m1")  # no server, nothing left
        with pytest.raises(NotFound):
            await d.find_snapshot("gone", "x")


def test_streams_are_probed_among_the_formats_the_platform_sends() -> None:
    both = (ImageFormat.vmdk, ImageFormat.raw)
    assert probe_stream_format(VMDK_MAGIC + b"\0" * 508, both) is ImageFormat.vmdk
    assert probe_stream_format(b"\0" * 512, both) is ImageFormat.raw
    assert probe_stream_format(QCOW2_MAGIC + b"\0" * 60, (ImageFormat.qcow2, ImageFormat.raw)
                               ) is ImageFormat.qcow2
    # qcow2 bytes from a platform that only sends vmdk or raw: raw (it is not asked for)
    assert probe_stream_format(QCOW2_MAGIC, both) is ImageFormat.raw
    with pytest.raises(CloudError, match="none of the formats expected"):
        probe_stream_format(b"\0" * 512, (ImageFormat.vmdk,))


async def test_a_ready_image_larger_than_its_disk_is_refused() -> None:
    reader = await open_reader(BytesSource(b"\1" * 4096), "raw")
    with pytest.raises(InvalidInput, match="does not fit a disk of 1024 bytes"):
        disk_filler(ImportDisk(capacity=1024, content=reader), ImageFormat.vmdk)
    assert callable(disk_filler(ImportDisk(capacity=4096, content=reader), ImageFormat.vmdk))
    await reader.close()
