"""The extent pipeline: back-pressure, zero runs, digest, throttle, progress,
checkpoints and resume, cancellation and failures.

Time is always a fake clock; nothing here asserts wall-clock durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.dataplane.convert import Converter, ConvertOptions, convert
from app.dataplane.core import (
    ExtentSink,
    Pipeline,
    PipelineContext,
    PipelineError,
    PipelineOptions,
    Stage,
    TransferProgress,
)
from app.dataplane.stages import DigestStage, SkipBelow, Throttle, ZeroDetect
from app.dataplane.throttle import TokenBucket
from app.formats import raw, registry
from app.formats.base import Extent, FormatError, GiB, MiB, WriterOptions
from app.formats.digest import DiskDigest, digest_bytes, digest_extents, digest_file
from app.formats.io import FileSink, FileSource
from tests.formats.oracle import assert_identical, make_sparse_raw, qemu_img, random_layout

pytestmark = pytest.mark.timeout(60)

# --------------------------------------------------------------------------- helpers


class FakeClock:
    """Time moves only when someone sleeps on it (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)


async def disk_extents(
    disk: bytes, chunk: int = MiB, *, zero_runs: bool = True, log: list[int] | None = None
) -> AsyncIterator[Extent]:
    """A disk held in memory as extents: data chunks, all-zero chunks as zero runs."""
    pos = 0
    while pos < len(disk):
        n = min(chunk, len(disk) - pos)
        piece = disk[pos : pos + n]
        if log is not None:
            log.append(pos)
        yield Extent(pos, n) if zero_runs and not any(piece) else Extent(pos, n, piece)
        pos += n


