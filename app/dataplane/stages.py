"""The pipeline's stock stages and its image-writer sink.

:class:`ZeroDetect` and :class:`SkipBelow` are inline (they run in the task before
them); :class:`DigestStage` hashes in the pipeline's thread pool; :class:`Throttle`
meters data bytes with a :class:`~app.dataplane.throttle.TokenBucket`;
:class:`WriterSink` ends a pipeline in an :class:`~app.formats.base.ImageWriter`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from app.dataplane.core import ExtentSink, PipelineContext, Stage, trim_below
from app.dataplane.throttle import Clock, TokenBucket
from app.formats.base import Extent, ImageWriter
from app.formats.buffers import first_bytes_nonzero, is_zero
from app.formats.digest import ParallelDigest


class WriterSink(ExtentSink):
    """Adapts an :class:`~app.formats.base.ImageWriter` to :class:`ExtentSink`.

    ``checkpoint`` calls the writer's ``flush()`` coroutine when it has one (writers
    that can resume, such as raw). When the run ends without ``finish`` (failure or
    cancel), ``close`` calls the writer's ``abort()`` coroutine when it has one, so
    writes still in flight stop before the caller closes the byte sink. The byte sink
    itself is not closed: whoever created it owns it.
    """

    name = "encode"

    def __init__(self, writer: ImageWriter) -> None:
        self.writer = writer
        self.name = f"encode ({writer.format})"
        self._finished = False

    async def write(self, extent: Extent) -> None:
        await self.writer.write(extent)

    async def finish(self) -> None:
        await self.writer.finish()
        self._finished = True

    async def close(self) -> None:
        if self._finished:
            return
        abort: Callable[[], Awaitable[None]] | None = getattr(self.writer, "abort", None)
        if abort is not None and callable(abort):
            await abort()

    def durable_offset(self) -> int:
        return self.writer.durable_offset()

    async def checkpoint(self) -> None:
        flush: Callable[[], Awaitable[None]] | None = getattr(self.writer, "flush", None)
        if flush is not None and callable(flush):
            await flush()


class ZeroDetect(Stage):
    """Turns data that is all zeros into zero runs and merges adjacent zero runs.

    With ``granularity`` set, each block of that size (aligned on the virtual disk)
    inside a data extent is checked on its own, so a chunk that is mostly zeros keeps
    only its non-zero blocks as data (like ``qemu-img convert -S``). The checks are a
    memcmp that stops at the first non-zero byte, so random data costs almost nothing.
    """

    name = "zero-detect"
    inline = True

    def __init__(self, granularity: int | None = 64 * 1024) -> None:
        if granularity is not None and granularity <= 0:
            raise ValueError("granularity must be positive")
        self.granularity = granularity
        self._zero_start: int | None = None  # pending zero run [start, _zero_end)
        self._zero_end = 0

    def _take_zero(self) -> Extent | None:
        if self._zero_start is None:
            return None
        ext = Extent(self._zero_start, self._zero_end - self._zero_start)
        self._zero_start = None
        return ext

    def _add_zero(self, offset: int, end: int) -> None:
        if self._zero_start is None:
            self._zero_start = offset
        self._zero_end = end

    def _split(self, ext: Extent, data: bytes | memoryview) -> list[tuple[int, int, bool]]:
        """``(start, end, is_zero)`` runs of a data extent (known not to be all zeros)
        at the configured granularity."""
        g = self.granularity
        whole = [(ext.offset, ext.end, False)]
        if g is None or ext.offset // g == (ext.end - 1) // g:  # inside one block
            return whole
        # A block whose first byte is non-zero is data: no memcmp needed. Ordinary
        # data takes this path for every block.
        if first_bytes_nonzero(data, ext.offset, g):
            return whole
        view = memoryview(data)
        starts = [0, *range((ext.offset // g + 1) * g - ext.offset, ext.length, g)]
        runs: list[tuple[int, int, bool]] = []
        for k, rel in enumerate(starts):
            rel_end = starts[k + 1] if k + 1 < len(starts) else ext.length
            zero = is_zero(view, rel, rel_end)
            start, end = ext.offset + rel, ext.offset + rel_end
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], end, zero)
            else:
                runs.append((start, end, zero))
        return runs

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        if extent.data is None:
            self._add_zero(extent.offset, extent.end)
            return
        data = extent.data
        if is_zero(data):
            self._add_zero(extent.offset, extent.end)
            return
        for start, end, zero in self._split(extent, data):
            if zero:
                self._add_zero(start, end)
                continue
            pending = self._take_zero()
            if pending is not None:
                yield pending
            if start == extent.offset and end == extent.end:
                yield extent
            else:
                yield Extent(
                    start,
                    end - start,
                    memoryview(data)[start - extent.offset : end - extent.offset],
                )

    async def finish(self) -> AsyncIterator[Extent]:
        pending = self._take_zero()
        if pending is not None:
            yield pending


class DigestStage(Stage):
    """Computes the ``vmd1`` disk digest (:mod:`app.formats.digest`) of the stream.

    Data is hashed in the pipeline's thread pool, whole blocks up to ``depth`` extents
    ahead (default: one more than the pool has threads) and fed in disk order
    (:class:`~app.formats.digest.ParallelDigest`), so hashing uses every thread of the
    pool; zero runs cost no hashing. Extents pass through unchanged. :attr:`hexdigest`
    is available after the run.
    """

    name = "digest"

    def __init__(self, virtual_size: int, *, depth: int | None = None) -> None:
        if depth is not None and depth < 1:
            raise ValueError("depth must be at least 1")
        self._virtual_size = virtual_size
        self._depth = depth
        self._digest: ParallelDigest | None = None
        self.hexdigest: str | None = None

    async def start(self, ctx: PipelineContext) -> None:
        self._digest = ParallelDigest(
            self._virtual_size, ctx.executor, self._depth or ctx.cpu_threads + 1
        )

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        assert self._digest is not None
        await self._digest.feed(extent)
        yield extent

    async def finish(self) -> AsyncIterator[Extent]:
        assert self._digest is not None
        self.hexdigest = await self._digest.hexdigest()
        return
        yield  # pragma: no cover

    async def close(self) -> None:
        if self._digest is not None:
            self._digest.cancel()


class SkipBelow(Stage):
    """Drops everything below ``offset`` (the part a resumed run already wrote)."""

    name = "resume-skip"
    inline = True

    def __init__(self, offset: int) -> None:
        self.offset = offset

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        for part in trim_below(extent, self.offset):
            yield part


class Throttle(Stage):
    """Limits data bytes per second with a :class:`~app.dataplane.throttle.TokenBucket`.

    Data extents are split into pieces of at most the bucket's burst size, so over
    any 1 s window at most ``rate * 1.05`` bytes pass (default burst). Zero runs do
    not count: they are never sent as bytes.
    """

    name = "throttle"

    def __init__(
        self, rate: float, *, clock: Clock | None = None, burst: float | None = None
    ) -> None:
        self.rate = rate
        self._explicit_clock = clock
        self._burst = burst
        self.bucket: TokenBucket | None = None

    async def start(self, ctx: PipelineContext) -> None:
        self.bucket = TokenBucket(
            self.rate, burst=self._burst, clock=self._explicit_clock or ctx.clock
        )

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        assert self.bucket is not None
        if extent.data is None:
            yield extent
            return
        piece = self.bucket.piece
        if extent.length <= piece:
            await self.bucket.acquire(extent.length)
            yield extent
            return
        view = memoryview(extent.data)
        for start in range(0, extent.length, piece):
            part = view[start : start + piece]
            await self.bucket.acquire(len(part))
            yield Extent(extent.offset + start, len(part), part)


