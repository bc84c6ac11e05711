"""The extent pipeline: source -> stages -> sink over bounded queues.

A disk travels as an async stream of :class:`~app.formats.base.Extent` values. The
source (usually an image reader: the *decode* stage), every :class:`Stage` and the
:class:`ExtentSink` (usually an image writer: the *encode* stage) run as separate
asyncio tasks joined by ``asyncio.Queue(maxsize=queue_depth)``. Cheap stages that
never wait (``Stage.inline``: zero detection, the resume skip) run inside the task
before them rather than in their own. A slow sink fills the queues and the source
stops reading, so memory stays near ``(tasks - 1) * queue_depth * chunk_size``
whatever the disk size. Zero runs travel as ``Extent(data=None)`` and are never
materialised.

CPU-heavy work (hashing) runs in a small thread pool owned by the pipeline
(:meth:`PipelineContext.run_cpu`); hashlib and zlib release the GIL on large buffers.

The sink reports *durable offsets*: everything below is on stable storage. The
pipeline keeps the highest one (:attr:`Pipeline.durable_offset`) and a resumed run
passes it as ``resume_from``: the source is read again from its start (so the digest
covers the whole disk) but nothing below ``resume_from`` reaches the sink again.

Cancelling :meth:`Pipeline.run` cancels every task, closes every stage, the sink and
the source, and shuts the thread pool down before ``CancelledError`` propagates. A
stage that fails cancels the others, and :meth:`Pipeline.run` raises a
:class:`PipelineError` naming the stage and the offset of the extent it was on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from app.engines.throttle import SYSTEM_CLOCK, Clock, TokenBucket
from app.errors import AppError
from app.formats.base import DEFAULT_CHUNK, Extent, FormatError, ImageReader, ImageWriter
from app.formats.buffers import first_bytes_nonzero, is_zero
from app.formats.digest import ParallelDigest

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3

T = TypeVar("T")

#: End-of-stream marker passed through the queues after the last extent.
_END: Final = object()
#: Default size of a pipeline's thread pool: every core, from 2 (a hash overlaps the
#: loop's own work even on one core) to 8 (each thread may hold an extent in flight).
CPU_THREADS = min(max(os.cpu_count() or 1, 2), 8)


class PipelineError(AppError):
    """A pipeline stage failed; ``stage`` names it, ``offset`` is the virtual offset of
    the extent it was handling (None before the first one), ``cause`` the original error.
    """

    code = "pipeline-error"
    title = "Disk transfer failed"

    def __init__(self, stage: str, offset: int | None, cause: BaseException) -> None:
        where = f" at offset {offset}" if offset is not None else ""
        detail = str(cause) or type(cause).__name__
        super().__init__(
            f"{stage} stage failed{where}: {detail}",
            extra={"stage": stage, "offset": offset},
        )
        self.stage = stage
        self.offset = offset
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report: virtual bytes done out of total, and the average rate."""

    bytes_done: int
    bytes_total: int | None
    rate: float  # virtual bytes per second since the run started
    data_bytes: int  # bytes of data (not zero runs) the sink has received


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """What a finished run did."""

    bytes_done: int  # virtual offset reached (== virtual size when known)
    data_bytes: int  # data bytes written by the sink in this run
    zero_bytes: int  # zero-run bytes passed to the sink in this run
    extents: int  # extents passed to the sink in this run
    duration: float  # seconds, on the pipeline's clock


class PipelineContext:
    """What a stage or sink may use from the pipeline: the CPU thread pool and the clock."""

    def __init__(self, executor: ThreadPoolExecutor, clock: Clock, cpu_threads: int) -> None:
        self.executor = executor
        self.clock = clock
        #: Threads of :attr:`executor`: how much CPU work is worth keeping in flight.
        self.cpu_threads = cpu_threads

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the pipeline's bounded thread pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))


class Stage(abc.ABC):
    """One transformation of the extent stream.

    :meth:`process` is an async generator: it yields zero or more extents for each
    extent it receives (it may split, merge or hold extents back, and must keep the
    output ordered and contiguous). :meth:`finish` yields whatever is held back once
    the input has ended. :meth:`close` always runs, after success, failure or cancel.
    """

    name: str = "stage"
    #: True for cheap stages that never wait on I/O or threads (zero detection, the
    #: resume skip): they run inside the task before them instead of a task and a
    #: queue of their own, which saves a queue hop and a task switch per extent.
    inline: ClassVar[bool] = False

    async def start(self, ctx: PipelineContext) -> None:  # noqa: B027
        """Called once before the first extent."""

    @abc.abstractmethod
    def process(self, extent: Extent) -> AsyncIterator[Extent]:
        """Yield the extents that replace ``extent`` downstream."""

    async def finish(self) -> AsyncIterator[Extent]:
        """Yield extents still held back after the input ended."""
        return
        yield  # pragma: no cover  (makes this an async generator)

    async def close(self) -> None:  # noqa: B027
        """Release resources; called exactly once, whatever happened."""


