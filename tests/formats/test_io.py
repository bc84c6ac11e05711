"""File sources and sinks: positional reads, one ordered write thread, ranges
allocated before large writes."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from app.formats import io as io_mod
from app.formats.base import FormatError
from app.formats.io import FileSink, FileSource, Lane
from app.formats.vdisk_common import read_exact_at

MiB = 1024 * 1024


async def test_a_file_cut_short_after_opening_gives_a_format_error(tmp_path: Path) -> None:
    """Reads are copies, not mappings: an input truncated under a conversion comes back
    short and then fails with a FormatError (a mapping would kill the process with
    SIGBUS on the first page past the new end)."""
    path = tmp_path / "shrinks.raw"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    src = FileSource(path)
    try:
        os.truncate(path, MiB)
        short = await src.read_at(0, 4 * MiB)
        assert short == data[:MiB]
        with pytest.raises(FormatError, match="truncated disk data"):
            await read_exact_at(src, MiB, MiB, "raw", "disk data")
    finally:
        await src.close()


async def test_file_sink_runs_operations_in_call_order(tmp_path: Path) -> None:
    """Writes to the same range, issued together, land in the order they were made,
    and a flush or truncate comes after them (one thread, FIFO)."""
    path = tmp_path / "out.raw"
    sink = FileSink(path)
    rounds = 50
    try:
        writes = [sink.write_at(0, bytes([i]) * (256 * 1024)) for i in range(1, rounds + 1)]
        await asyncio.gather(*writes, sink.truncate(300 * 1024), sink.flush())
        await asyncio.gather(sink.write(b"x" * 10), sink.write(b"y" * 10))
    finally:
        await sink.close()
    got = path.read_bytes()
    assert len(got) == 300 * 1024
    assert got[:10] == b"x" * 10
    assert got[10:20] == b"y" * 10
    assert got[20 : 256 * 1024] == bytes([rounds]) * (256 * 1024 - 20)
    assert got[256 * 1024 :] == bytes(300 * 1024 - 256 * 1024)


async def test_file_sink_close_waits_for_writes_in_flight(tmp_path: Path) -> None:
    """A write already handed to the sink's thread finishes before the descriptor is
    closed (it would otherwise write to a closed, or worse a reused, descriptor)."""
    path = tmp_path / "out.raw"
    sink = FileSink(path)
    tasks = [asyncio.ensure_future(sink.write_at(i * MiB, b"\x01" * MiB)) for i in range(8)]
    await asyncio.sleep(0)  # all eight are queued in the sink's thread now
    await sink.close()
    await asyncio.gather(*tasks)
    assert path.read_bytes() == b"\x01" * (8 * MiB)


# -- Lane: the worker thread behind FileSource and FileSink ---------------------------


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "test-lane"]


async def test_lane_runs_calls_in_order_and_returns_each_outcome() -> None:
    lane = Lane("test-lane")
    seen: list[int] = []

    def work(i: int) -> int:
        seen.append(i)
        if i == 7:
            raise ValueError("seven")
        return i * i

    futures = [lane.call(work, i) for i in range(20)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    await lane.stop()
    assert seen == list(range(20))
    assert [o for i, o in enumerate(outcomes) if i != 7] == [i * i for i in range(20) if i != 7]
    assert isinstance(outcomes[7], ValueError)
    assert str(outcomes[7]) == "seven"


async def test_lane_wakes_a_busy_loop_once_for_many_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls that finish while the loop is busy come back with one wake-up, not one
    per call (each wake-up is a write to the loop's self-pipe)."""
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    lane = Lane("test-lane")
    futures = [lane.call(lambda i=i: i) for i in range(50)]
    last_started = threading.Event()
    futures.append(lane.call(last_started.set))
    # The loop is blocked here until the 51st call runs, so the first 50 have all
    # finished while it was busy; only the 51st may need a wake-up of its own.
    assert last_started.wait(10)
    results = await asyncio.gather(*futures)
    assert results == [*range(50), None]
    assert 1 <= wakeups <= 2
    await lane.stop()


