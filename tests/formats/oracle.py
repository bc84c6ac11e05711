"""qemu-img as the oracle for disk formats: helpers shared by the format tests."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from app.formats.base import ImageReader
from app.formats.io import FileSource

QEMU_IMG = "qemu-img"


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; raise with its stderr when it fails and ``check`` is set."""
    proc = subprocess.run(
        [QEMU_IMG, *map(str, args)], capture_output=True, text=True, timeout=600, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))} failed: {proc.stderr}")
    return proc


def qemu_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(qemu_img("info", "--output=json", path).stdout)
    return info


def make_sparse_raw(
    path: Path, size: int, extents: list[tuple[int, int]], seed: int = 0
) -> None:
    """Create a raw file of ``size`` bytes with random data in ``extents``, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, length in extents:
            f.seek(off)
            f.write(rng.randbytes(length))


def random_layout(size: int, count: int, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` random, possibly unaligned data extents inside ``[0, size)``."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        if size == 0:
            break
        off = rng.randrange(0, size)
        out.append((off, min(rng.randint(1, max_len), size - off)))
    return out


async def read_all(reader: ImageReader, chunk_size: int = 1 << 20) -> bytes:
    """Materialise a reader's whole virtual disk, checking the extent contract on the way."""
    buf = bytearray()
    expected = 0
    async for ext in reader.extents(chunk_size):
        assert ext.offset == expected, f"gap or overlap at {expected}: extent at {ext.offset}"
        if ext.data is None:
            buf.extend(bytes(ext.length))
        else:
            assert ext.length <= chunk_size
            buf.extend(ext.data)
        expected = ext.end
    assert expected == reader.virtual_size
    return bytes(buf)


async def read_to_file(reader: ImageReader, path: Path, chunk_size: int = 1 << 20) -> None:
    """Write a reader's virtual disk to a sparse raw file (for images too big for memory)."""
    expected = 0
    with open(path, "wb") as f:
        f.truncate(reader.virtual_size)
        async for ext in reader.extents(chunk_size):
            assert ext.offset == expected
            if ext.data is not None:
                f.seek(ext.offset)
                f.write(ext.data)
            expected = ext.end
    assert expected == reader.virtual_size


def assert_identical(a: Path, b: Path) -> None:
    """Same size and same content per ``qemu-img compare``. (Not ``-s``: strict mode also
    compares allocation, and a hole versus written zeros is the same disk.)"""
    assert a.stat().st_size == b.stat().st_size, f"{a} and {b} differ in size"
    proc = qemu_img("compare", "-f", "raw", "-F", "raw", a, b, check=False)
    assert proc.returncode == 0, f"{a} and {b} differ: {proc.stdout}{proc.stderr}"


class RecordingSource(FileSource):
    """A FileSource that records the file ranges it reads."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[tuple[int, int]] = []

    def read_at_sync(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read_at_sync(offset, length)

    def assert_read_only(self, ranges: list[tuple[int, int]]) -> None:
        """Every recorded read lies inside one of ``ranges`` (the file's data)."""
        assert self.reads, "no data was read at all"
        for off, n in self.reads:
            assert any(s <= off and off + n <= s + ln for s, ln in ranges), (off, n, ranges)
