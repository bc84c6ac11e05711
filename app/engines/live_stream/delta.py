"""Delta passes (warm mode) and the destination's digest (verify).

A delta pass sends only the 1 MiB blocks whose SHA-256 differs on the two sides. Three
helpers run at once: ``hashes`` on the destination streams its block hashes; the service
pipes them into the source helper (``read`` with COMPARE), which hashes its own blocks
in step and sends frames for the differing ones only; the service relays those frames
(throttled) to the destination helper in ``write`` SPARSE mode. The destination's hash of
block k is always read before block k can be rewritten (the source needs it to decide),
so the two destination helpers never race. Memory stays at the SSH windows; nothing
goes through the extent pipeline because the stream has gaps by design.

The source helper computes the ``vmd1`` digest from the very block hashes it compares
(the digest is defined over them), so a delta pass from the snapshot yields the
source's digest for verify at no extra read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.dataplane.throttle import TokenBucket
from app.engines.live_stream import remote, wire
from app.engines.live_stream.data import (
    GRANULARITY,
    HelperSink,
    HostDevice,
    Process,
    SourceReadError,
    ended_badly,
    stop_process,
)
from app.errors import AppError
from app.formats.base import Extent
from app.transports.ssh import RemoteCommandError, SshSession

BLOCK = remote.BLOCK
HASH = 32


@dataclass(frozen=True, slots=True)
class DeltaResult:
    digest: str
    data_bytes: int
    zero_bytes: int
    changed_blocks: int
    resumed_from: int
    seconds: float


async def _pump_hashes(session: SshSession, hashes: Process, source: Process,
                       count: int) -> None:
    """Copy the destination's ``count`` block hashes into the source helper's stdin."""
    left = count * HASH
    with session.errors():
        try:
            while left:
                chunk = await hashes.stdout.read(min(left, 64 * 1024))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                source.stdin.write(chunk)
                await source.stdin.drain()
                left -= len(chunk)
        except asyncio.IncompleteReadError:
            raise await ended_badly(session, hashes, "the destination's block hashes"
                                    ) from None
        source.stdin.write_eof()


async def delta_stream(source: HostDevice, dest: HostDevice, size: int, *, start: int = 0,
                       throttle_bps: float | None = None, exclusive: bool = True,
                       on_durable: Callable[[int], None] | None = None,
                       on_progress: Callable[[int, int], None] | None = None) -> DeltaResult:
    """One delta pass over ``[start, size)`` (``start`` rounded down to a block)."""
    if not (source.helper and dest.helper):
        raise AppError("warm mode needs python3 on both hosts (block hashes)")
    start -= start % BLOCK
    src, dst = source.session, dest.session
    started = time.monotonic()
    hashes = await dst.start(wire.helper_command("hashes", dest.device, size, start))
    reader: Process | None = None
    sink = HelperSink(dest, size, start, exclusive=exclusive, sparse=True)
    pump: asyncio.Task[None] | None = None
    try:
        with dst.errors():
            hashes.stdin.write(wire.helper_script())
            hashes.stdin.write_eof()
        reader = await src.start(wire.helper_command(
            "read", source.device, size, start, 1, GRANULARITY, 1))
        with src.errors():
            reader.stdin.write(wire.helper_script())
        pump = asyncio.create_task(_pump_hashes(dst, hashes, reader, -(-(size - start) //
                                                                      BLOCK)))
        await sink.start(None)
        info = await _relay(src, reader, sink, pump, throttle_bps, on_durable, on_progress,
                            size)
        await sink.finish()
        if on_durable is not None:
            on_durable(size)
    finally:
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        await sink.close()
        stop_process(reader)
        stop_process(hashes)
    return DeltaResult(digest=str(info["digest"]), data_bytes=int(info["data_bytes"]),
                       zero_bytes=int(info["zero_bytes"]),
                       changed_blocks=int(info["changed_blocks"]), resumed_from=start,
                       seconds=time.monotonic() - started)


async def _relay(session: SshSession, reader: Process, sink: HelperSink,
                 pump: asyncio.Task[None], throttle_bps: float | None,
                 on_durable: Callable[[int], None] | None,
                 on_progress: Callable[[int, int], None] | None,
                 size: int) -> dict[str, Any]:
    """Forward the source's frames to the destination until its end frame."""
    bucket = TokenBucket(throttle_bps) if throttle_bps else None
    out = reader.stdout
    what = "the source helper"
    last_report = 0.0
    try:
        with session.errors():
            if await out.readexactly(len(wire.MAGIC)) != wire.MAGIC:
                raise RemoteCommandError(session.label, what, None, "bad greeting")
            await out.readline()
            while True:
                if pump.done() and pump.exception() is not None:
                    await pump
                kind, a, b = wire.HEAD.unpack(await out.readexactly(wire.HEAD.size))
                if kind == wire.END:
                    info: dict[str, Any] = json.loads(await out.readexactly(b))
                    break
                if kind == wire.DATA:
                    data = await out.readexactly(b)
                    if bucket is not None:
                        for i in range(0, b, bucket.piece):
                            await bucket.acquire(min(bucket.piece, b - i))
                    await sink.write(Extent(a, b, data))
                elif kind == wire.ZERO:
                    await sink.write(Extent(a, b))
                else:
                    raise RemoteCommandError(session.label, what, None,
                                             f"unknown frame {kind!r}")
                if on_durable is not None:
                    on_durable(sink.durable_offset())
                now = time.monotonic()
                if on_progress is not None and now - last_report >= 0.5:
                    last_report = now
                    on_progress(a + b, size)
    except asyncio.IncompleteReadError:
        error = await ended_badly(session, reader, what)
        if isinstance(error, SourceReadError):
            raise error from None
        if pump.done() and pump.exception() is not None:
            await pump  # the destination's side failed first: report that
        raise error from None
    await pump
    return info


async def destination_digest(session: SshSession, device: str, size: int, *,
                             helper: bool) -> str:
    """``vmd1`` digest of ``device``'s first ``size`` bytes, computed on its host."""
    if not helper:
        result = await session.run(wire.dd_digest_command(device, size), what="dd digest",
                                   seconds=3600 + size / 2**20)
        return wire.vmd1_from_block_hashes(size, result.stdout.splitlines())
    process = await session.start(wire.helper_command("digest", device, size))
    try:
        with session.errors():
            process.stdin.write(wire.helper_script())
            process.stdin.write_eof()
            out = await process.stdout.read()
            await process.wait_closed()
        if process.exit_status != 0:
            raise await ended_badly(session, process, f"digest of {device}")
        return out.decode().strip()
    finally:
        stop_process(process)