class ExtentSink(abc.ABC):
    """The end of a pipeline: consumes extents in order and reports durability."""

    name: str = "sink"

    async def start(self, ctx: PipelineContext) -> None:  # noqa: B027
        """Called once before the first extent."""

    @abc.abstractmethod
    async def write(self, extent: Extent) -> None:
        """Consume the next extent."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """The stream is complete: write trailers, flush, make everything durable."""

    def durable_offset(self) -> int:
        """Virtual offset below which everything written is durable (0 if unknown)."""
        return 0

    async def checkpoint(self) -> None:  # noqa: B027
        """Make what was written so far durable, if the sink can (called periodically)."""

    async def close(self) -> None:  # noqa: B027
        """Release resources; called exactly once, whatever happened."""


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
        for part in _trim_below(extent, self.offset):
            yield part


def _trim_below(extent: Extent, offset: int) -> tuple[Extent, ...]:
    if extent.end <= offset:
        return ()
    if extent.offset >= offset:
        return (extent,)
    cut = offset - extent.offset
    data = None if extent.data is None else memoryview(extent.data)[cut:]
    return (Extent(offset, extent.length - cut, data),)


class Throttle(Stage):
    """Limits data bytes per second with a :class:`~app.engines.throttle.TokenBucket`.

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


class Pipeline:
    """Runs ``source -> stages -> sink`` once; see the module docstring.

    - ``virtual_size``: when given, the stream must cover exactly ``[0, virtual_size)``.
    - ``resume_from``: nothing below it reaches the sink; the durable offset starts there.
    - ``on_progress``: called at most ``progress_hz`` times per second, plus once at the end.
    - ``checkpoint_every``: call ``sink.checkpoint()`` after this many data bytes.
    - ``on_checkpoint``: called with the new durable offset each time it advances.
    - ``cpu_threads``: size of the thread pool for :meth:`PipelineContext.run_cpu`
      (default: :data:`CPU_THREADS`).
    """

    def __init__(
        self,
        source: AsyncIterable[Extent],
        stages: Sequence[Stage],
        sink: ExtentSink,
        *,
        virtual_size: int | None = None,
        queue_depth: int = 4,
        cpu_threads: int | None = None,
        resume_from: int = 0,
        clock: Clock | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_hz: float = 2.0,
        checkpoint_every: int | None = 256 * DEFAULT_CHUNK,
        on_checkpoint: Callable[[int], None] | None = None,
        source_name: str = "decode",
    ) -> None:
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if resume_from < 0 or (virtual_size is not None and resume_from > virtual_size):
            raise ValueError(f"resume_from {resume_from} outside the disk")
        self._source = source
        self.stages = list(stages)
        self.sink = sink
        self.virtual_size = virtual_size
        self.queue_depth = queue_depth
        self.cpu_threads = cpu_threads or CPU_THREADS
        self.resume_from = resume_from
        self.clock = clock or SYSTEM_CLOCK
        self.on_progress = on_progress
        self.progress_interval = 1.0 / progress_hz if progress_hz > 0 else float("inf")
        self.checkpoint_every = checkpoint_every
        self.on_checkpoint = on_checkpoint
        self.source_name = source_name
        self._durable = resume_from
        self._done = resume_from
        self._data_bytes = 0
        self._zero_bytes = 0
        self._extents = 0
        self._started = False
        self._failures: list[PipelineError] = []

    # -- observation ---------------------------------------------------------------

    @property
    def durable_offset(self) -> int:
        """Highest virtual offset below which everything is durable at the sink."""
        return self._durable

    @property
    def bytes_done(self) -> int:
        """Virtual offset the sink has reached (durable or not)."""
        return self._done

    def _update_durable(self, value: int) -> None:
        value = min(value, self._done)
        if value > self._durable:
            self._durable = value
            if self.on_checkpoint is not None:
                self.on_checkpoint(value)

    # -- tasks ---------------------------------------------------------------------

    def _fail(self, stage: str, offset: int | None, exc: BaseException) -> PipelineError:
        err = exc if isinstance(exc, PipelineError) else PipelineError(stage, offset, exc)
        self._failures.append(err)
        return err

    async def _push(self, ext: Extent, inline: Sequence[Stage], out: asyncio.Queue[object]) -> None:
        """Pass ``ext`` through the ``inline`` stages (in this task) into ``out``."""
        if not inline:
            await out.put(ext)
            return
        stage = inline[0]
        try:
            async for part in stage.process(ext):
                await self._push(part, inline[1:], out)
        except (asyncio.CancelledError, PipelineError):
            raise
        except Exception as exc:
            raise self._fail(stage.name, ext.offset, exc) from exc

    async def _end(self, inline: Sequence[Stage], out: asyncio.Queue[object]) -> None:
        """Flush what the ``inline`` stages hold back, then mark the end of the stream."""
        for i, stage in enumerate(inline):
            try:
                async for part in stage.finish():
                    await self._push(part, inline[i + 1 :], out)
            except (asyncio.CancelledError, PipelineError):
                raise
            except Exception as exc:
                raise self._fail(stage.name, None, exc) from exc
        await out.put(_END)

    async def _start_inline(self, inline: Sequence[Stage], ctx: PipelineContext) -> None:
        for stage in inline:
            try:
                await stage.start(ctx)
            except Exception as exc:
                raise self._fail(stage.name, None, exc) from exc

    async def _run_source(
        self, ctx: PipelineContext, inline: Sequence[Stage], out: asyncio.Queue[object]
    ) -> None:
        iterator = aiter(self._source)
        expected: int | None = None
        try:
            await self._start_inline(inline, ctx)
            async for ext in iterator:
                if expected is None:
                    if ext.offset not in (0, self.resume_from):
                        raise FormatError(f"stream starts at {ext.offset}, not at 0")
                elif ext.offset != expected:
                    raise FormatError(
                        f"extent at {ext.offset}, expected {expected} (gap or overlap)"
                    )
                if self.virtual_size is not None and ext.end > self.virtual_size:
                    raise FormatError(
                        f"extent ends at {ext.end}, past the virtual size {self.virtual_size}"
                    )
                expected = ext.end
                await self._push(ext, inline, out)
            await self._end(inline, out)
        except (asyncio.CancelledError, PipelineError):
            raise
        except Exception as exc:
            raise self._fail(self.source_name, expected, exc) from exc
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    async def _run_stage(
        self,
        stage: Stage,
        inline: Sequence[Stage],
        ctx: PipelineContext,
        inq: asyncio.Queue[object],
        out: asyncio.Queue[object],
    ) -> None:
        offset: int | None = None
        try:
            await stage.start(ctx)
            await self._start_inline(inline, ctx)
            while True:
                item = await inq.get()
                if item is _END:
                    offset = None
                    async for ext in stage.finish():
                        await self._push(ext, inline, out)
                    await self._end(inline, out)
                    return
                assert isinstance(item, Extent)
                offset = item.offset
                async for ext in stage.process(item):
                    await self._push(ext, inline, out)
        except (asyncio.CancelledError, PipelineError):
            raise
        except Exception as exc:
            raise self._fail(stage.name, offset, exc) from exc

    async def _run_sink(self, ctx: PipelineContext, inq: asyncio.Queue[object]) -> None:
        sink = self.sink
        offset: int | None = None
        start_time = self.clock.monotonic()
        start_done = self._done
        last_report = start_time
        since_checkpoint = 0
        expected = self.resume_from

        def report(now: float) -> None:
            if self.on_progress is not None:
                elapsed = now - start_time
                rate = (self._done - start_done) / elapsed if elapsed > 0 else 0.0
                self.on_progress(Progress(self._done, self.virtual_size, rate, self._data_bytes))

        try:
            await sink.start(ctx)
            while True:
                item = await inq.get()
                if item is _END:
                    break
                assert isinstance(item, Extent)
                for ext in _trim_below(item, self.resume_from):
                    offset = ext.offset
                    if ext.offset != expected:
                        raise FormatError(
                            f"extent at {ext.offset}, expected {expected} (gap or overlap)"
                        )
                    await sink.write(ext)
                    expected = self._done = ext.end
                    self._extents += 1
                    if ext.data is None:
                        self._zero_bytes += ext.length
                    else:
                        self._data_bytes += ext.length
                        since_checkpoint += ext.length
                    if (
                        self.checkpoint_every is not None
                        and since_checkpoint >= self.checkpoint_every
                    ):
                        await sink.checkpoint()
                        since_checkpoint = 0
                    self._update_durable(sink.durable_offset())
                    now = self.clock.monotonic()
                    if now - last_report >= self.progress_interval:
                        last_report = now
                        report(now)
            offset = expected
            if self.virtual_size is not None and expected != self.virtual_size:
                raise FormatError(f"stream ended at {expected} of {self.virtual_size} bytes")
            await sink.finish()
            self._update_durable(self._done)
            report(self.clock.monotonic())
        except (asyncio.CancelledError, PipelineError):
            raise
        except Exception as exc:
            raise self._fail(sink.name, offset, exc) from exc

    # -- run -----------------------------------------------------------------------

    async def run(self) -> PipelineStats:
        """Run the pipeline to the end; raises :class:`PipelineError` or ``CancelledError``."""
        if self._started:
            raise RuntimeError("a Pipeline runs once; build a new one to resume")
        self._started = True
        started = self.clock.monotonic()
        executor = ThreadPoolExecutor(
            max_workers=self.cpu_threads, thread_name_prefix="pipeline-cpu"
        )
        ctx = PipelineContext(executor, self.clock, self.cpu_threads)
        # One task for the source and one for each stage that is not inline; inline
        # stages ride in the task before them.
        segments: list[tuple[Stage | None, list[Stage]]] = [(None, [])]
        for stage in self.stages:
            if stage.inline:
                segments[-1][1].append(stage)
            else:
                segments.append((stage, []))
        queues: list[asyncio.Queue[object]] = [
            asyncio.Queue(maxsize=self.queue_depth) for _ in segments
        ]
        tasks = [
            asyncio.create_task(
                self._run_source(ctx, segments[0][1], queues[0]),
                name=f"pipeline-{self.source_name}",
            )
        ]
        for i, (head, inline) in enumerate(segments[1:], start=1):
            assert head is not None
            tasks.append(
                asyncio.create_task(
                    self._run_stage(head, inline, ctx, queues[i - 1], queues[i]),
                    name=f"pipeline-{head.name}",
                )
            )
        tasks.append(
            asyncio.create_task(self._run_sink(ctx, queues[-1]), name=f"pipeline-{self.sink.name}")
        )
        try:
            pending: set[asyncio.Task[None]] = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.cancelled():  # a part cancelled itself: treat as a failure
                        self._fail(task.get_name(), None, RuntimeError("task was cancelled"))
                    elif (exc := task.exception()) is not None and not self._failures:
                        self._fail(task.get_name(), None, exc)
                if self._failures:
                    raise self._failures[0]
        finally:
            await self._shutdown(tasks, executor)
        return PipelineStats(
            bytes_done=self._done,
            data_bytes=self._data_bytes,
            zero_bytes=self._zero_bytes,
            extents=self._extents,
            duration=self.clock.monotonic() - started,
        )

    async def _shutdown(
        self, tasks: list[asyncio.Task[None]], executor: ThreadPoolExecutor
    ) -> None:
        """Cancel and await every task, close stages and sink, stop the thread pool.

        Runs to completion even when the caller is being cancelled: a second cancel
        arriving meanwhile is re-raised only after cleanup.
        """
        for task in tasks:
            task.cancel()
        cleanup = asyncio.ensure_future(self._cleanup(tasks, executor))
        try:
            await asyncio.shield(cleanup)
        except asyncio.CancelledError:
            await cleanup
            raise

    async def _cleanup(self, tasks: list[asyncio.Task[None]], executor: ThreadPoolExecutor) -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        parts: list[Stage | ExtentSink] = [*self.stages, self.sink]
        for closable in parts:
            try:
                await closable.close()
            except Exception:
                log.exception("closing pipeline part %s failed", closable.name)
        executor.shutdown(wait=False, cancel_futures=True)
        # Wait for a hash already running in a worker thread (milliseconds) off the loop.
        await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)


