"""HttpNfcLease plumbing: keep a lease alive, stream disks down and up over HTTPS.

vSphere moves disk bytes outside the SOAP API: ``ExportVm`` and ``ImportVApp`` return
an ``HttpNfcLease`` whose ``info.deviceUrl`` list has one HTTPS URL per disk. A lease
expires (about five minutes on a real vCenter) unless ``HttpNfcLeaseProgress`` is
called, and must end with ``HttpNfcLeaseComplete`` or ``HttpNfcLeaseAbort`` (an abort of
an import makes vCenter delete the half-created VM). :class:`LeaseKeeper` reports
progress from a background task every ``interval`` seconds while bytes move.

Transfers use one ``httpx.AsyncClient`` per trust context (``trust_env=False``: proxy
and CA variables of the environment must not change who we trust):

* download (:class:`NfcDownload`): a :class:`~app.formats.base.SequentialSource` over
  a streamed GET. Nothing is read from the socket until the consumer asks, so a slow
  pipeline slows the server down through TCP flow control (back-pressure).
* upload (:func:`upload`): the disk's filler writes into a bounded queue
  (:class:`QueueSink`) that the POST body drains; a slow link blocks the filler, and a
  failure on either side cancels the other.

Lease URLs name the host ``*`` ("the host you connected to"): :func:`device_url`
substitutes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

import httpx
from pyVmomi import vmodl

from app.drivers.base import CloudError, DiskFiller
from app.errors import AppError

log = logging.getLogger(__name__)

STREAM_VMDK = "application/x-vnd.vmware-streamVmdk"
#: Smallest head read before the format is probed (VMDK magic and a bit more).
PROBE_BYTES = 512

#: Runs a blocking pyvmomi call in a thread with its errors mapped (driver._call).
Call = Callable[[str, Callable[[], Any]], Awaitable[Any]]
#: Opens a map_exceptions block for an action (bound to the endpoint).
Errors = Callable[[str], AbstractContextManager[None]]


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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = 0.05
    while True:
        state = str(await call("wait for the transfer lease", lambda: lease.state))
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
        if loop.time() > deadline:
            raise CloudError(f"the transfer lease is still {state} after {limit:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


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


class NfcDownload:
    """A streamed GET of one lease device URL as a :class:`SequentialSource`.

    :meth:`start` sends the request and reads the first bytes (to probe the format);
    :meth:`read` hands out at most ``n`` bytes, pulling from the socket only when its
    buffer is empty. ``size`` is the Content-Length, else ``fallback_size``: the raw
    reader needs a size, and a raw export is as long as the disk.
    """

    def __init__(self, client: httpx.AsyncClient, url: str, headers: dict[str, str],
                 errors: Errors, on_bytes: Callable[[int], None], fallback_size: int) -> None:
        self._client = client
        self.url = url  # carries the lease ticket: never log it
        self._headers = headers
        self._errors = errors
        self._on_bytes = on_bytes
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._buf = b""
        self._pos = 0
        self._eof = False
        self.content_length: int | None = None
        self.size = fallback_size

    async def start(self) -> bytes:
        """Open the stream; returns its first bytes (up to :data:`PROBE_BYTES`, not consumed)."""
        with self._errors("start the disk download"):
            request = self._client.build_request("GET", self.url, headers=self._headers)
            self._response = await self._client.send(request, stream=True)
            self._response.raise_for_status()
        length = self._response.headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = self.size = int(length)
        self._chunks = self._response.aiter_bytes()
        while len(self._buf) - self._pos < PROBE_BYTES and not self._eof:
            await self._fill()
        return self._buf[self._pos : self._pos + PROBE_BYTES]

    async def _fill(self) -> None:
        assert self._chunks is not None
        with self._errors("download the disk"):
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._eof = True
                return
        self._on_bytes(len(chunk))
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0

    async def read(self, n: int) -> bytes:
        if self._chunks is None:
            await self.start()
        while self._pos >= len(self._buf) and not self._eof:
            await self._fill()
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    async def close(self) -> None:
        if self._response is not None:
            response, self._response = self._response, None
            with contextlib.suppress(httpx.HTTPError, OSError):
                await response.aclose()


class QueueSink:
    """A :class:`SequentialSink` whose writes wait for room in a bounded queue."""

    def __init__(self, depth: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=depth)

    async def write(self, data: bytes | memoryview) -> None:
        if data:
            await self.queue.put(bytes(data))  # a copy: writers may reuse their buffers

    async def close(self) -> None:
        return None


async def upload(client: httpx.AsyncClient, url: str, fill: DiskFiller, *, size: int | None,
                 headers: dict[str, str], errors: Errors, on_bytes: Callable[[int], None],
                 depth: int) -> int:
    """POST what ``fill`` writes to ``url``, streamed; returns the byte count.

    With ``size`` the request has a Content-Length and the byte count is checked;
    without, it is sent chunked. The first failure of the filler or the request
    cancels the other and propagates.
    """
    sink = QueueSink(depth)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        while (chunk := await sink.queue.get()) is not None:
            sent += len(chunk)
            if size is not None and sent > size:
                raise CloudError(f"the disk encodes to more than the declared {size} bytes")
            on_bytes(len(chunk))
            yield chunk

    async def produce() -> None:
        await fill(sink)
        await sink.queue.put(None)

    async def post() -> None:
        all_headers = {"Content-Type": STREAM_VMDK, **headers}
        if size is not None:
            all_headers["Content-Length"] = str(size)
        with errors("upload the disk"):
            response = await client.post(url, content=body(), headers=all_headers)
            response.raise_for_status()

    tasks = [asyncio.create_task(produce(), name="disk-fill"),
             asyncio.create_task(post(), name="disk-upload")]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            failure = task.exception()
            if failure is not None:
                raise failure
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if size is not None and sent != size:
        raise CloudError(f"the disk encoded to {sent} bytes, {size} were declared")
    return sent
