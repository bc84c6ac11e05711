"""Power and snapshot operations every source driver offers, from a few primitives.

A platform implements the primitives (read the power state, ask the guest to shut
down, power off hard, power on, list/create/delete snapshots); :class:`PowerOps`
turns them into the :class:`~app.drivers.base.SourceDriver` methods with the shared
rules: shutdown with a grace period then a hard power off, idempotence everywhere
(``already_off``, power on of a running server, snapshots found by name), a
suspended server refused (powering it off would discard its suspended state).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from app.drivers.base import CloudError, CloudStateError, PowerState, ShutdownMethod, SnapshotRef
from app.errors import NotFound

log = logging.getLogger(__name__)


class PowerOps:
    """Mixin for a driver: implement the ``_`` primitives, get the public methods."""

    #: Seconds between power-state reads while the guest shuts down.
    shutdown_poll: float = 2.0

    # --- primitives -------------------------------------------------------------------

    async def _read_power(self, server_id: str) -> PowerState:
        raise NotImplementedError

    async def _request_guest_shutdown(self, server_id: str) -> None:
        """Ask the guest OS to shut down (returns at once). Raise ``CloudError`` or
        ``NotFound`` when the platform refuses (no guest tools, not supported)."""
        raise NotImplementedError

    async def _hard_power_off(self, server_id: str) -> None:
        raise NotImplementedError

    async def _hard_power_on(self, server_id: str) -> None:
        raise NotImplementedError

    async def _list_snapshots(self, server_id: str) -> Sequence[SnapshotRef]:
        """Raises ``NotFound`` when the server does not exist."""
        raise NotImplementedError

    async def _take_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        raise NotImplementedError

    async def _delete_snapshot(self, server_id: str, snapshot: SnapshotRef) -> None:
        """Raises ``NotFound`` when it is gone already."""
        raise NotImplementedError

    # --- the SourceDriver methods -----------------------------------------------------

    async def power_state(self, server_id: str) -> PowerState:
        return await self._read_power(server_id)

    async def shutdown(self, server_id: str, *, grace: float) -> ShutdownMethod:
        state = await self._read_power(server_id)
        if state is PowerState.off:
            return ShutdownMethod.already_off
        if state is PowerState.suspended:
            raise CloudStateError(
                f"server {server_id} is suspended: resume it or power it off first (a power "
                "off would discard its suspended state)"
            )
        if grace > 0 and await self._guest_shutdown(server_id, grace):
            return ShutdownMethod.guest
        try:
            await self._hard_power_off(server_id)
        except CloudStateError:  # raced to off (the guest finished after all)
            if await self._read_power(server_id) is not PowerState.off:
                raise
        return ShutdownMethod.power_off

    async def _guest_shutdown(self, server_id: str, grace: float) -> bool:
        """Whether the guest was off within ``grace`` seconds of being asked."""
        try:
            await self._request_guest_shutdown(server_id)
        except (CloudError, NotFound) as exc:
            log.info("guest shutdown of %s refused (%s); powering off", server_id, exc)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while loop.time() < deadline:
            if await self._read_power(server_id) is PowerState.off:
                return True
            await asyncio.sleep(min(self.shutdown_poll, max(deadline - loop.time(), 0)))
        log.info("guest of %s still running after %.0f s; powering off", server_id, grace)
        return False

    async def power_on(self, server_id: str) -> None:
        if await self._read_power(server_id) is not PowerState.on:
            await self._hard_power_on(server_id)

    async def restore_power(self, server_id: str, state: PowerState) -> None:
        if state is PowerState.on:
            await self.power_on(server_id)
        elif state is PowerState.off and await self._read_power(server_id) is PowerState.on:
            await self.shutdown(server_id, grace=0)

    async def find_snapshot(self, server_id: str, name: str) -> SnapshotRef | None:
        return next((s for s in await self._list_snapshots(server_id) if s.name == name), None)

    async def create_snapshot(self, server_id: str, name: str) -> SnapshotRef:
        existing = await self.find_snapshot(server_id, name)
        if existing is not None:
            return existing
        return await self._take_snapshot(server_id, name)

    async def remove_snapshot(self, server_id: str, name: str) -> bool:
        try:
            snapshots = await self._list_snapshots(server_id)
        except NotFound:
            return False  # the server is gone, and its snapshots with it
        removed = False
        for snapshot in [s for s in snapshots if s.name == name]:
            try:
                await self._delete_snapshot(server_id, snapshot)
            except NotFound:
                continue  # removed concurrently: that is what we wanted
            removed = True
        return removed
