"""The extent pipeline's core: source -> stages -> sink over bounded queues.

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

How a run behaves (resume point, queue depth, threads, clock, progress and checkpoint
callbacks) is one :class:`PipelineOptions` value. The stages themselves live in
:mod:`app.dataplane.stages`; :mod:`app.dataplane.convert` builds the usual
``reader -> stages -> writer`` run from a :class:`~app.dataplane.convert.ConvertOptions`.

Cancelling :meth:`Pipeline.run` cancels every task, closes every stage, the sink and
the source, and shuts the thread pool down before ``CancelledError`` propagates. A
stage that fails cancels the others, and :meth:`Pipeline.run` raises a
:class:`PipelineError` naming the stage and the offset of the extent it was on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

from app.dataplane.throttle import SYSTEM_CLOCK, Clock
from app.errors import AppError
from app.formats.base import DEFAULT_CHUNK, Extent, FormatError

log = logging.getLogger(__name__)

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
class TransferProgress:
    """A pipeline's progress report: virtual bytes done out of total, and the average
    rate. (The API's per-migration figure is :class:`app.models.schemas.migrations.Progress`.)
    """

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



@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How a :class:`Pipeline` runs. :class:`~app.dataplane.convert.ConvertOptions`
    extends it with what a conversion also chooses (its stages, the read size).

    - ``resume_from``: nothing below it reaches the sink; the durable offset starts there.
    - ``queue_depth``: extents each queue between two tasks holds (at least 1).
    - ``cpu_threads``: size of the thread pool for :meth:`PipelineContext.run_cpu`
      (None: :data:`CPU_THREADS`).
    - ``clock``: where time is read and waited on (None: the system clock).
    - ``on_progress``: called at most ``progress_hz`` times per second, plus once at the end.
    - ``checkpoint_every``: call ``sink.checkpoint()`` after this many data bytes (None:
      never).
    - ``on_checkpoint``: called with the new durable offset each time it advances.
    """

    resume_from: int = 0
    queue_depth: int = 4
    cpu_threads: int | None = None
    clock: Clock | None = None
    on_progress: Callable[[TransferProgress], None] | None = None
    progress_hz: float = 2.0
    checkpoint_every: int | None = 256 * DEFAULT_CHUNK
    on_checkpoint: Callable[[int], None] | None = None


def trim_below(extent: Extent, offset: int) -> tuple[Extent, ...]:
    """The part of ``extent`` at or above ``offset`` (nothing, all of it, or its tail)."""
    if extent.end <= offset:
        return ()
    if extent.offset >= offset:
        return (extent,)
    cut = offset - extent.offset
    data = None if extent.data is None else memoryview(extent.data)[cut:]
    return (Extent(offset, extent.length - cut, data),)


class Pipeline:
    """Runs ``source -> stages -> sink`` once; see the module docstring.

    - ``options``: how it runs (:class:`PipelineOptions`).
    - ``virtual_size``: when given, the stream must cover exactly ``[0, virtual_size)``.
    - ``source_name``: what a :class:`PipelineError` from the source calls it.
    """

    def __init__(
        self,
        source: AsyncIterable[Extent],
        stages: Sequence[Stage],
        sink: ExtentSink,
        options: PipelineOptions | None = None,
        *,
        virtual_size: int | None = None,
        source_name: str = "decode",
    ) -> None:
        options = options or PipelineOptions()
        resume_from = options.resume_from
        if options.queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if resume_from < 0 or (virtual_size is not None and resume_from > virtual_size):
            raise ValueError(f"resume_from {resume_from} outside the disk")
        self.options = options
        self._source = source
        self.stages = list(stages)
        self.sink = sink
        self.virtual_size = virtual_size
        self.queue_depth = options.queue_depth
        self.cpu_threads = options.cpu_threads or CPU_THREADS
        self.resume_from = resume_from
        self.clock = options.clock or SYSTEM_CLOCK
        self.on_progress = options.on_progress
        hz = options.progress_hz
        self.progress_interval = 1.0 / hz if hz > 0 else float("inf")
        self.checkpoint_every = options.checkpoint_every
        self.on_checkpoint = options.on_checkpoint
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
                self.on_progress(
                    TransferProgress(self._done, self.virtual_size, rate, self._data_bytes)
                )

        try:
            await sink.start(ctx)
            while True:
                item = await inq.get()
                if item is _END:
                    break
                assert isinstance(item, Extent)
                for ext in trim_below(item, self.resume_from):
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