def sample_disk(size: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    buf = bytearray(size)
    for off, length in random_layout(size, 30, 700_000, seed=seed):
        buf[off : off + length] = rng.randbytes(length)
    return bytes(buf)


class RecordingSink(ExtentSink):
    """Writes into a bytearray "device"; zero runs are written as zeros (a device that
    may hold old data). Reports the end of the last write as durable every
    ``durable_every`` data bytes, like a sink that fsyncs periodically."""

    name = "record"

    def __init__(
        self,
        device: bytearray | None = None,
        *,
        durable_every: int | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.device = device
        self.durable_every = durable_every
        self.gate = gate
        self.extents: list[Extent] = []
        self.data_bytes = 0
        self.zero_bytes = 0
        self.pos = 0
        self._durable = 0
        self._since = 0
        self.finished = False
        self.closed = False
        self.checkpoints = 0

    async def write(self, extent: Extent) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.extents.append(extent)
        if extent.data is None:
            self.zero_bytes += extent.length
            if self.device is not None:
                self.device[extent.offset : extent.end] = bytes(extent.length)
        else:
            self.data_bytes += extent.length
            self._since += extent.length
            if self.device is not None:
                self.device[extent.offset : extent.end] = extent.data
        self.pos = extent.end
        if self.durable_every is not None and self._since >= self.durable_every:
            self._since = 0
            self._durable = self.pos

    def durable_offset(self) -> int:
        return self._durable

    async def checkpoint(self) -> None:
        self.checkpoints += 1

    async def finish(self) -> None:
        self.finished = True
        self._durable = self.pos

    async def close(self) -> None:
        self.closed = True


class Watch(Stage):
    """Passes extents through; records lifecycle calls and optionally acts per extent."""

    def __init__(
        self, name: str = "watch", on_extent: Callable[[Extent], None] | None = None
    ) -> None:
        self.name = name
        self.on_extent = on_extent
        self.seen = 0
        self.started = False
        self.closed = False

    async def start(self, ctx: PipelineContext) -> None:
        self.started = True

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        self.seen += 1
        if self.on_extent is not None:
            self.on_extent(extent)
        yield extent

    async def close(self) -> None:
        self.closed = True


class Interrupter(Stage):
    """Cancels ``task`` (the whole run) when the ``stop_after``-th extent passes."""

    name = "interrupt"

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.seen = 0
        self.task: asyncio.Task[Any] | None = None

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        self.seen += 1
        if self.seen == self.stop_after and self.task is not None:
            self.task.cancel()
        yield extent


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pipeline-cpu")]


async def settle(rounds: int = 200) -> None:
    """Let every runnable task run until the loop is quiet (no wall-clock waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def other_tasks() -> set[asyncio.Task[object]]:
    me = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not me and not t.done()}


# --------------------------------------------------------------------------- basics


async def test_copies_the_disk_and_computes_its_digest() -> None:
    disk = sample_disk(9 * MiB + 333, seed=1)
    device = bytearray(len(disk))
    digest = DigestStage(len(disk))
    sink = RecordingSink(device)
    stats = await Pipeline(
        disk_extents(disk, 300_000), [ZeroDetect(), digest], sink, virtual_size=len(disk)
    ).run()
    assert bytes(device) == disk
    assert digest.hexdigest == digest_bytes(disk)
    assert stats.bytes_done == len(disk)
    assert stats.data_bytes + stats.zero_bytes == len(disk)
    assert sink.finished
    assert sink.closed


async def test_zero_runs_never_travel_as_bytes() -> None:
    """64 GiB virtual disk, 8 MiB of data, zero chunks both as runs and as zero bytes."""
    size = 64 * GiB
    data = random.Random(5).randbytes(MiB)

    async def source() -> AsyncIterator[Extent]:
        pos = 0
        for i in range(8):
            gap = (size // 8) - 2 * MiB
            yield Extent(pos, gap)  # a zero run
            yield Extent(pos + gap, MiB, bytes(MiB))  # allocated zeros, as bytes
            yield Extent(pos + gap + MiB, MiB, data if i % 2 else memoryview(data))
            pos += size // 8

    sink = RecordingSink()  # counts only
    digest = DigestStage(size)
    await Pipeline(source(), [ZeroDetect(), digest], sink, virtual_size=size).run()
    assert sink.data_bytes == 8 * MiB
    assert sink.zero_bytes == size - 8 * MiB
    for ext in sink.extents:
        assert ext.data is None or any(bytes(ext.data[:4096]))
    # Adjacent zero runs (the run and the allocated zeros) were merged.
    assert len(sink.extents) == 16
    expected = DiskDigest(size)
    for _i in range(8):
        expected.update_zeros(size // 8 - MiB)
        expected.update(data)
    assert digest.hexdigest == expected.hexdigest()


def mixed_extents(size: int, seed: int) -> tuple[bytes, list[Extent]]:
    """A disk cut into extents of every kind the digest stage tells apart: whole blocks
    from a block boundary (with and without a tail), pieces inside a block, pieces
    that cross a boundary from inside a block, data that is all zeros, zero runs."""
    rng = random.Random(seed)
    disk = bytearray()
    extents: list[Extent] = []
    while len(disk) < size:
        pos = len(disk)
        n = min(size - pos, rng.choice([MiB, 2 * MiB, 3 * MiB + 7, 64 * 1024, 333,
                                        MiB - pos % MiB, MiB + 5000]))
        kind = rng.random()
        if kind < 0.15:
            extents.append(Extent(pos, n))
            disk += bytes(n)
        else:
            piece = bytes(n) if kind < 0.25 else rng.randbytes(n)
            extents.append(Extent(pos, n, piece if kind < 0.6 else memoryview(piece)))
            disk += piece
    return bytes(disk), extents


@pytest.mark.parametrize("depth", [None, 1, 2, 5])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_digest_stage_hashes_ahead_and_feeds_in_order(seed: int, depth: int | None) -> None:
    """Whatever the extents and however many blocks are hashed ahead, the stage's
    digest is the digest of the disk."""
    disk, extents = mixed_extents(40 * MiB + 1234, seed)

    async def source() -> AsyncIterator[Extent]:
        for ext in extents:
            yield ext

    stage = DigestStage(len(disk), depth=depth)
    sink = RecordingSink(bytearray(len(disk)))
    await Pipeline(
        source(), [stage], sink, PipelineOptions(cpu_threads=3), virtual_size=len(disk)
    ).run()
    assert bytes(sink.device or b"") == disk
    assert stage.hexdigest == digest_bytes(disk)


@pytest.mark.parametrize("depth", [1, 4])
async def test_digest_extents_hashes_ahead_and_feeds_in_order(depth: int) -> None:
    """The library's and the engines' digest of a stream (the same helper as the stage)."""
    disk, extents = mixed_extents(30 * MiB + 77, seed=4)

    async def source() -> AsyncIterator[Extent]:
        for ext in extents:
            yield ext

    assert await digest_extents(source(), len(disk), depth=depth) == digest_bytes(disk)


async def test_digest_stage_hashes_blocks_in_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two extents' blocks are hashed at the same time: the first hash waits until a
    second one has started (a barrier that a stage hashing one extent at a time would
    never pass: it times out and the digest fails)."""
    from app.formats import digest as digest_module

    barrier = threading.Barrier(2, timeout=20)
    real = digest_module.block_hashes
    met: list[bool] = []

    def meeting(data: Any) -> bytes:
        if not met:
            barrier.wait()
            met.append(True)
        return real(data)

    monkeypatch.setattr(digest_module, "block_hashes", meeting)
    disk = random.Random(9).randbytes(8 * MiB)
    stage = DigestStage(len(disk))
    await Pipeline(disk_extents(disk, zero_runs=False), [stage], RecordingSink(),
                   PipelineOptions(cpu_threads=2), virtual_size=len(disk)).run()
    assert met
    assert stage.hexdigest == digest_bytes(disk)


async def test_zero_detect_splits_at_its_granularity() -> None:
    block = 64 * 1024
    data = bytearray(random.Random(2).randbytes(8 * block))
    data[2 * block : 5 * block] = bytes(3 * block)  # three zero blocks
    data[7 * block : 7 * block + 10] = bytes(10)  # not a whole block: stays data
    sink = RecordingSink(bytearray(8 * block))
    await Pipeline(
        disk_extents(bytes(data), 8 * block), [ZeroDetect(block)], sink, virtual_size=8 * block
    ).run()
    shape = [(e.offset // block, e.length // block, e.data is None) for e in sink.extents]
    assert shape == [(0, 2, False), (2, 3, True), (5, 3, False)]
    assert bytes(sink.device or b"") == bytes(data)


async def test_zero_detect_splits_small_extents_that_cross_a_block_boundary() -> None:
    """An extent shorter than a block still covers two blocks when it crosses a boundary
    (the VHD reader's last piece of a data run: 512 bytes of data, then the zeros up to
    the end of the file's page). The zero block's part becomes a zero run, so a raw
    output gets no block allocated for it."""
    block = 64 * 1024
    tail = os.urandom(512) + bytes(1536)
    end = block - 512 + len(tail)
    extents = [Extent(0, block - 512), Extent(block - 512, len(tail), tail),
               Extent(end, 2 * block - end)]

    async def source() -> AsyncIterator[Extent]:
        for ext in extents:
            yield ext

    sink = RecordingSink(bytearray(2 * block))
    await Pipeline(source(), [ZeroDetect(block)], sink, virtual_size=2 * block).run()
    shape = [(e.offset, e.length, e.data is None) for e in sink.extents]
    assert shape == [(0, block - 512, True), (block - 512, 512, False), (block, block, True)]
    inside = Extent(block + 100, 200, bytes(100) + b"\x01" * 100)  # one block: kept whole
    runs = ZeroDetect(block)._split(inside, inside.data or b"")
    assert runs == [(block + 100, block + 300, False)]


async def test_stages_get_the_cpu_pool_and_it_is_shut_down() -> None:
    names: list[str] = []

    class Cpu(Stage):
        name = "cpu"

        async def start(self, ctx: PipelineContext) -> None:
            self.ctx = ctx

        async def process(self, extent: Extent) -> AsyncIterator[Extent]:
            names.append(await self.ctx.run_cpu(lambda: threading.current_thread().name))
            yield extent

    disk = sample_disk(3 * MiB)
    await Pipeline(disk_extents(disk), [Cpu()], RecordingSink(), virtual_size=len(disk)).run()
    assert names
    assert all(n.startswith("pipeline-cpu") for n in names)
    assert pipeline_threads() == []


async def test_a_pipeline_runs_once() -> None:
    pipe = Pipeline(disk_extents(b"x" * 10), [], RecordingSink(), virtual_size=10)
    await pipe.run()
    with pytest.raises(RuntimeError):
        await pipe.run()


# --------------------------------------------------------------------------- back-pressure


async def test_a_stalled_sink_stops_the_source() -> None:
    """Memory is bounded by queue depth: the source stops once the queues are full."""
    produced: list[int] = []
    gate = asyncio.Event()
    disk_size = 1 * GiB

    async def endless() -> AsyncIterator[Extent]:
        chunk = bytes(b"\x01" * MiB)
        for off in range(0, disk_size, MiB):
            produced.append(off)
            yield Extent(off, MiB, chunk)

    stages: list[Stage] = [ZeroDetect(), Watch("a"), Watch("b")]
    depth = 3
    pipe = Pipeline(endless(), stages, RecordingSink(gate=gate), PipelineOptions(queue_depth=depth))
    task = asyncio.create_task(pipe.run())
    await settle()
    # queues hold (stages + 1) * depth; each stage and the sink hold one in hand,
    # and the source one it is trying to put.
    bound = (len(stages) + 1) * depth + len(stages) + 2
    assert len(produced) <= bound
    stalled_at = len(produced)
    await settle()
    assert len(produced) == stalled_at  # it really stopped
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- throttle


async def test_token_bucket_bounds_every_window() -> None:
    clock = FakeClock()
    rate = 1_000_000.0
    bucket = TokenBucket(rate, clock=clock)
    sent: list[tuple[float, int]] = []
    for _ in range(400):
        n = bucket.piece
        await bucket.acquire(n)
        sent.append((clock.now, n))
    assert_rate_within(sent, rate, 0.10)


def assert_rate_within(sent: list[tuple[float, int]], rate: float, tolerance: float) -> None:
    """Every 1 s window starting at a send holds rate +- tolerance (full windows only)."""
    times = [t for t, _ in sent]
    end = times[-1]
    assert end > 3.0, "the run must span several seconds of fake time"
    for i, (start, _) in enumerate(sent):
        total = 0
        for t, n in sent[i:]:
            if t >= start + 1.0:
                break
            total += n
        assert total <= rate * (1 + tolerance), f"window at {start:.2f}s carried {total}"
        if start + 1.0 <= end:
            assert total >= rate * (1 - tolerance), f"window at {start:.2f}s carried {total}"


@pytest.mark.parametrize("rate", [3 * MiB, 700_000, 50_000])
async def test_throttle_holds_the_rate_over_any_second(rate: int) -> None:
    clock = FakeClock()
    size = max(6 * rate, 4 * MiB)
    disk = bytes(random.Random(9).randbytes(size))

    class Stamp(ExtentSink):
        def __init__(self) -> None:
            self.sent: list[tuple[float, int]] = []

        async def write(self, extent: Extent) -> None:
            if extent.data is not None:
                self.sent.append((clock.now, extent.length))

        async def finish(self) -> None:
            return None

    sink = Stamp()
    await Pipeline(
        disk_extents(disk), [Throttle(rate)], sink, PipelineOptions(clock=clock), virtual_size=size
    ).run()
    assert sum(n for _, n in sink.sent) == size
    assert_rate_within(sink.sent, rate, 0.10)
    assert clock.now == pytest.approx(size / rate, rel=0.10)


async def test_throttle_lets_zero_runs_through_free() -> None:
    clock = FakeClock()

    async def source() -> AsyncIterator[Extent]:
        yield Extent(0, 100 * GiB)
        yield Extent(100 * GiB, 1000, b"x" * 1000)

    await Pipeline(
        source(),
        [Throttle(1000)],
        RecordingSink(),
        PipelineOptions(clock=clock),
        virtual_size=100 * GiB + 1000,
    ).run()
    assert clock.now <= 1.0


# --------------------------------------------------------------------------- progress


async def test_progress_is_rate_limited_and_ends_at_the_total() -> None:
    clock = FakeClock()
    disk = sample_disk(50 * MiB, seed=4)
    reports: list[tuple[float, TransferProgress]] = []

    def tick(_: Extent) -> None:
        clock.now += 0.013  # every extent "takes" 13 ms

    await Pipeline(
        disk_extents(disk, 256 * 1024),
        [Watch(on_extent=tick)],
        RecordingSink(),
        PipelineOptions(
            clock=clock,
            on_progress=lambda p: reports.append((clock.now, p)),
            progress_hz=4.0,
        ),
        virtual_size=len(disk),
    ).run()
    elapsed = clock.now
    assert len(reports) <= 4 * elapsed + 2
    assert len(reports) >= 4 * elapsed - 2
    times = [t for t, _ in reports[:-1]]
    assert all(b - a >= 0.25 - 1e-9 for a, b in itertools.pairwise(times))
    done = [p.bytes_done for _, p in reports]
    assert done == sorted(done)
    last = reports[-1][1]
    assert last.bytes_done == last.bytes_total == len(disk)
    assert last.rate == pytest.approx(len(disk) / elapsed, rel=0.05)


# --------------------------------------------------------------------------- cancellation


async def test_cancel_stops_every_part_and_releases_everything() -> None:
    gate = asyncio.Event()  # never set: the sink hangs
    source_closed = asyncio.Event()
    before = other_tasks()

    async def source() -> AsyncIterator[Extent]:
        try:
            off = 0
            while True:
                yield Extent(off, MiB, b"\x02" * MiB)
                off += MiB
        finally:
            source_closed.set()

    first, last = Watch("a"), Watch("b")
    stages = [first, DigestStage(1 << 40), last]
    sink = RecordingSink(gate=gate)
    task = asyncio.create_task(Pipeline(source(), stages, sink).run())
    await settle()
    assert first.started
    assert last.started
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)  # a hang guard, not a timing assertion
    assert task.cancelled()
    assert source_closed.is_set()
    assert first.closed
    assert last.closed
    assert sink.closed
    assert not sink.finished
    assert pipeline_threads() == []
    assert other_tasks() == before


@pytest.mark.parametrize(
    ("fmt", "subformat"),
    [("raw", None), ("qcow2", None), ("vmdk", None), ("vhd", "dynamic"), ("vhdx", None)],
)
async def test_cancelled_file_conversion_leaves_nothing_running(
    tmp_path: Path, fmt: str, subformat: str | None
) -> None:
    """After a cancel nothing may still write into the file the caller is about to
    close: the pipeline's tasks are gone and the writer's own in-flight writes were
    stopped by its ``abort()``."""
    gate = threading.Event()

    class GatedSink(FileSink):
        """Every write waits for the gate (bounded), so writes pile up in flight."""

        writes = 0

        def _pwrite_all(self, offset: int, data: bytes | memoryview) -> None:
            gate.wait(10)
            super()._pwrite_all(offset, data)
            self.writes += 1

    src = tmp_path / "src.raw"
    make_sparse_raw(src, 64 * MiB, [(0, 40 * MiB)], seed=1)
    before = other_tasks()
    source = FileSource(src)
    sink = GatedSink(tmp_path / "out.img")
    reader = await raw.open_reader(source)
    writer = registry.create_writer(fmt, sink, reader.virtual_size, WriterOptions(subformat))
    seen = asyncio.Event()
    conv = Converter(
        reader, writer, extra_stages=[Watch(on_extent=lambda e: seen.set() if e.offset else None)]
    )
    task = asyncio.create_task(conv.run())
    await seen.wait()
    await settle(20)  # let the writer get some writes in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pipeline_threads() == []
    try:
        assert not [t for t in other_tasks() - before if t.get_name().startswith("pipeline-")]
        assert other_tasks() - before == set()  # nothing still writing into the file
        # The file sink's writes are futures queued in its thread, not tasks: abort()
        # cancelled the queued ones; only the one already running may complete.
        assert sink.writes == 0
        gate.set()
        await sink.close()
        assert sink.writes <= 1
    finally:
        gate.set()
        await asyncio.gather(*(other_tasks() - before), return_exceptions=True)
        await reader.close()
        await sink.close()


# --------------------------------------------------------------------------- failures


class Boom(RuntimeError):
    pass


async def test_a_failing_stage_cancels_the_others_and_is_named() -> None:
    disk = sample_disk(20 * MiB, seed=2)
    disk = b"\x07" + disk[1:]
    source_closed = False

    async def source() -> AsyncIterator[Extent]:
        nonlocal source_closed
        try:
            async for ext in disk_extents(disk, MiB, zero_runs=False):
                yield ext
        finally:
            source_closed = True

    def explode(ext: Extent) -> None:
        if ext.offset == 5 * MiB:
            raise Boom("disk on fire")

    after = Watch("after")
    sink = RecordingSink()
    with pytest.raises(PipelineError) as info:
        await Pipeline(source(), [Watch("before"), Watch("hasher", explode), after], sink).run()
    err = info.value
    assert err.stage == "hasher"
    assert err.offset == 5 * MiB
    assert isinstance(err.cause, Boom)
    assert "hasher" in str(err)
    assert str(5 * MiB) in str(err)
    assert "disk on fire" in str(err)
    assert source_closed
    assert after.closed
    assert sink.closed
    assert not sink.finished
    assert sink.pos <= 5 * MiB
    assert pipeline_threads() == []


class InlineWatch(Watch):
    """A Watch that runs inside the task before it and records which task that was."""

    inline = True

    def __init__(self, name: str, on_extent: Callable[[Extent], None] | None = None) -> None:
        super().__init__(name, on_extent)
        self.tasks: set[str] = set()
        self.held: Extent | None = None

    async def process(self, extent: Extent) -> AsyncIterator[Extent]:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task.get_name())
        # Hold each extent back by one, so finish() has something to flush.
        async for ext in super().process(extent):
            if self.held is not None:
                yield self.held
            self.held = ext

    async def finish(self) -> AsyncIterator[Extent]:
        if self.held is not None:
            yield self.held
            self.held = None


async def test_inline_stages_ride_in_the_task_before_them() -> None:
    disk = sample_disk(9 * MiB, seed=5)
    first, heavy, last = InlineWatch("first"), Watch("heavy"), InlineWatch("last")
    sink = RecordingSink(bytearray(len(disk)))
    seen_tasks: set[str] = set()

    def tasks_now(_: Extent) -> None:
        seen_tasks.update(t.get_name() for t in asyncio.all_tasks() if not t.done())

    heavy.on_extent = tasks_now
    await Pipeline(
        disk_extents(disk, MiB, zero_runs=False), [first, heavy, last], sink, virtual_size=len(disk)
    ).run()
    assert bytes(sink.device or b"") == disk
    assert all(w.started and w.closed for w in (first, last))
    assert first.tasks == {"pipeline-decode"}
    assert last.tasks == {"pipeline-heavy"}
    assert first.seen == last.seen == heavy.seen == 9
    # Source, "heavy" and the sink have tasks; the inline stages have none of their own.
    pipeline_tasks = {t for t in seen_tasks if t.startswith("pipeline-")}
    assert pipeline_tasks == {"pipeline-decode", "pipeline-heavy", "pipeline-record"}


@pytest.mark.parametrize("position", [0, 1])
async def test_a_failing_inline_stage_is_named_with_its_offset(position: int) -> None:
    def explode(ext: Extent) -> None:
        if ext.offset == 3 * MiB:
            raise Boom("inline trouble")

    stages: list[Stage] = [Watch("heavy")]
    stages.insert(position, InlineWatch("zero-ish", explode))
    disk = b"\x03" * (6 * MiB)
    with pytest.raises(PipelineError) as info:
        await Pipeline(disk_extents(disk), stages, RecordingSink()).run()
    assert info.value.stage == "zero-ish"
    assert info.value.offset == 3 * MiB
    assert "inline trouble" in str(info.value)
    assert pipeline_threads() == []


async def test_a_failing_sink_is_named() -> None:
    class Broken(RecordingSink):
        name = "target"

        async def write(self, extent: Extent) -> None:
            if extent.offset >= 2 * MiB:
                raise OSError(28, "No space left on device")
            await super().write(extent)

    disk = b"\x01" * (4 * MiB)
    with pytest.raises(PipelineError) as info:
        await Pipeline(disk_extents(disk), [], Broken(), virtual_size=len(disk)).run()
    assert info.value.stage == "target"
    assert info.value.offset == 2 * MiB
    assert "No space left" in str(info.value)


async def test_a_failing_source_is_named_with_its_offset() -> None:
    async def source() -> AsyncIterator[Extent]:
        yield Extent(0, MiB, b"\x01" * MiB)
        raise FormatError("bad L2 table", fmt="qcow2", offset=12345)

    with pytest.raises(PipelineError) as info:
        await Pipeline(source(), [Watch()], RecordingSink(), source_name="decode (qcow2)").run()
    assert info.value.stage == "decode (qcow2)"
    assert info.value.offset == MiB
    assert isinstance(info.value.cause, FormatError)


@pytest.mark.parametrize(
    ("extents", "size", "stage"),
    [
        ([Extent(0, 10, b"a" * 10), Extent(20, 10)], 30, "decode"),  # gap
        ([Extent(0, 10, b"a" * 10), Extent(5, 10)], 15, "decode"),  # overlap
        ([Extent(0, 10, b"a" * 10)], 5, "decode"),  # past the end
        ([Extent(0, 10, b"a" * 10)], 20, "record"),  # too short
    ],
)
async def test_broken_streams_are_errors(extents: list[Extent], size: int, stage: str) -> None:
    async def source() -> AsyncIterator[Extent]:
        for ext in extents:
            yield ext

    sink = RecordingSink()
    with pytest.raises(PipelineError) as info:
        await Pipeline(source(), [], sink, virtual_size=size).run()
    assert info.value.stage == stage
    assert not sink.finished


# --------------------------------------------------------------------------- checkpoints


async def test_skip_below_trims_straddling_extents() -> None:
    out: list[Extent] = []
    stage = SkipBelow(1500)
    for ext in (Extent(0, 1000, b"a" * 1000), Extent(1000, 1000, b"b" * 1000), Extent(2000, 5)):
        out.extend([e async for e in stage.process(ext)])
    assert [(e.offset, e.length) for e in out] == [(1500, 500), (2000, 5)]
    assert bytes(out[0].data or b"") == b"b" * 500


async def test_resume_after_random_interruptions_gives_the_same_bytes() -> None:
    """Cancel at random points, lose (overwrite with garbage) everything past the durable
    offset, resume from it; the device ends byte-identical and the digest is right."""
    rng = random.Random(1234)
    disk = sample_disk(12 * MiB + 4321, seed=8)
    device = bytearray(len(disk))
    resume = 0
    interruptions = 0
    resumed_at: set[int] = set()
    for attempt in range(60):
        interrupt = Interrupter(rng.randint(1, 12) if attempt < 40 else -1)
        digest = DigestStage(len(disk))
        pipe = Pipeline(
            disk_extents(disk, 256 * 1024),
            [ZeroDetect(), digest, SkipBelow(resume), interrupt],
            RecordingSink(device, durable_every=rng.choice([256 * 1024, MiB, 3 * MiB])),
            PipelineOptions(resume_from=resume, queue_depth=rng.randint(1, 4)),
            virtual_size=len(disk),
        )
        task = interrupt.task = asyncio.create_task(pipe.run())
        try:
            await task
        except asyncio.CancelledError:
            interruptions += 1
            assert pipe.durable_offset >= resume
            resume = pipe.durable_offset
            resumed_at.add(resume)
            assert device[:resume] == disk[:resume]
            # Whatever was not durable is lost: garbage from here on.
            device[resume:] = b"\xee" * (len(disk) - resume)
            continue
        assert digest.hexdigest == digest_bytes(disk)
        break
    assert interruptions >= 5
    assert len(resumed_at - {0}) >= 3  # resumed from several different checkpoints
    assert bytes(device) == disk


async def test_resume_into_a_raw_file(tmp_path: Path) -> None:
    """The real raw writer, resumed from the pipeline's durable offset after random
    interruptions and garbage past it, produces an identical file (qemu-img compare)."""
    rng = random.Random(77)
    size = 40 * MiB + 512
    src = tmp_path / "src.raw"
    make_sparse_raw(src, size, random_layout(size, 25, 3 * MiB, seed=5), seed=6)
    out = tmp_path / "out.raw"
    resume = 0
    interruptions = 0
    resumed_at: set[int] = set()
    result = None
    for attempt in range(80):
        source = FileSource(src)
        sink = FileSink(out, create=attempt == 0)
        reader = await raw.open_reader(source)
        writer = raw.RawWriter(sink, size, resume_from=resume, flush_interval=MiB)
        interrupt = Interrupter(rng.randint(4, 40) if attempt < 40 else -1)
        conv = Converter(
            reader,
            writer,
            ConvertOptions(resume_from=resume, chunk_size=256 * 1024),
            extra_stages=[interrupt],
        )
        task = interrupt.task = asyncio.create_task(conv.run())
        try:
            result = await task
        except asyncio.CancelledError:
            interruptions += 1
            assert conv.durable_offset >= resume
            resume = conv.durable_offset
            resumed_at.add(resume)
            with open(out, "r+b") as f:  # the unflushed tail may be anything
                f.seek(0, 2)
                end = f.tell()
                if end > resume:
                    f.seek(rng.randrange(resume, end))
                    f.write(b"\xee" * 4096)
            continue
        finally:
            await reader.close()
            await sink.close()
        break
    assert result is not None
    assert interruptions >= 5
    assert len(resumed_at - {0}) >= 3
    assert_identical(src, out)
    assert result.digest == digest_file(src) == digest_file(out)


async def test_raw_writer_checkpoints_reach_the_callback(tmp_path: Path) -> None:
    size = 12 * MiB
    src = tmp_path / "src.raw"
    make_sparse_raw(src, size, [(0, size)], seed=3)
    checkpoints: list[int] = []
    source = FileSource(src)
    sink = FileSink(tmp_path / "out.raw")
    try:
        reader = await raw.open_reader(source)
        writer = raw.RawWriter(sink, size, flush_interval=2 * MiB)
        conv = Converter(reader, writer, ConvertOptions(on_checkpoint=checkpoints.append))
        result = await conv.run()
    finally:
        await source.close()
        await sink.close()
    assert checkpoints == sorted(set(checkpoints))
    assert len(checkpoints) >= 4
    assert checkpoints[-1] == size
    assert conv.durable_offset == size
    assert result.digest == digest_file(src)


# --------------------------------------------------------------------------- convert


async def test_convert_raw_to_raw(tmp_path: Path) -> None:
    size = 33 * MiB + 4096
    src = tmp_path / "src.raw"
    make_sparse_raw(src, size, random_layout(size, 20, 2 * MiB, seed=11), seed=12)
    out = tmp_path / "out.raw"
    source = FileSource(src)
    sink = FileSink(out)
    progress: list[TransferProgress] = []
    try:
        reader = await raw.open_reader(source)
        writer = raw.create_writer(sink, size)
        options = ConvertOptions(on_progress=progress.append, throttle_bps=1 << 40)
        result = await convert(reader, writer, options)
    finally:
        await source.close()
        await sink.close()
    assert_identical(src, out)
    assert result.virtual_size == size
    assert result.digest == digest_file(src)
    assert progress
    assert progress[-1].bytes_done == size


class StreamOnly:
    """A :class:`~app.formats.base.SequentialSink` that is nothing else (a pipe)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    async def write(self, data: bytes | memoryview) -> None:
        self.buffer += data

    async def close(self) -> None:
        return None


async def test_a_streaming_writer_gets_the_allocation_map(tmp_path: Path) -> None:
    size = 16 * MiB
    src = tmp_path / "src.raw"
    make_sparse_raw(src, size, [(MiB, 3 * MiB), (9 * MiB + 5, 70_000)], seed=21)
    source = FileSource(src)
    try:
        reader = await raw.open_reader(source)
        stream = StreamOnly()
        writer = registry.create_writer("qcow2", stream, size)
        assert writer.needs_allocation_map
        result = await convert(reader, writer, ConvertOptions(stream_output=True))
        out = tmp_path / "out.qcow2"
        out.write_bytes(stream.buffer)
        proc = qemu_img("compare", "-f", "raw", "-F", "qcow2", src, out, check=False)
        assert proc.returncode == 0, proc.stdout
        assert result.digest == digest_file(src)
        # Without the map the streaming writer refuses the data, and says so.
        reader = await raw.open_reader(source)
        writer = registry.create_writer("qcow2", StreamOnly(), size)
        with pytest.raises(PipelineError) as info:
            await convert(reader, writer)
        assert info.value.stage == "encode (qcow2)"
    finally:
        await source.close()


async def test_a_seekable_writer_gets_no_map_and_keeps_holes(tmp_path: Path) -> None:
    """VHD dynamic on a file: only the data is written, like qemu-img (not whole blocks)."""
    size = 64 * MiB
    src = tmp_path / "src.raw"
    make_sparse_raw(src, size, [(i * 4 * MiB, 256 * 1024) for i in range(16)], seed=22)
    out = tmp_path / "out.vhd"
    source = FileSource(src)
    sink = FileSink(out)
    try:
        reader = await raw.open_reader(source)
        writer = registry.create_writer("vhd", sink, size, WriterOptions(subformat="dynamic"))
        await convert(reader, writer)
    finally:
        await source.close()
        await sink.close()
    proc = qemu_img("compare", "-f", "raw", "-F", "vpc", src, out, check=False)
    assert proc.returncode == 0, proc.stdout
    assert out.stat().st_blocks * 512 < 8 * MiB  # 4 MiB of data, not 16 blocks of 2 MiB


async def test_convert_rejects_a_writer_of_another_size(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_sparse_raw(src, MiB, [], seed=0)
    source = FileSource(src)
    try:
        reader = await raw.open_reader(source)
        with pytest.raises(FormatError):
            await convert(reader, raw.create_writer(FileSink(tmp_path / "o"), 2 * MiB))
    finally:
        await source.close()


async def test_interrupted_digest_stage_does_not_leak_when_cancelled_early() -> None:
    # Cancel before the first extent reaches any stage.
    task = asyncio.create_task(
        Pipeline(disk_extents(b"\x01" * MiB), [DigestStage(MiB)], RecordingSink()).run()
    )
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert pipeline_threads() == []


# --------------------------------------------------------------------------- options


def test_options_are_validated_when_the_pipeline_is_built() -> None:
    with pytest.raises(ValueError, match="queue_depth"):
        Pipeline(disk_extents(b"x" * 10), [], RecordingSink(), PipelineOptions(queue_depth=0))
    with pytest.raises(ValueError, match="outside the disk"):
        Pipeline(disk_extents(b"x" * 10), [], RecordingSink(),
                 PipelineOptions(resume_from=11), virtual_size=10)


async def test_one_convert_options_value_drives_the_pipeline_it_builds(tmp_path: Path) -> None:
    """The run fields of ConvertOptions reach the Pipeline unchanged (it is one value,
    not a second list of arguments), and the conversion fields choose the stages."""
    src = tmp_path / "src.raw"
    make_sparse_raw(src, 4 * MiB, [(0, MiB)], seed=31)
    clock = FakeClock()
    options = ConvertOptions(queue_depth=2, cpu_threads=3, clock=clock, digest=False,
                             detect_zeroes=False, throttle_bps=1 << 30)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.queue_depth = 5  # type: ignore[misc]
    source = FileSource(src)
    sink = FileSink(tmp_path / "out.raw")
    try:
        reader = await raw.open_reader(source)
        conv = Converter(reader, raw.create_writer(sink, 4 * MiB), options)
        assert conv.pipeline.options is options
        assert (conv.pipeline.queue_depth, conv.pipeline.cpu_threads) == (2, 3)
        assert conv.pipeline.clock is clock
        assert [type(s) for s in conv.pipeline.stages] == [Throttle]
        result = await conv.run()
    finally:
        await source.close()
        await sink.close()
    assert result.digest is None
    assert_identical(src, tmp_path / "out.raw")
