"""The live stream's data path: source host -> service -> destination host.

The service is the relay: one SSH connection reads the source, another writes the
destination, and the extents travel between them through the :class:`Pipeline`
(digest, throttle). Nothing is buffered beyond the pipeline's bounded queues, so SSH
flow control carries back-pressure end to end: a slow destination disk stops its
helper reading stdin, its channel window closes, ``drain()`` blocks the sink, the
queues fill, the source iterator stops reading its channel, that window closes and the
source helper blocks writing stdout, which stops it reading the snapshot.

Each end is a helper (``python3``, :mod:`app.engines.live_stream_remote`: zero blocks
detected at the source and never sent, zeros written at the destination only where it
does not already read as zeros, durable offsets reported as it goes) or, on a host
without python3, plain ``dd`` (every byte crosses the network; the destination is
written in segments, each flushed before the next one starts, so the checkpoint
advances per segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.engines import live_stream_wire as wire
from app.engines.pipeline import (
    DigestStage,
    ExtentSink,
    Pipeline,
    PipelineContext,
    PipelineError,
    Stage,
    Throttle,
    ZeroDetect,
)
from app.errors import AppError
from app.formats.base import Extent
from app.transports.ssh import (
    RemoteCommandError,
    RemoteProcess,
    SshConnectionError,
    SshError,
    SshSession,
)
from app.transports.ssh_native import NativeProcess

Process = RemoteProcess
#: Zero detection granularity at the source (aligned blocks of this size).
GRANULARITY = 64 * 1024
#: The destination helper syncs after this many bytes written (also every 2 s).
SYNC_BYTES = 8 * 1024 * 1024
#: Bytes per dd segment on a destination without python3.
DD_SEGMENT = 64 * 1024 * 1024


class SourceReadError(SshError):
    """The source could not be read (an I/O error: often an invalidated snapshot)."""

    code = "source-read-failed"
    title = "Source read failed"

    def __init__(self, message: str, offset: int | None) -> None:
        super().__init__(message, extra={"offset": offset})
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a stream: a session, the device, and whether the helper can run."""

    session: SshSession
    device: str
    helper: bool = True


async def ended_badly(session: SshSession, process: Process, what: str) -> AppError:
    """The error to raise after ``process`` stopped early: the connection's loss
    (retryable) or the process's own failure (its ``vmls-error`` or stderr)."""
    if session.conn.is_closed():
        return SshConnectionError(f"SSH connection to {session.label} lost during {what}")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(process.wait_closed(), 10)
    stderr = ""
    with contextlib.suppress(Exception):
        stderr = (await asyncio.wait_for(process.stderr.read(), 5)).decode(errors="replace")
    if isinstance(process, NativeProcess) and process.connection_lost:
        return SshConnectionError(f"SSH connection to {session.label} lost during {what}: "
                                  f"{wire.failure_text(stderr)}")
    if process.exit_status is None and process.exit_signal is None:
        return SshConnectionError(f"{what} on {session.label} stopped without an exit status")
    failure = wire.parse_failure(stderr)
    if failure is not None and failure.kind == "read":
        return SourceReadError(f"{what} on {session.label}: {failure.message}", failure.offset)
    return RemoteCommandError(session.label, what, process.exit_status, stderr
                              if failure is None else failure.message)


def stop_process(process: Process | None) -> None:
    if process is not None and process.exit_status is None:
        with contextlib.suppress(Exception):
            process.close()


class HelperSource:
    """The source helper in ``read`` mode, as an async iterable of extents."""

    name = "source"

    def __init__(self, end: Endpoint, size: int, start: int, digest: bool) -> None:
        self.end = end
        self.size = size
        self.start = start
        self.digest = digest
        #: The end frame's JSON (``digest`` when asked for, byte counts).
        self.info: dict[str, Any] = {}

    async def __aiter__(self) -> AsyncIterator[Extent]:
        session = self.end.session
        what = "the source helper"
        cmd = wire.helper_command("read", self.end.device, self.size, self.start,
                                  int(self.digest), GRANULARITY)
        process = await session.start(cmd)
        try:
            with session.errors():
                process.stdin.write(wire.helper_script())
                process.stdin.write_eof()
                out = process.stdout
                try:
                    if await out.readexactly(len(wire.MAGIC)) != wire.MAGIC:
                        raise RemoteCommandError(session.label, what, None, "bad greeting")
                    await out.readline()
                    while True:
                        kind, a, b = wire.HEAD.unpack(await out.readexactly(wire.HEAD.size))
                        if kind == wire.DATA:
                            if b > wire.MAX_FRAME:
                                raise RemoteCommandError(session.label, what, None,
                                                         f"data frame of {b} bytes")
                            yield Extent(a, b, await out.readexactly(b))
                        elif kind == wire.ZERO:
                            yield Extent(a, b)
                        elif kind == wire.END:
                            self.info = json.loads(await out.readexactly(b)) if b else {}
                            break
                        else:
                            raise RemoteCommandError(session.label, what, None,
                                                     f"unknown frame {kind!r}")
                except asyncio.IncompleteReadError:
                    raise await ended_badly(session, process, what) from None
                await asyncio.wait_for(process.wait_closed(), 60)
            if process.exit_status != 0:
                raise await ended_badly(session, process, what)
        finally:
            stop_process(process)


