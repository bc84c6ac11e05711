"""``ImageReader.skip_below``: raw and qcow2 readers leave the data below the offset
unread (a resumed conversion drops it anyway) and read everything above as always."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from app.formats.base import Extent
from app.formats.io import FileSource
from app.formats.registry import open_reader
from tests.formats.oracle import qemu_img

MiB = 1024 * 1024
SIZE = 8 * MiB


class Counting:
    """A file source that counts the bytes read from it."""

    def __init__(self, path: Path) -> None:
        self._file = FileSource(path)
        self.read = 0

    @property
    def size(self) -> int:
        return self._file.size

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await self._file.read_at(offset, length)
        self.read += len(data)
        return data

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        return await self._file.data_ranges()

    async def close(self) -> None:
        await self._file.close()


def _bytes_from(extents: list[Extent], start: int) -> bytes:
    out = bytearray(SIZE - start)
    for ext in extents:
        if ext.data is not None and ext.end > start:
            lo = max(ext.offset, start)
            out[lo - start:ext.end - start] = bytes(ext.data)[lo - ext.offset:]
    return bytes(out)


async def _read(path: Path, fmt: str, skip: int) -> tuple[list[Extent], int, bool]:
    source = Counting(path)
    try:
        reader = await open_reader(source, fmt)
        skipped = reader.skip_below(skip) if skip else False
        extents = [Extent(e.offset, e.length, None if e.data is None else bytes(e.data))
                   async for e in reader.extents()]
    finally:
        await source.close()
    return extents, source.read, skipped


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_skip_below_reads_only_the_upper_part(tmp_path: Path, fmt: str) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(1).randbytes(SIZE))
    path = raw
    if fmt == "qcow2":
        path = tmp_path / "disk.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, path)
    start = 5 * MiB + 4096  # not cluster-aligned: the cluster it falls in is read whole
    full, read_all, _ = await _read(path, fmt, 0)
    part, read_part, skipped = await _read(path, fmt, start)
    assert skipped
    assert _bytes_from(part, start) == _bytes_from(full, start) == raw.read_bytes()[start:]
    assert all(e.data is None for e in part if e.end <= start - 64 * 1024)
    assert (part[0].offset, part[-1].end) == (0, SIZE)  # still the whole disk
    assert read_part < read_all - 4 * MiB  # the 5 MiB below were not read
