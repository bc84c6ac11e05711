"""File sources and sinks: zero-copy views of regular files, one ordered write thread."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest

from app.formats.base import FormatError, read_data_at
from app.formats.io import VIEW_MIN, BytesSource, FileSink, FileSource
from app.formats.vdisk_common import read_exact_data_at

MiB = 1024 * 1024


def _mapped(path: Path) -> int:
    """How many mappings of ``path`` this process has."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(str(path)))


async def _settle() -> None:
    """Let the loop run the executor's completion callback (it holds the result until
    then) and collect garbage."""
    await asyncio.sleep(0)
    gc.collect()


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(5 * MiB + 12345)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


async def test_large_reads_of_a_regular_file_are_read_only_views(
    image: tuple[Path, bytes],
) -> None:
    path, data = image
    src = FileSource(path)
    try:
        offset = 4096 * 3 + 17  # not page aligned
        view = await src.read_view_at(offset, 2 * MiB)
        assert isinstance(view, memoryview)
        assert view.readonly
        assert view == data[offset : offset + 2 * MiB]
        with pytest.raises(TypeError):
            view[0] = 1
        # Past the end: cut to the file, like pread.
        tail = await src.read_view_at(len(data) - VIEW_MIN - 5, 4 * MiB)
        assert bytes(tail) == data[len(data) - VIEW_MIN - 5 :]
        assert await src.read_view_at(len(data), MiB) == b""
        # Small reads are plain copies.
        small = await src.read_view_at(100, VIEW_MIN - 1)
        assert isinstance(small, bytes)
        assert small == data[100 : 100 + VIEW_MIN - 1]
        # The helper every reader uses picks the view when there is one...
        assert isinstance(await read_data_at(src, 0, VIEW_MIN), memoryview)
    finally:
        await src.close()
    # ...and falls back to read_at for sources without views.
    assert await read_data_at(BytesSource(b"abc" * MiB), 1, MiB) == (b"abc" * MiB)[1 : MiB + 1]


async def test_a_view_unmaps_when_its_last_reference_goes(image: tuple[Path, bytes]) -> None:
    path, _ = image
    src = FileSource(path)
    before = _mapped(path)
    view = await src.read_view_at(0, 2 * MiB)
    part = view[MiB:]
    await src.close()  # the mapping outlives the descriptor
    assert _mapped(path) == before + 1
    del view
    await _settle()
    assert _mapped(path) == before + 1  # `part` still refers to it
    assert len(bytes(part)) == MiB
    del part
    await _settle()
    assert _mapped(path) == before


async def test_a_file_cut_short_after_opening_is_read_not_mapped(tmp_path: Path) -> None:
    """The size is re-checked before mapping: a truncated input gives a short read and
    then a FormatError, not a SIGBUS from touching pages past the new end."""
    path = tmp_path / "shrinks.raw"
    data = os.urandom(4 * MiB)
    path.write_bytes(data)
    src = FileSource(path)
    try:
        os.truncate(path, MiB)
        short = await src.read_view_at(0, 4 * MiB)
        assert isinstance(short, bytes)
        assert short == data[:MiB]
        assert _mapped(path) == 0
        with pytest.raises(FormatError, match="truncated disk data"):
            await read_exact_data_at(src, MiB, MiB, "raw", "disk data")
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