class DdSource:
    """``dd`` on a source without python3: raw bytes from ``start`` to the end, cut into
    extents (the :class:`ZeroDetect` stage finds zeros, but only after they crossed)."""

    name = "source (dd)"

    def __init__(self, end: Endpoint, size: int, start: int, chunk: int = 1024 * 1024) -> None:
        if start % wire.DD_BLOCK:
            raise ValueError("dd sources start on a dd block boundary")
        self.end = end
        self.size = size
        self.start = start
        self.chunk = chunk
        self.info: dict[str, Any] = {}

    async def __aiter__(self) -> AsyncIterator[Extent]:
        session = self.end.session
        process = await session.start(wire.dd_read_command(self.end.device, self.start))
        try:
            with session.errors():
                process.stdin.write_eof()
                pos = self.start
                try:
                    while pos < self.size:
                        n = min(self.chunk, self.size - pos)
                        yield Extent(pos, n, await process.stdout.readexactly(n))
                        pos += n
                except asyncio.IncompleteReadError:
                    raise await ended_badly(session, process, "dd on the source") from None
        finally:
            stop_process(process)


class HelperSink(ExtentSink):
    """The destination helper in ``write`` mode; its ``DURABLE`` lines move the
    checkpoint."""

    name = "destination"

    def __init__(self, end: Endpoint, size: int, start: int, *, exclusive: bool,
                 sync_bytes: int = SYNC_BYTES, sparse: bool = False) -> None:
        self.end = end
        self.sparse = sparse
        self.size = size
        self.start_at = start
        self.exclusive = exclusive
        self.sync_bytes = sync_bytes
        self.done: dict[str, Any] | None = None
        self._durable = start
        self._process: Process | None = None
        self._acks: asyncio.Task[None] | None = None
        self._finished = False

    async def start(self, ctx: PipelineContext | None) -> None:
        session = self.end.session
        cmd = wire.helper_command("write", self.end.device, self.size, self.start_at,
                                  int(self.exclusive), self.sync_bytes, int(self.sparse))
        self._process = process = await session.start(cmd)
        with session.errors():
            process.stdin.write(wire.helper_script())
            await process.stdin.drain()
            line = await process.stdout.readline()
        if not line.startswith(b"READY "):
            raise await ended_badly(session, process, "the destination helper")
        self._acks = asyncio.create_task(self._read_acks(process), name="destination-acks")

    async def _read_acks(self, process: Process) -> None:
        with self.end.session.errors():
            while True:
                line = await process.stdout.readline()
                if not line:
                    return
                word, _, rest = line.decode(errors="replace").strip().partition(" ")
                if word == "DURABLE":
                    self._durable = max(self._durable, int(rest))
                elif word == "DONE":
                    self.done = json.loads(rest)

    async def _send(self, *parts: bytes | memoryview) -> None:
        process = self._process
        assert process is not None
        if self._acks is not None and self._acks.done():
            await self._fail()
        try:
            with self.end.session.errors():
                for part in parts:
                    process.stdin.write(part if isinstance(part, bytes) else bytes(part))
                await process.stdin.drain()
        except SshConnectionError:
            raise
        except (SshError, BrokenPipeError):
            await self._fail()

    async def _fail(self) -> None:
        assert self._process is not None
        raise await ended_badly(self.end.session, self._process, "the destination helper")

    async def write(self, extent: Extent) -> None:
        if extent.data is None:
            await self._send(wire.zero_frame(extent.offset, extent.length))
        else:
            await self._send(wire.data_header(extent.offset, extent.length), extent.data)

    async def finish(self) -> None:
        process = self._process
        assert process is not None
        assert self._acks is not None
        await self._send(wire.end_frame(self.size))
        with self.end.session.errors():
            process.stdin.write_eof()
            await asyncio.wait_for(asyncio.shield(self._acks), 600)
            await asyncio.wait_for(process.wait_closed(), 60)
        if process.exit_status != 0 or self.done is None:
            await self._fail()
        self._durable = self.size
        self._finished = True

    def durable_offset(self) -> int:
        return self._durable

    async def close(self) -> None:
        stop_process(self._process)
        if self._acks is not None:
            self._acks.cancel()
            with contextlib.suppress(BaseException):
                await self._acks


