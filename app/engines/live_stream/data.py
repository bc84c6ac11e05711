"""The live stream's data path: source host -> service -> destination host.

The service is the relay: one SSH connection reads the source, another writes the
destination, and the extents travel between them through the :class:`Pipeline`
(digest, throttle). Nothing is buffered beyond the pipeline's bounded queues, so SSH
flow control carries back-pressure end to end: a slow destination disk stops its
helper reading stdin, its channel window closes, ``drain()`` blocks the sink, the
queues fill, the source iterator stops reading its channel, that window closes and the
source helper blocks writing stdout, which stops it reading the snapshot.

When both ends are helpers started through the OpenSSH client and nothing needs
metering (no throttle), the stream is handed over instead (:func:`_handed_over`): the
source's ``ssh`` writes into a pipe the destination's ``ssh`` reads, the service holds
neither end, and the same back-pressure runs through that pipe.

Each end is a helper (``python3``, :mod:`app.engines.live_stream.remote`: zero blocks
detected at the source and never sent, zeros written at the destination only where it
does not already read as zeros, durable offsets reported as it goes) or, on a host
without python3, plain ``dd`` (every byte crosses the network; the destination is
written in segments, each flushed before the next one starts, so the checkpoint
advances per segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from app.dataplane.core import (
    ExtentSink,
    Pipeline,
    PipelineContext,
    PipelineError,
    PipelineOptions,
    Stage,
)
from app.dataplane.stages import DigestStage, Throttle, ZeroDetect
from app.engines.live_stream import wire
from app.errors import AppError
from app.formats.base import Extent
from app.transports.ssh import (
    RemoteCommandError,
    RemoteProcess,
    SshConnectionError,
    SshError,
    SshSession,
)
from app.transports.ssh_native import NativeProcess, set_pipe_size

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
class HostDevice:
    """A block device on an SSH host, one end of a stream: the session, the device's
    path, and whether the python3 helper can run there (else plain ``dd``)."""

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

    def __init__(self, end: HostDevice, size: int, start: int, digest: bool) -> None:
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

    def __init__(self, end: HostDevice, size: int, start: int, chunk: int = 1024 * 1024) -> None:
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

    def __init__(self, end: HostDevice, size: int, start: int, *, exclusive: bool,
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

    def __init__(self, end: HostDevice, size: int, start: int,
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
    #: The frames went from the source's ``ssh`` straight into the destination's.
    handed_over: bool = False
    #: ... compressed with zstd on the way.
    compressed: bool = False


def resume_point(source: HostDevice, dest: HostDevice, durable: int) -> int:
    """Where a stream resumes given the last durable offset: dd ends work in whole dd
    blocks, so the offset is rounded down (re-writing a little is always safe)."""
    if source.helper and dest.helper:
        return durable
    return durable - durable % wire.DD_BLOCK


class _Exits:
    """Which of two processes ended first, and how (their waits, watched together)."""

    def __init__(self, **processes: Process) -> None:
        self.processes = processes
        self.order: list[str] = []
        self.tasks = {asyncio.create_task(self._wait(name, p), name=f"wait-{name}")
                      for name, p in processes.items()}

    async def _wait(self, name: str, process: Process) -> None:
        await process.wait_closed()
        self.order.append(name)

    def failed(self) -> str | None:
        """The first process that ended with anything but exit status 0."""
        for name in self.order:
            if self.processes[name].exit_status != 0:
                return name
        return None

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*self.tasks, return_exceptions=True)


class _NoHandOver(Exception):
    """The stream cannot be handed over after all (raised before anything started)."""


def can_hand_over(source: HostDevice, dest: HostDevice, throttle_bps: float | None) -> bool:
    """Whether :func:`stream` pipes the source's ``ssh`` straight into the destination's
    (both ends helpers over the OpenSSH client, no throttle)."""
    return (source.helper and dest.helper and throttle_bps is None
            and source.session.can_hand_over and dest.session.can_hand_over)


async def has_zstd(session: SshSession) -> bool:
    """Whether the host has a ``zstd`` on the PATH remote commands get."""
    result = await session.run("command -v zstd", what="command -v zstd", check=False,
                               seconds=60)
    return result.exit_status == 0


async def _handed_over(source: HostDevice, dest: HostDevice, size: int, start: int, *,
                       exclusive: bool, compress: bool,
                       on_durable: Callable[[int], None] | None,
                       on_progress: Callable[[int, int], None] | None) -> StreamResult:
    """The stream with the frames piped from the source's ``ssh`` child straight into the
    destination's: the service holds neither end of that pipe, so no byte passes through
    Python (the destination helper checks the frames, as it always does). The service
    watches the destination's lines (``DURABLE``, the source's end JSON, ``DONE``) and
    both processes' exits; the first one to fail names the error. With ``compress``, the
    source helper may use zstd if the destination has it (asked while the destination's
    ``ssh`` connects): it does when a sample of the volume compresses, and the
    destination helper decompresses."""
    started = time.monotonic()
    script = wire.helper_script()
    read_end, write_end = os.pipe()
    fds = [read_end, write_end]
    src: Process | None = None
    dst: Process | None = None
    exits: _Exits | None = None
    acks: asyncio.Task[tuple[dict[str, Any], dict[str, Any]]] | None = None
    try:
        set_pipe_size(write_end)
        # The destination's bootstrap reads the script first, then frames. Nobody reads
        # the pipe yet: the script must fit, or this write would block for good.
        if fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ) < len(script):
            raise _NoHandOver("the pipe cannot hold the helper script")
        view = memoryview(script)
        while view:
            view = view[os.write(write_end, view):]
        dst = await dest.session.start(wire.helper_command(
            "write", dest.device, size, start, int(exclusive), SYNC_BYTES, 0, 1),
            stdin_fd=read_end)
        fds.remove(read_end)
        os.close(read_end)
        zstd = compress and await has_zstd(dest.session)
        src = await source.session.start(wire.helper_command(
            "read", source.device, size, start, 1, GRANULARITY, 0, int(zstd)),
            stdout_fd=write_end)
        fds.remove(write_end)
        os.close(write_end)
        with source.session.errors():
            src.stdin.write(script)
            src.stdin.write_eof()
        exits = _Exits(source=src, destination=dst)
        acks = asyncio.create_task(_read_lines(dest, dst, size, on_durable, on_progress),
                                   name="destination-lines")
        waiting: set[asyncio.Task[Any]] = {acks, *exits.tasks}
        while waiting and exits.failed() is None:
            # Once the destination said DONE, both processes have a minute to exit.
            timeout = 60.0 if acks.done() and acks.exception() is None else None
            done_now, waiting = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done_now:
                raise SshConnectionError(f"the stream to {dest.session.label} ended, but "
                                         "its SSH processes did not")
        culprit = exits.failed()
        if culprit is None and acks.done() and acks.exception() is None:
            info, done = acks.result()
        else:
            raise await _handover_error(source, dest, src, dst, exits, culprit)
    finally:
        for fd in fds:
            os.close(fd)
        if acks is not None:
            acks.cancel()
            with contextlib.suppress(BaseException):
                await acks
        if exits is not None:
            await exits.cancel()
        stop_process(src)
        stop_process(dst)
    if on_durable is not None:
        on_durable(size)
    return StreamResult(size=size, resumed_from=start, digest=str(info.get("digest", "")),
                        data_bytes=int(info.get("data_bytes", 0)),
                        zero_bytes=int(info.get("zero_bytes", 0)),
                        seconds=time.monotonic() - started, destination=done,
                        handed_over=True, compressed=bool(done.get("zstd")))


async def _read_lines(dest: HostDevice, process: Process, size: int,
                      on_durable: Callable[[int], None] | None,
                      on_progress: Callable[[int, int], None] | None,
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The destination helper's lines, to its ``DONE``: (source's end JSON, DONE's)."""
    info: dict[str, Any] | None = None
    last_report = 0.0
    with dest.session.errors():
        while True:
            line = await process.stdout.readline()
            if not line:
                raise EOFError("the destination helper ended without DONE")
            word, _, rest = line.decode(errors="replace").strip().partition(" ")
            if word == "DURABLE":
                offset = int(rest)
                if on_durable is not None:
                    on_durable(offset)
                now = time.monotonic()
                if on_progress is not None and now - last_report >= 0.5:
                    last_report = now
                    on_progress(offset, size)
            elif word == "SOURCE":
                info = json.loads(rest)
            elif word == "DONE":
                if info is None:
                    raise EOFError("the destination helper did not pass the source's end on")
                return info, json.loads(rest)


