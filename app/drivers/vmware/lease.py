"""HttpNfcLease plumbing: keep a lease alive, stream disks down and up over HTTPS.

vSphere moves disk bytes outside the SOAP API: ``ExportVm`` and ``ImportVApp`` return
an ``HttpNfcLease`` whose ``info.deviceUrl`` list has one HTTPS URL per disk. A lease
expires (about five minutes on a real vCenter) unless ``HttpNfcLeaseProgress`` is
called, and must end with ``HttpNfcLeaseComplete`` or ``HttpNfcLeaseAbort`` (an abort of
an import makes vCenter delete the half-created VM). :class:`LeaseKeeper` reports
progress from a background task every ``interval`` seconds while bytes move.

The bytes themselves move through the shared HTTP transport
(:mod:`app.transports.http`: back-pressured download with Range resume, bounded-queue
upload), one client per trust context.

Lease URLs name the host ``*`` ("the host you connected to"): :func:`device_url`
substitutes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from pyVmomi import vmodl

from app.drivers.base import CloudError
from app.drivers.kit.session import poll
from app.errors import AppError
from app.transports.http import Errors

log = logging.getLogger(__name__)

STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"
#: Runs a blocking pyvmomi call in a thread with its errors mapped (driver.call).
Call = Callable[[str, Callable[[], Any]], Awaitable[Any]]


def device_url(url: str, host: str, port: int) -> str:
    """``url`` with a ``*`` host replaced by the host (and port) we connected to."""
    parts = urlsplit(url)
    if parts.hostname != "*":
        return url
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return parts._replace(netloc=netloc).geturl()


async def wait_ready(call: Call, errors: Errors, lease: Any, limit: float) -> Any:
    """Wait until the lease is ``ready``; returns ``lease.info``. Raises the lease's
    error translated, or ``CloudError`` when it stays ``initializing`` too long."""
    last = ["initializing"]

    async def ready() -> Any:
        state = last[0] = str(await call("wait for the transfer lease", lambda: lease.state))
        if state == "ready":
            return await call("read the transfer lease", lambda: lease.info)
        if state == "error":
            error = await call("read the transfer lease error", lambda: lease.error)
            if not isinstance(error, BaseException):
                raise CloudError(f"the transfer lease failed: {error}")
            with errors("prepare the transfer lease"):
                raise error
        if state == "done":
            raise CloudError("the transfer lease ended before any transfer")
        return None

    return await poll(ready, what="wait for the transfer lease", limit=limit,
                      on_timeout=lambda: CloudError(
                          f"the transfer lease is still {last[0]} after {limit:.0f} s"))


class LeaseKeeper:
    """Reports lease progress every ``interval`` s; completes or aborts the lease once.

    ``total`` is the expected byte count (a percentage basis only: a compressed
    export is smaller than the disks' capacity); ``add`` counts bytes as they move.
    """

    def __init__(self, call: Call, lease: Any, total: int, interval: float) -> None:
        self._call = call
        self._lease = lease
        self._total = max(total, 1)
        self._interval = interval
        self.done = 0
        self._task: asyncio.Task[None] | None = None
        self._ended = False

    def add(self, n: int) -> None:
        self.done += n

    @property
    def percent(self) -> int:
        return min(99, self.done * 100 // self._total)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lease-progress")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            report = functools.partial(self._lease.HttpNfcLeaseProgress, self.percent)
            try:
                await self._call("report transfer progress", report)
            except AppError as exc:  # the transfer itself will fail if the lease is gone
                log.warning("lease progress report failed: %s", exc)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def complete(self) -> None:
        await self._stop()
        if self._ended:
            return
        self._ended = True
        await self._call("report transfer progress", lambda: self._lease.HttpNfcLeaseProgress(100))
        await self._call("complete the transfer lease", lambda: self._lease.HttpNfcLeaseComplete())

    async def abort(self, reason: str) -> None:
        """Abort; never raises (it runs while another error propagates)."""
        await self._stop()
        if self._ended:
            return
        self._ended = True
        fault_class: Any = vmodl.fault.SystemError
        fault = fault_class(reason=reason[:500], msg=reason[:500])
        try:
            await asyncio.shield(
                self._call("abort the transfer lease", lambda: self._lease.HttpNfcLeaseAbort(fault))
            )
        except (AppError, asyncio.CancelledError) as exc:
            log.warning("aborting the transfer lease failed: %s", exc)