def tune_allocator(
    *, mmap_threshold: int = 32 * DEFAULT_CHUNK, trim_threshold: int = 256 * DEFAULT_CHUNK
) -> bool:
    """Keep freed chunk-sized buffers in the malloc heap for reuse (glibc only).

    Every chunk read is a new ``bytes`` object of about 1 MiB. With glibc's defaults
    such buffers are mmap'ed or trimmed back to the kernel as soon as they are freed,
    so the next one costs 256 fresh page faults: measured, the 4 GiB benchmark
    conversion took ~190k minor faults and 40 % more system time than with these
    settings (~15k faults). Fixing the mmap threshold above the chunk size and raising
    the trim threshold lets the heap reuse the memory; peak RSS stays bounded by the
    pipeline's queues. Process-wide: call once at program start (the CLI does); a
    long-running service may prefer to leave the allocator alone. Returns False when
    the C library has no ``mallopt``.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


# -- convenience: one image to another --------------------------------------------


@dataclass(frozen=True, slots=True)
class ConvertResult:
    """What :func:`convert` did."""

    virtual_size: int
    data_bytes: int  # data bytes handed to the writer in this run
    digest: str | None  # vmd1 digest of the whole virtual disk (None when disabled)
    duration: float  # seconds
    resumed_from: int


class Converter:
    """One conversion ``reader -> writer``; :func:`convert` is the one-call form.

    Keep the object to read :attr:`durable_offset` while it runs or after it was
    cancelled; that is the ``resume_from`` of the next attempt. A resumed attempt
    needs a writer that continues the same output (the raw writer in resume mode).

    ``stream_output`` says the writer was given a :class:`~app.formats.base.SequentialSink`:
    then a writer that ``needs_allocation_map`` gets the reader's allocation map
    before any data (the whole disk when the reader has none). On a seekable sink no
    map is given: writers such as VHD dynamic and VHDX would otherwise switch to their
    streaming layout (whole blocks written, zeros included).
    """

    def __init__(
        self,
        reader: ImageReader,
        writer: ImageWriter,
        *,
        throttle_bps: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_hz: float = 2.0,
        resume_from: int = 0,
        digest: bool = True,
        detect_zeroes: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        queue_depth: int = 4,
        clock: Clock | None = None,
        checkpoint_every: int | None = 256 * DEFAULT_CHUNK,
        on_checkpoint: Callable[[int], None] | None = None,
        extra_stages: Sequence[Stage] = (),
        stream_output: bool = False,
    ) -> None:
        if writer.virtual_size != reader.virtual_size:
            raise FormatError(
                f"writer is for {writer.virtual_size} bytes, the image has {reader.virtual_size}"
            )
        self.reader = reader
        self.writer = writer
        self.resume_from = resume_from
        self.stream_output = stream_output
        self.digest_stage = DigestStage(reader.virtual_size) if digest else None
        stages: list[Stage] = []
        if detect_zeroes:
            stages.append(ZeroDetect())
        if self.digest_stage is not None:
            stages.append(self.digest_stage)
        if resume_from:
            stages.append(SkipBelow(resume_from))
        stages.extend(extra_stages)
        if throttle_bps is not None:
            stages.append(Throttle(throttle_bps))
        self.pipeline = Pipeline(
            reader.extents(chunk_size),
            stages,
            WriterSink(writer),
            virtual_size=reader.virtual_size,
            queue_depth=queue_depth,
            resume_from=resume_from,
            clock=clock,
            on_progress=on_progress,
            progress_hz=progress_hz,
            checkpoint_every=checkpoint_every,
            on_checkpoint=on_checkpoint,
            source_name=f"decode ({reader.format})",
        )

    @property
    def durable_offset(self) -> int:
        return self.pipeline.durable_offset

    async def run(self) -> ConvertResult:
        if self.stream_output and self.writer.needs_allocation_map:
            ranges = await self.reader.allocation_map()
            await self.writer.set_allocation_map(
                ranges if ranges is not None else [(0, self.reader.virtual_size)]
            )
        stats = await self.pipeline.run()
        return ConvertResult(
            virtual_size=self.reader.virtual_size,
            data_bytes=stats.data_bytes,
            digest=self.digest_stage.hexdigest if self.digest_stage is not None else None,
            duration=stats.duration,
            resumed_from=self.resume_from,
        )


async def convert(
    reader: ImageReader,
    writer: ImageWriter,
    *,
    throttle_bps: float | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    progress_hz: float = 2.0,
    resume_from: int = 0,
    digest: bool = True,
    detect_zeroes: bool = True,
    chunk_size: int = DEFAULT_CHUNK,
    queue_depth: int = 4,
    clock: Clock | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    stream_output: bool = False,
) -> ConvertResult:
    """Copy the virtual disk of ``reader`` into ``writer`` through a :class:`Pipeline`.

    Stages: zero detection, the ``vmd1`` digest, the resume skip (when
    ``resume_from`` > 0) and the throttle (when ``throttle_bps`` is set). Pass
    ``stream_output=True`` when the writer writes to a sequential sink (see
    :class:`Converter`). The caller owns ``reader`` and ``writer`` and closes them.
    Raises :class:`PipelineError`.
    """
    return await Converter(
        reader,
        writer,
        throttle_bps=throttle_bps,
        on_progress=on_progress,
        progress_hz=progress_hz,
        resume_from=resume_from,
        digest=digest,
        detect_zeroes=detect_zeroes,
        chunk_size=chunk_size,
        queue_depth=queue_depth,
        clock=clock,
        on_checkpoint=on_checkpoint,
        stream_output=stream_output,
    ).run()