async def _handover_error(source: HostDevice, dest: HostDevice, src: Process, dst: Process,
                          exits: _Exits, culprit: str | None) -> AppError:
    """The error of a handed-over stream that did not finish: the first process to fail
    names it. A destination that ran out of input blames the source (it ended first,
    or its connection did); a source that lost its output blames the destination."""
    if culprit is None:  # the destination ended without DONE, or its lines broke
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dst.wait_closed(), 10)
        culprit = exits.failed() or "destination"
    if culprit == "destination":
        with contextlib.suppress(Exception):
            await asyncio.wait_for(src.wait_closed(), 2)
        stderr = b""
        with contextlib.suppress(Exception):
            stderr = await asyncio.wait_for(dst.stderr.read(), 5)
        failure = wire.parse_failure(stderr.decode(errors="replace"))
        if failure is not None and failure.kind == "truncated" and src.exit_status != 0:
            culprit = "source"
        error = (wire.failure_text(stderr.decode(errors="replace")) if culprit == "destination"
                 else "")
        if culprit == "destination":
            return _helper_error(dest.session, dst, "the destination helper", error, failure)
    stop_process(dst)
    return await ended_badly(source.session, src, "the source helper")


def _helper_error(session: SshSession, process: Process, what: str, text: str,
                  failure: wire.HelperFailure | None) -> AppError:
    """:func:`ended_badly` for a process whose stderr was already read."""
    if session.conn.is_closed() or (isinstance(process, NativeProcess)
                                    and process.connection_lost):
        return SshConnectionError(f"SSH connection to {session.label} lost during {what}: "
                                  f"{text}")
    if process.exit_status is None and process.exit_signal is None:
        return SshConnectionError(f"{what} on {session.label} stopped without an exit status")
    return RemoteCommandError(session.label, what, process.exit_status,
                              text if failure is None else failure.message)


