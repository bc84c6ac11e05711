"""Byte sources and sinks over local files, pipes and memory.

File I/O runs in worker threads (``asyncio.to_thread``) with positional reads and
writes (``os.pread``/``os.pwrite``), so concurrent readers never share a file offset
and the event loop never blocks on a disk.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

from app.formats.base import FormatError


class FileSource:
    """A :class:`~app.formats.base.RandomAccessSource` over a regular file or block device."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise FormatError(f"cannot open {self.path}: {exc.strerror}") from exc
        st = os.fstat(self._fd)
        self._is_block = stat.S_ISBLK(st.st_mode)
        self._size = (
            os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size
        )

    @property
    def size(self) -> int:
        return self._size

    def read_at_sync(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        return os.pread(self._fd, min(length, self._size - offset), offset)

    async def read_at(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.read_at_sync, offset, length)

    def data_ranges_sync(self) -> list[tuple[int, int]] | None:
        if self._is_block:
            return None
        ranges: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < self._size:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no more data after pos
                        break
                    raise
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
                ranges.append((start, min(end, self._size) - start))
                pos = end
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        return ranges

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        return await asyncio.to_thread(self.data_ranges_sync)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BytesSource:
    """An in-memory :class:`~app.formats.base.RandomAccessSource` (tests, small headers)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    async def read_at(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + max(length, 0)]

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        return None

    async def close(self) -> None:
        return None


class StreamSource:
    """A :class:`~app.formats.base.SequentialSource` over an ``asyncio.StreamReader``."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader

    async def read(self, n: int) -> bytes:
        return await self._reader.read(n)

    async def close(self) -> None:
        return None


class SequentialFileSource:
    """A :class:`~app.formats.base.SequentialSource` reading a file front to back."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._src = FileSource(path)
        self._pos = 0

    async def read(self, n: int) -> bytes:
        data = await self._src.read_at(self._pos, n)
        self._pos += len(data)
        return data

    async def close(self) -> None:
        await self._src.close()


class FileSink:
    """A :class:`~app.formats.base.SeekableSink` (and sequential sink) over a file.

    ``write`` appends at an internal position, so the same object serves writers that
    stream and writers that seek.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise FormatError(f"cannot open {self.path} for writing: {exc.strerror}") from exc
        self._pos = 0
        self.is_block_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)

    def _pwrite_all(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    async def write_at(self, offset: int, data: bytes | memoryview) -> None:
        await asyncio.to_thread(self._pwrite_all, offset, data)

    async def write(self, data: bytes | memoryview) -> None:
        await self.write_at(self._pos, data)
        self._pos += len(data)

    async def truncate(self, size: int) -> None:
        if not self.is_block_device:
            await asyncio.to_thread(os.ftruncate, self._fd, size)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fsync, self._fd)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BytesSink:
    """An in-memory sink (tests): supports both sequential and positional writes."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._pos = 0

    async def write_at(self, offset: int, data: bytes | memoryview) -> None:
        end = offset + len(data)
        if end > len(self.buffer):
            self.buffer.extend(b"\0" * (end - len(self.buffer)))
        self.buffer[offset:end] = data

    async def write(self, data: bytes | memoryview) -> None:
        await self.write_at(self._pos, data)
        self._pos += len(data)

    async def truncate(self, size: int) -> None:
        if size < len(self.buffer):
            del self.buffer[size:]
        else:
            self.buffer.extend(b"\0" * (size - len(self.buffer)))

    async def flush(self) -> None:
        return None

    async def close(self) -> None:
        return None
