"""File sources and sinks: positional reads, one ordered write thread, ranges
allocated before large writes."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from app.formats.base import FormatError
from app.formats.io import FileSink, FileSource
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