async def stream(source: HostDevice, dest: HostDevice, size: int, *, resume_from: int = 0,
                 throttle_bps: float | None = None, exclusive: bool = True,
                 on_durable: Callable[[int], None] | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 queue_depth: int = 4, compress: bool = True) -> StreamResult:
    """Copy ``[resume_from, size)`` of the source device onto the destination device and
    return the ``vmd1`` digest of the source's ``[0, size)``.

    The source helper computes the digest as it reads, at the source (a resumed run reads
    the part already copied locally, without sending it): the service's CPU, shared by
    every migration it runs, is left to the transport, and a byte corrupted anywhere
    after the source's read shows up in verify. A dd source is digested in the service,
    from the start (it cannot skip). ``on_durable(offset)`` is called as the destination
    reports durable offsets; ``on_progress(done, size)`` about twice a second.
    ``compress``: zstd when the stream is handed over, both hosts have ``zstd`` and a
    sample of the volume compresses (:func:`_handed_over`).
    """
    start = resume_point(source, dest, resume_from)
    if can_hand_over(source, dest, throttle_bps):
        with contextlib.suppress(_NoHandOver):  # then the service relays it after all
            return await _handed_over(source, dest, size, start, exclusive=exclusive,
                                      compress=compress, on_durable=on_durable,
                                      on_progress=on_progress)
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
    options = PipelineOptions(
        resume_from=start, queue_depth=queue_depth, on_checkpoint=on_durable,
        checkpoint_every=None,
        on_progress=(lambda p: on_progress(p.bytes_done, size)) if on_progress else None)
    pipeline = Pipeline(src, stages, sink, options, virtual_size=size, source_name=src.name)
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
