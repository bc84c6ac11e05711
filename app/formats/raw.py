"""Raw disk images: the virtual disk byte for byte, nothing else.

Reading
    - On a :class:`~app.formats.base.RandomAccessSource` the reader asks for
      ``data_ranges()`` (SEEK_DATA/SEEK_HOLE on files) so holes cost nothing, reads the
      data ranges in chunks with a few reads in flight, and still checks every
      :data:`ZERO_GRANULE` block of data for zeros (an allocated but zeroed block is
      emitted as a zero extent).
    - On a :class:`~app.formats.base.SequentialSource` (``needs_random_access`` is
      False) it reads the stream front to back with the same zero detection. The size
      of a stream must be known up front: from a ``size`` attribute of the source or
      the ``virtual_size`` argument of :func:`open_reader`. A stream that ends early or
      runs past that size is a :class:`~app.formats.base.FormatError`.
    - Adjacent zero runs are merged; data extents are at most ``chunk_size`` bytes.

Writing (``streamable``)
    - On a :class:`~app.formats.base.SeekableSink` zero extents become holes when
      ``WriterOptions.target_zeroed`` (a fresh file), or explicit zeros written in
      bounded chunks otherwise (a device with old data). ``finish`` truncates to the
      virtual size and flushes.
    - On a :class:`~app.formats.base.SequentialSink` zeros are written as bytes, in
      bounded chunks; such a writer cannot resume.
    - The writer flushes every :data:`FLUSH_INTERVAL` bytes of progress and at finish;
      :meth:`RawWriter.durable_offset` says how far the output is durable. A new writer
      created with ``resume_from=<that offset>`` on the same (existing, not truncated)
      file skips extents below the offset, drops anything the interrupted run wrote
      past it (by truncating the file there), and produces byte-identical output. On a
      block device, which cannot be truncated, resume with ``target_zeroed=False``.

On a seekable sink a couple of writes stay in flight after ``write`` returns (they hold
references to the extents' data, which must not be mutated afterwards); ``flush()``
makes everything durable now (a checkpoint), ``abort()`` drops work in flight.

Raw is never detected by :func:`probe`: it is the registry's fallback.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from typing import ClassVar

from app.formats.base import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_VIRTUAL_SIZE,
    Extent,
    FormatError,
    ImageInfo,
    ImageReader,
    ImageWriter,
    MiB,
    RandomAccessSource,
    SeekableSink,
    SequentialSink,
    SequentialSource,
    WriterOptions,
    immutable,
)
from app.formats.buffers import Buffer, WriteBehind, first_bytes_nonzero, is_zero, zeros

FMT = "raw"

#: Granularity of zero detection inside data: blocks of this size, aligned to virtual
#: offsets, that are entirely zero are reported as zero extents.
ZERO_GRANULE = 64 * 1024

#: The writer fsyncs after this many bytes of progress so a resumed run loses little.
FLUSH_INTERVAL = 64 * MiB

#: Largest buffer of zeros the writer ever materialises.
ZERO_WRITE_CHUNK = 1 * MiB

#: Reads kept in flight by :func:`prefetch_reads`.
READ_DEPTH = 2


# --------------------------------------------------------------------------- helpers


def split_zero_blocks(
    data: Buffer, offset: int, granule: int = ZERO_GRANULE
) -> Iterator[tuple[int, int, bool]]:
    """Split ``data`` (virtual bytes at ``offset``) into maximal ``(start, end, zero)``
    runs of buffer indices, testing blocks aligned to ``granule`` in virtual offsets."""
    n = len(data)
    if n and first_bytes_nonzero(data, offset, granule):  # ordinary data: one run
        yield 0, n, False
        return
    pos = 0
    run_start = 0
    run_zero: bool | None = None
    while pos < n:
        boundary = (offset + pos) // granule * granule + granule
        end = min(n, boundary - offset)
        zero = is_zero(data, pos, end)
        if run_zero is None:
            run_zero = zero
        elif zero != run_zero:
            yield run_start, pos, run_zero
            run_start, run_zero = pos, zero
        pos = end
    if run_zero is not None:
        yield run_start, n, run_zero


class ExtentMerger:
    """Collects extents in order, merging adjacent zero runs; ``push`` returns what is
    ready to be yielded."""

    def __init__(self) -> None:
        self._zero_start = 0
        self._zero_len = 0

    def zero(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._zero_len and self._zero_start + self._zero_len == offset:
            self._zero_len += length
        else:
            # Callers always flush pending zeros before jumping ahead.
            assert self._zero_len == 0
            self._zero_start, self._zero_len = offset, length

    def data(self, offset: int, data: Buffer) -> list[Extent]:
        out = self.flush()
        out.append(Extent(offset, len(data), immutable(data)))
        return out

    def flush(self) -> list[Extent]:
        if not self._zero_len:
            return []
        ext = Extent(self._zero_start, self._zero_len)
        self._zero_len = 0
        return [ext]


def chunked(offset: int, length: int, chunk: int) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` pieces of a range, cut at multiples of ``chunk``."""
    end = offset + length
    while offset < end:
        stop = min(end, (offset // chunk + 1) * chunk)
        yield offset, stop - offset
        offset = stop


async def prefetch_reads(
    source: RandomAccessSource,
    plan: Iterable[tuple[int, int]],
    *,
    depth: int = READ_DEPTH,
    fmt: str = FMT,
) -> AsyncGenerator[tuple[int, bytes], None]:
    """Read ``(offset, length)`` ranges of ``source`` in order with up to ``depth`` reads
    in flight; yields ``(offset, data)``. A short read is a :class:`FormatError`."""
    pending: deque[tuple[int, int, asyncio.Future[bytes]]] = deque()
    it = iter(plan)
    try:
        while True:
            while len(pending) < depth:
                nxt = next(it, None)
                if nxt is None:
                    break
                off, ln = nxt
                pending.append((off, ln, asyncio.ensure_future(source.read_at(off, ln))))
            if not pending:
                return
            off, ln, task = pending.popleft()
            data = await task
            if len(data) != ln:
                raise FormatError(
                    f"unexpected end of data: wanted {ln} bytes, got {len(data)}",
                    fmt=fmt,
                    offset=off + len(data),
                )
            yield off, data
    finally:
        tasks = [task for _, _, task in pending]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _normalise_ranges(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, ln in sorted(ranges):
        start, end = max(off, 0), min(off + ln, size)
        if end <= start:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            prev_off, prev_len = out[-1]
            out[-1] = (prev_off, max(prev_off + prev_len, end) - prev_off)
        else:
            out.append((start, end - start))
    return out


# --------------------------------------------------------------------------- reader


class RawReader(ImageReader):
    """Extents of a raw image from a random-access or sequential source."""

    format: ClassVar[str] = FMT
    needs_random_access: ClassVar[bool] = False

    def __init__(
        self,
        source: RandomAccessSource | SequentialSource,
        virtual_size: int,
        *,
        zero_granule: int = ZERO_GRANULE,
    ) -> None:
        self._source = source
        self._granule = zero_granule
        self.info = ImageInfo(format=FMT, virtual_size=virtual_size)
        self._consumed = False
        self._skip_below = 0

    def skip_below(self, offset: int) -> bool:
        """Random-access sources only: data below ``offset`` is not read."""
        if not isinstance(self._source, RandomAccessSource):
            return False
        self._skip_below = max(0, min(offset, self.virtual_size))
        return True

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        if isinstance(self._source, RandomAccessSource):
            ranges = await self._source.data_ranges()
            if ranges is not None:
                return _normalise_ranges(ranges, self.virtual_size)
        return None

    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if isinstance(self._source, RandomAccessSource):
            return self._random_extents(self._source, chunk_size)
        if self._consumed:
            raise FormatError("a sequential raw source can only be read once", fmt=FMT)
        self._consumed = True
        return self._sequential_extents(self._source, chunk_size)

    def _split(
        self, merger: ExtentMerger, offset: int, data: Buffer, chunk: int
    ) -> list[Extent]:
        out: list[Extent] = []
        view = memoryview(data)
        for start, end, zero in split_zero_blocks(data, offset, self._granule):
            if zero:
                merger.zero(offset + start, end - start)
            else:
                for off, ln in chunked(offset + start, end - start, chunk):
                    out.extend(merger.data(off, view[off - offset : off - offset + ln]))
        return out

    async def _random_extents(
        self, source: RandomAccessSource, chunk: int
    ) -> AsyncIterator[Extent]:
        size = self.virtual_size
        ranges = await source.data_ranges()
        ranges = [(0, size)] if ranges is None else _normalise_ranges(ranges, size)
        if self._skip_below:
            ranges = _clip_below(ranges, self._skip_below)
        plan = [piece for off, ln in ranges for piece in chunked(off, ln, chunk)]
        merger = ExtentMerger()
        pos = 0
        async for off, data in prefetch_reads(source, plan):
            merger.zero(pos, off - pos)
            for ext in self._split(merger, off, data, chunk):
                yield ext
            pos = off + len(data)
        merger.zero(pos, size - pos)
        for ext in merger.flush():
            yield ext

    async def _sequential_extents(
        self, source: SequentialSource, chunk: int
    ) -> AsyncIterator[Extent]:
        size = self.virtual_size
        merger = ExtentMerger()
        pos = 0
        while pos < size:
            want = min(chunk - pos % chunk, size - pos)
            parts: list[bytes] = []
            got = 0
            while got < want:
                part = await source.read(want - got)
                if not part:
                    raise FormatError(
                        f"stream ended after {pos + got} of {size} bytes", fmt=FMT, offset=pos + got
                    )
                if len(part) > want - got:
                    raise FormatError("source returned more bytes than asked", fmt=FMT)
                parts.append(part)
                got += len(part)
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            for ext in self._split(merger, pos, data, chunk):
                yield ext
            pos += want
        extra = await source.read(1)
        if extra:
            raise FormatError(f"stream is longer than the declared {size} bytes", fmt=FMT)
        for ext in merger.flush():
            yield ext

    async def close(self) -> None:
        await self._source.close()


def probe(head: bytes, tail: bytes = b"") -> bool:
    """Raw has no signature: it never claims an image (the registry falls back to it)."""
    return False


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    virtual_size: int | None = None,
) -> RawReader:
    """Open a raw image. A sequential source needs its size: a ``size`` attribute or
    ``virtual_size``."""
    if isinstance(source, RandomAccessSource):
        size = source.size
        if virtual_size is not None and virtual_size != size:
            raise FormatError(
                f"declared size {virtual_size} but the source has {size} bytes", fmt=FMT
            )
    else:
        declared = getattr(source, "size", None)
        if virtual_size is not None:
            size = virtual_size
        elif isinstance(declared, int):
            size = declared
        else:
            raise FormatError("a raw image on a sequential source needs a known size", fmt=FMT)
    if size < 0:
        raise FormatError(f"negative size {size}", fmt=FMT)
    if size > max_virtual_size:
        raise FormatError(
            f"virtual size {size} exceeds the limit of {max_virtual_size} bytes", fmt=FMT
        )
    return RawReader(source, size)


# --------------------------------------------------------------------------- writer


class RawWriter(ImageWriter):
    """Extents -> raw bytes on a seekable sink (holes for zeros) or a byte stream."""

    format: ClassVar[str] = FMT
    streamable: ClassVar[bool] = True

    def __init__(
        self,
        sink: SeekableSink | SequentialSink,
        virtual_size: int,
        options: WriterOptions | None = None,
        *,
        resume_from: int = 0,
        flush_interval: int = FLUSH_INTERVAL,
    ) -> None:
        super().__init__(virtual_size)
        options = options or WriterOptions()
        self._seekable: SeekableSink | None = sink if isinstance(sink, SeekableSink) else None
        self._stream: SequentialSink | None = None
        if self._seekable is None:
            if not isinstance(sink, SequentialSink):
                raise FormatError("the raw writer needs a seekable or sequential sink", fmt=FMT)
            self._stream = sink
        if resume_from and self._seekable is None:
            raise FormatError("a sequential sink cannot resume", fmt=FMT)
        if not 0 <= resume_from <= virtual_size:
            raise FormatError(f"resume offset {resume_from} outside the disk", fmt=FMT)
        self._target_zeroed = options.target_zeroed
        self._flush_interval = max(flush_interval, 1)
        self._resume_from = resume_from
        self._pos = resume_from  # everything below is done
        self._durable = resume_from
        self._unflushed = 0
        self._flush_task: asyncio.Future[None] | None = None
        self._flush_mark = resume_from
        self._resume_pending = resume_from > 0
        self._finished = False
        self._wb = WriteBehind()

    def durable_offset(self) -> int:
        return self._durable if self._seekable is not None else 0

    async def _prepare_resume(self) -> None:
        # Drop whatever the interrupted run wrote past the checkpoint: holes read as
        # zeros again, so skipped zero extents stay correct.
        if self._resume_pending and self._seekable is not None:
            self._resume_pending = False
            await self._seekable.truncate(self._pos)

    async def _write_zeros(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(end - offset, ZERO_WRITE_CHUNK)
            if self._seekable is not None:
                await self._wb.submit(self._seekable.write_at(offset, zeros(n)))
            else:
                assert self._stream is not None
                await self._stream.write(zeros(n))
            offset += n
        self._unflushed += length

    async def _advance_zero(self, end: int) -> None:
        """Zeros from the current position to ``end``."""
        if end <= self._pos:
            return
        if self._seekable is None or not self._target_zeroed:
            await self._write_zeros(self._pos, end - self._pos)
        self._pos = end

    async def write(self, extent: Extent) -> None:
        if self._finished:
            raise FormatError("write after finish", fmt=FMT)
        if extent.end > self.virtual_size:
            raise FormatError(
                f"extent [{extent.offset}, {extent.end}) past the virtual size {self.virtual_size}",
                fmt=FMT,
            )
        if extent.offset < self._pos:
            if extent.offset >= self._resume_from:
                raise FormatError(
                    f"extent at {extent.offset} out of order (already at {self._pos})", fmt=FMT
                )
            if extent.end <= self._pos:
                return  # below the resume point: already in the file
        await self._prepare_resume()
        skip = max(self._pos - extent.offset, 0)
        start = extent.offset + skip
        if start > self._pos:
            await self._advance_zero(start)
        if extent.data is None:
            await self._advance_zero(extent.end)
        else:
            data = memoryview(extent.data)[skip:] if skip else extent.data
            if self._seekable is not None:
                await self._wb.submit(self._seekable.write_at(start, data))
            else:
                assert self._stream is not None
                await self._stream.write(data)
            self._unflushed += len(data)
            self._pos = extent.end
        await self._maybe_flush()

    async def _reap_flush(self, *, wait: bool) -> None:
        """Collect a background flush: once it is done, everything written before it
        started is durable."""
        task = self._flush_task
        if task is None or not (wait or task.done()):
            return
        self._flush_task = None
        await task
        self._durable = max(self._durable, self._flush_mark)

    async def _maybe_flush(self) -> None:
        if self._seekable is None:
            return
        await self._reap_flush(wait=False)
        if self._unflushed == 0:
            if self._flush_task is None:
                # Nothing pending: holes are as durable as the last flush.
                self._durable = self._pos
        elif self._unflushed >= self._flush_interval:
            # fsync in the background while the next chunks are written; one at a time.
            await self._reap_flush(wait=True)
            await self._wb.drain()
            self._flush_mark = self._pos
            self._unflushed = 0
            self._flush_task = asyncio.ensure_future(self._seekable.flush())

    async def flush(self) -> None:
        """Make everything written so far durable now (a pipeline checkpoint)."""
        if self._seekable is None or self._finished:
            return
        await self._wb.drain()
        await self._reap_flush(wait=True)
        await self._seekable.flush()
        self._unflushed = 0
        self._durable = self._pos

    async def abort(self) -> None:
        """Stop writes and flushes still in flight (the output stays incomplete)."""
        await self._wb.cancel()
        task, self._flush_task = self._flush_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def finish(self) -> None:
        if self._finished:
            return
        await self._prepare_resume()
        await self._advance_zero(self.virtual_size)
        await self._wb.drain()
        if self._seekable is not None:
            await self._reap_flush(wait=True)
            await self._seekable.truncate(self.virtual_size)
            await self._seekable.flush()
            self._unflushed = 0
            self._durable = self.virtual_size
        self._finished = True


def _clip_below(ranges: list[tuple[int, int]], offset: int) -> list[tuple[int, int]]:
    """The parts of ``(offset, length)`` ranges at or above ``offset``."""
    clipped = []
    for off, length in ranges:
        lo, hi = max(off, offset), off + length
        if hi > lo:
            clipped.append((lo, hi - lo))
    return clipped


def create_writer(
    sink: SeekableSink | SequentialSink,
    virtual_size: int,
    options: WriterOptions | None = None,
    *,
    resume_from: int = 0,
) -> RawWriter:
    return RawWriter(sink, virtual_size, options, resume_from=resume_from)
