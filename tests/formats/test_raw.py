"""Raw reader and writer: holes, zero detection, sequential sources and sinks, resume."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.formats import raw
from app.formats.base import Extent, FormatError, WriterOptions
from app.formats.io import BytesSink, BytesSource, FileSink, FileSource
from tests.formats import oracle

KiB = 1024
MiB = 1024 * KiB


class ChunkySource:
    """A sequential source over bytes that returns random short reads."""

    def __init__(self, data: bytes, *, with_size: bool = True, seed: int = 0) -> None:
        self._data = data
        self._pos = 0
        self._rng = random.Random(seed)
        if with_size:
            self.size = len(data)

    async def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        take = min(n, self._rng.randint(1, max(1, n)))
        out = self._data[self._pos : self._pos + take]
        self._pos += len(out)
        return out

    async def close(self) -> None:
        return None


class StreamSink:
    """A sequential-only sink collecting bytes and the size of every write."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.writes: list[int] = []

    async def write(self, data: bytes | memoryview) -> None:
        self.writes.append(len(data))
        self.buffer.extend(data)

    async def close(self) -> None:
        return None


class RecordingSink(BytesSink):
    """A seekable in-memory sink that remembers the size of every write and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0

    async def write_at(self, offset: int, data: bytes | memoryview) -> None:
        self.writes.append((offset, len(data)))
        await super().write_at(offset, data)

    async def flush(self) -> None:
        self.flushes += 1


def check_contract(extents: list[Extent], size: int, chunk: int) -> None:
    pos = 0
    prev_zero = False
    for ext in extents:
        assert ext.offset == pos
        if ext.is_zero:
            assert not prev_zero, "adjacent zero extents must be merged"
        else:
            assert ext.length <= chunk
        prev_zero = ext.is_zero
        pos = ext.end
    assert pos == size


def materialise(extents: list[Extent]) -> bytes:
    return b"".join(bytes(e.length) if e.data is None else bytes(e.data) for e in extents)


async def collect(reader: raw.RawReader, chunk: int = MiB) -> list[Extent]:
    return [e async for e in reader.extents(chunk)]


def sparse_file(path: Path) -> bytes:
    """A 10 MB file: data, holes, an explicitly written zero block, unaligned tail."""
    size = 10_000_123
    oracle.make_sparse_raw(path, size, [(0, 100), (3 * MiB + 7, 2 * MiB), (size - 5000, 5000)])
    with open(path, "r+b") as f:  # allocated zeros inside a data range
        f.seek(4 * MiB)
        f.write(bytes(512 * KiB))
    return path.read_bytes()


async def test_random_access_reader_holes_and_zero_blocks(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    data = sparse_file(path)
    reader = await raw.open_reader(FileSource(path))
    assert reader.virtual_size == len(data)
    extents = await collect(reader)
    check_contract(extents, len(data), MiB)
    assert materialise(extents) == data
    zero_bytes = sum(e.length for e in extents if e.is_zero)
    assert zero_bytes >= 10_000_123 - 2 * MiB - 64 * KiB * 4  # holes and the zeroed block
    # The explicitly written zero block inside a data range is reported as zeros.
    assert any(e.is_zero and e.offset <= 4 * MiB and e.end >= 4 * MiB + 512 * KiB for e in extents)
    amap = await reader.allocation_map()
    assert amap is not None
    assert sum(n for _, n in amap) < len(data) // 2
    await reader.close()


@pytest.mark.parametrize("chunk", [4 * KiB, 100_000, MiB, 8 * MiB])
async def test_reader_chunk_sizes(tmp_path: Path, chunk: int) -> None:
    path = tmp_path / "disk.raw"
    data = sparse_file(path)
    reader = await raw.open_reader(FileSource(path))
    extents = await collect(reader, chunk)
    check_contract(extents, len(data), chunk)
    assert materialise(extents) == data


async def test_reader_without_data_ranges() -> None:
    rng = random.Random(3)
    data = bytes(200_000) + rng.randbytes(300_000) + bytes(70_000) + b"\x01"
    reader = await raw.open_reader(BytesSource(data))
    assert await reader.allocation_map() is None
    extents = await collect(reader, 64 * KiB)
    check_contract(extents, len(data), 64 * KiB)
    assert materialise(extents) == data
    assert extents[0].is_zero
    assert extents[0].length == 196_608


@pytest.mark.parametrize("size", [0, 1, 512, 65_537])
async def test_tiny_sizes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.raw"
    path.write_bytes(os.urandom(size))
    reader = await raw.open_reader(FileSource(path))
    assert await oracle.read_all(reader) == path.read_bytes()


async def test_sequential_reader_with_short_reads() -> None:
    rng = random.Random(7)
    data = rng.randbytes(100_000) + bytes(3 * MiB) + rng.randbytes(1_234_567) + bytes(10)
    for seed in range(3):
        reader = await raw.open_reader(ChunkySource(data, seed=seed))
        assert not reader.needs_random_access
        extents = await collect(reader, 256 * KiB)
        check_contract(extents, len(data), 256 * KiB)
        assert materialise(extents) == data
        assert any(e.is_zero and e.length >= 3 * MiB - 128 * KiB for e in extents)


async def test_sequential_reader_needs_a_size() -> None:
    with pytest.raises(FormatError, match="known size"):
        await raw.open_reader(ChunkySource(b"abc", with_size=False))
    reader = await raw.open_reader(ChunkySource(b"abc", with_size=False), virtual_size=3)
    assert materialise(await collect(reader)) == b"abc"
    with pytest.raises(FormatError, match="only be read once"):
        reader.extents()


async def test_sequential_reader_short_and_long_streams() -> None:
    reader = await raw.open_reader(ChunkySource(b"x" * 1000, with_size=False), virtual_size=2000)
    with pytest.raises(FormatError, match="ended after 1000"):
        await collect(reader)
    reader = await raw.open_reader(ChunkySource(b"x" * 3000, with_size=False), virtual_size=2000)
    with pytest.raises(FormatError, match="longer"):
        await collect(reader)


async def test_size_limit_and_probe() -> None:
    with pytest.raises(FormatError, match="exceeds"):
        await raw.open_reader(BytesSource(bytes(4096)), max_virtual_size=1024)
    assert raw.probe(b"QFI\xfb\0\0\0\3", b"") is False
    assert raw.probe(b"", b"") is False


# --------------------------------------------------------------------------- writer


async def copy(reader: raw.RawReader, writer: raw.RawWriter, chunk: int = MiB) -> None:
    async for ext in reader.extents(chunk):
        await writer.write(ext)
    await writer.finish()


async def test_writer_leaves_holes_on_a_fresh_file(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = sparse_file(src)
    dst = tmp_path / "dst.raw"
    sink = FileSink(dst)
    writer = raw.create_writer(sink, len(data), WriterOptions())
    assert writer.streamable
    await copy(await raw.open_reader(FileSource(src)), writer)
    await sink.close()
    assert dst.read_bytes() == data
    assert writer.durable_offset() == len(data)
    ranges = FileSource(dst).data_ranges_sync()
    if ranges is not None:  # SEEK_DATA supported: most of the file is a hole
        assert sum(n for _, n in ranges) < len(data) // 2
    # Same content (strict mode would flag the zeroed block we turned into a hole).
    oracle.qemu_img("compare", "-f", "raw", "-F", "raw", src, dst)


async def test_writer_overwrites_old_data_when_target_not_zeroed(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = sparse_file(src)
    dst = tmp_path / "device.raw"
    dst.write_bytes(b"\xaa" * (len(data) + 4096))  # stale contents, even longer
    sink = RecordingSink()
    sink.buffer[:] = dst.read_bytes()
    writer = raw.create_writer(sink, len(data), WriterOptions(target_zeroed=False))
    await copy(await raw.open_reader(FileSource(src)), writer)
    assert bytes(sink.buffer) == data
    assert max(n for _, n in sink.writes) <= MiB  # zeros in bounded chunks


async def test_writer_on_a_sequential_sink() -> None:
    rng = random.Random(1)
    data = bytes(5 * MiB + 3) + rng.randbytes(70_000) + bytes(2 * MiB)
    sink = StreamSink()
    writer = raw.create_writer(sink, len(data), WriterOptions())
    await copy(await raw.open_reader(BytesSource(data)), writer)
    assert bytes(sink.buffer) == data
    assert max(sink.writes) <= MiB
    assert writer.durable_offset() == 0
    with pytest.raises(FormatError, match="cannot resume"):
        raw.create_writer(StreamSink(), 10, WriterOptions(), resume_from=5)


async def test_writer_gaps_are_zeros_and_order_is_enforced() -> None:
    sink = BytesSink()
    writer = raw.create_writer(sink, 100, WriterOptions())
    await writer.write(Extent(10, 5, b"hello"))
    with pytest.raises(FormatError, match="out of order"):
        await writer.write(Extent(12, 2, b"xx"))
    with pytest.raises(FormatError, match="past the virtual size"):
        await writer.write(Extent(90, 20, bytes(20)))
    await writer.finish()
    assert bytes(sink.buffer) == bytes(10) + b"hello" + bytes(85)
    with pytest.raises(FormatError, match="after finish"):
        await writer.write(Extent(99, 1, b"x"))


async def test_periodic_flush_advances_durable_offset() -> None:
    data = os.urandom(3 * MiB)
    sink = RecordingSink()
    writer = raw.RawWriter(sink, len(data), WriterOptions(), flush_interval=MiB)
    seen = []
    async for ext in (await raw.open_reader(BytesSource(data))).extents(256 * KiB):
        await writer.write(ext)
        seen.append(writer.durable_offset())
    assert seen == sorted(seen)
    assert 0 < seen[len(seen) // 2] < len(data)
    assert sink.flushes >= 2
    await writer.finish()
    assert writer.durable_offset() == len(data)


async def test_flush_and_abort() -> None:
    data = os.urandom(2 * MiB)
    sink = RecordingSink()
    writer = raw.create_writer(sink, 4 * MiB, WriterOptions())
    await writer.write(Extent(0, len(data), data))
    assert writer.durable_offset() == 0
    await writer.flush()  # a pipeline checkpoint
    assert writer.durable_offset() == 2 * MiB
    assert sink.flushes == 1
    await writer.write(Extent(3 * MiB, MiB, data[:MiB]))
    await writer.abort()  # stops in-flight work; the output is left incomplete
    assert writer.durable_offset() == 2 * MiB


async def test_resume_from_checkpoint_is_byte_identical(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    size = 12 * MiB + 5
    oracle.make_sparse_raw(src, size, [(0, MiB), (2 * MiB, 3 * MiB), (8 * MiB, 4 * MiB + 5)])
    dst = tmp_path / "dst.raw"

    # First run: dies after writing past its last checkpoint, leaving junk beyond it.
    sink = FileSink(dst)
    writer = raw.RawWriter(sink, size, WriterOptions(), flush_interval=2 * MiB)
    async for ext in (await raw.open_reader(FileSource(src))).extents(512 * KiB):
        await writer.write(ext)
        if ext.end >= 9 * MiB:
            break
    checkpoint = writer.durable_offset()
    assert 0 < checkpoint < 9 * MiB
    await writer._wb.drain()
    await sink.write_at(checkpoint + 1000, b"\xee" * (3 * MiB))  # unflushed garbage
    await sink.close()

    # Second run: same stream from the start, skipping what is already durable.
    sink = FileSink(dst, create=False)
    writer = raw.create_writer(sink, size, WriterOptions(), resume_from=checkpoint)
    await copy(await raw.open_reader(FileSource(src)), writer)
    await sink.close()
    assert dst.read_bytes() == src.read_bytes()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=0, max_value=3 * MiB),
    spans=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 300_000), st.booleans()), max_size=8),
    chunk=st.sampled_from([4096, 65536, 1 << 20]),
    sequential=st.booleans(),
    zeroed=st.booleans(),
)
async def test_roundtrip_property(
    size: int,
    spans: list[tuple[float, int, bool]],
    chunk: int,
    sequential: bool,
    zeroed: bool,
) -> None:
    rng = random.Random(size)
    buf = bytearray(size)
    for frac, length, zero in spans:
        off = int(frac * size)
        n = min(length, size - off)
        buf[off : off + n] = bytes(n) if zero else rng.randbytes(n)
    data = bytes(buf)
    source = ChunkySource(data) if sequential else BytesSource(data)
    reader = await raw.open_reader(source)
    extents = await collect(reader, chunk)
    check_contract(extents, size, chunk)
    assert materialise(extents) == data
    sink = BytesSink()
    if not zeroed:
        sink.buffer.extend(b"\x55" * size)
    writer = raw.create_writer(sink, size, WriterOptions(target_zeroed=zeroed))
    for ext in extents:
        await writer.write(ext)
    await writer.finish()
    assert bytes(sink.buffer) == data