class DdSink(ExtentSink):
    """``dd`` on a destination without python3, one process per segment: a segment is
    durable (``conv=fsync``) once its dd exited 0, and the checkpoint moves there."""

    name = "destination (dd)"

    def __init__(self, end: Endpoint, size: int, start: int,
                 segment: int = DD_SEGMENT) -> None:
        if start % wire.DD_BLOCK or segment % wire.DD_BLOCK:
            raise ValueError("dd segments start on dd block boundaries")
        self.end = end
        self.size = size
        self.segment = segment
        self._durable = start
        self._pos = start
        self._process: Process | None = None
        self._zeros = bytes(1024 * 1024)

    async def _open(self) -> Process:
        if self._process is None:
            self._process = await self.end.session.start(
                wire.dd_write_command(self.end.device, self._pos))
        return self._process

    async def _close_segment(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with self.end.session.errors():
            process.stdin.write_eof()
            await asyncio.wait_for(process.wait_closed(), 600)
        if process.exit_status != 0:
            raise await ended_badly(self.end.session, process, "dd on the destination")
        self._durable = self._pos

    async def write(self, extent: Extent) -> None:
        pos, end = extent.offset, extent.end
        while pos < end:
            limit = min(end, (pos // self.segment + 1) * self.segment)
            process = await self._open()
            with self.end.session.errors():
                if extent.data is None:
                    left = limit - pos
                    while left:
                        n = min(left, len(self._zeros))
                        process.stdin.write(self._zeros[:n])
                        await process.stdin.drain()
                        left -= n
                else:
                    view = memoryview(extent.data)[pos - extent.offset:limit - extent.offset]
                    process.stdin.write(bytes(view))
                    await process.stdin.drain()
            self._pos = pos = limit
            if pos % self.segment == 0:
                await self._close_segment()

    async def finish(self) -> None:
        await self._close_segment()

    def durable_offset(self) -> int:
        return self._durable

    async def close(self) -> None:
        stop_process(self._process)


@dataclass(slots=True)
class StreamResult:
    size: int
    resumed_from: int
    digest: str
    data_bytes: int
    zero_bytes: int
    seconds: float
    destination: dict[str, Any] = field(default_factory=dict)


def resume_point(source: Endpoint, dest: Endpoint, durable: int) -> int:
    """Where a stream resumes given the last durable offset: dd ends work in whole dd
    blocks, so the offset is rounded down (re-writing a little is always safe)."""
    if source.helper and dest.helper:
        return durable
    return durable - durable % wire.DD_BLOCK


async def stream(source: Endpoint, dest: Endpoint, size: int, *, resume_from: int = 0,
                 throttle_bps: float | None = None, exclusive: bool = True,
                 on_durable: Callable[[int], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 queue_depth: int = 4) -> StreamResult:
    """Copy ``[resume_from, size)`` of the source device onto the destination device and
    return the ``vmd1`` digest of the source's ``[0, size)``.

    The source helper computes the digest as it reads, at the source (a resumed run reads
    the part already copied locally, without sending it): the service's CPU, shared by
    every migration it runs, is left to the transport, and a byte corrupted anywhere
    after the source's read shows up in verify. A dd source is digested in the service,
    from the start (it cannot skip). ``on_durable(offset)`` is called as the destination
    reports durable offsets; ``on_progress(done, size)`` about twice a second.
    """
    start = resume_point(source, dest, resume_from)
    src: HelperSource | DdSource
    stages: list[Stage] = []
    digest_stage: DigestStage | None = None
    if source.helper:
        src = HelperSource(source, size, start, digest=True)
    else:
        src = DdSource(source, size, 0)  # from 0: the digest needs every byte
        stages.append(ZeroDetect())
        digest_stage = DigestStage(size)
    if digest_stage is not None:
        stages.append(digest_stage)
    if throttle_bps is not None:
        stages.append(Throttle(throttle_bps))
    sink: ExtentSink = (HelperSink(dest, size, start, exclusive=exclusive) if dest.helper
                        else DdSink(dest, size, start))
    pipeline = Pipeline(
        src, stages, sink, virtual_size=size, resume_from=start, queue_depth=queue_depth,
        on_checkpoint=on_durable, checkpoint_every=None, source_name=src.name,
        on_progress=(lambda p: on_progress(p.bytes_done, size)) if on_progress else None)
    started = time.monotonic()
    try:
        stats = await pipeline.run()
    except PipelineError as exc:
        # Keep the transport's own error (a lost connection stays retryable).
        if isinstance(exc.cause, AppError):
            raise exc.cause from exc
        raise
    digest = digest_stage.hexdigest if digest_stage is not None else src.info.get("digest")
    if not digest:
        raise RemoteCommandError(source.session.label, "the source helper", 0,
                                 "no digest in the end frame")
    return StreamResult(size=size, resumed_from=start, digest=str(digest),
                        data_bytes=stats.data_bytes, zero_bytes=stats.zero_bytes,
                        seconds=time.monotonic() - started,
                        destination=getattr(sink, "done", None) or {})