async def test_lane_skips_calls_cancelled_before_they_start() -> None:
    lane = Lane("test-lane")
    gate = threading.Event()
    ran: list[str] = []
    first = lane.call(gate.wait, 10)
    second = lane.call(ran.append, "second")
    third = lane.call(ran.append, "third")
    second.cancel()
    gate.set()
    assert await first is True
    await third
    await lane.stop()
    assert ran == ["third"]


async def test_lane_stop_finishes_queued_calls_and_a_later_call_starts_again() -> None:
    lane = Lane("test-lane")
    done: list[int] = []

    def slow(i: int) -> None:
        time.sleep(0.01)
        done.append(i)

    futures = [lane.call(slow, i) for i in range(5)]
    await lane.stop()
    assert done == list(range(5))
    assert all(f.done() for f in futures)
    assert not _lane_threads()
    assert await lane.call(lambda: 42) == 42
    await lane.stop()
    assert not _lane_threads()


def test_lane_serves_one_loop_after_another_and_ends_when_dropped() -> None:
    """A lane (a FileSource's, say) may be used from two event loops in turn; a lane
    nobody stops ends its thread once it is garbage."""
    lanes = [Lane("test-lane")]

    async def use(n: int) -> int:
        return int(await lanes[0].call(lambda: n + 1))

    assert asyncio.run(use(1)) == 2
    assert asyncio.run(use(2)) == 3
    assert len(_lane_threads()) == 1
    lanes.clear()
    gc.collect()
    for _ in range(200):
        if not _lane_threads():
            break
        time.sleep(0.01)
    assert not _lane_threads()


async def test_file_source_close_waits_for_reads_in_flight(image_path: Path) -> None:
    src = FileSource(image_path)
    reads = [src.read_at(i * MiB, MiB) for i in range(4)]
    await src.close()
    assert [len(r) for r in await asyncio.gather(*reads)] == [MiB] * 4


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 * MiB))
    return path


# -- FileSink: ranges allocated before large writes -----------------------------------


async def test_file_sink_allocates_large_writes_only_and_keeps_holes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert io_mod._fallocate is not None, "this libc has fallocate"
    calls: list[tuple[int, int]] = []
    real = io_mod._fallocate

    def recording(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, mode, offset, length)

    monkeypatch.setattr(io_mod, "_fallocate", recording)
    path = tmp_path / "sparse.raw"
    sink = FileSink(path)
    data = os.urandom(MiB)
    await sink.write_at(64 * MiB, data)
    await sink.write_at(200 * MiB, b"small")
    await sink.truncate(256 * MiB)
    await sink.close()
    assert calls == [(64 * MiB, MiB)]
    with path.open("rb") as f:
        f.seek(64 * MiB)
        assert f.read(MiB) == data
    st = path.stat()
    assert st.st_size == 256 * MiB
    assert st.st_blocks * 512 <= 2 * MiB  # the data, not the 256 MiB around it


async def test_file_sink_without_fallocate_support_just_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        nonlocal calls
        calls += 1
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(io_mod, "_fallocate", unsupported)
    path = tmp_path / "out.raw"
    sink = FileSink(path)
    for i in range(3):
        await sink.write_at(i * MiB, bytes([i + 1]) * MiB)
    await sink.close()
    assert calls == 1  # asked once, then never again
    assert path.read_bytes() == b"".join(bytes([i + 1]) * MiB for i in range(3))


async def test_file_sink_out_of_space_from_fallocate_fails_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_mod, "_fallocate", full)
    sink = FileSink(tmp_path / "out.raw")
    with pytest.raises(OSError, match="No space left") as info:
        await sink.write_at(0, bytes(MiB))
    assert info.value.errno == errno.ENOSPC
    await sink.close()
