"""Byte sources and sinks over local files, pipes and memory.

File I/O runs in worker threads (``asyncio.to_thread``) with positional reads and
writes (``os.pread``/``os.pwrite``), so concurrent readers never share a file offset
and the event loop never blocks on a disk.

Disk data is read in chunks (1 MiB by default) into new buffers, not mapped: the
writer's copy into the output then reads from a buffer that was just written and still
sits in the CPU cache. Measured on the 4 GiB benchmark (2 GiB of data, 2 vCPUs): 1 MiB
``pread`` buffers gave a steady 0.77-0.83 s for raw -> vhd fixed, where 4 MiB read-only
mappings of the input's page cache (one copy fewer) took 0.8-1.9 s, and 4 MiB ``pread``
buffers 1.2-1.6 s. A mapping would also turn an input truncated under us into
``SIGBUS``; a read only comes back short.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
        self._size = os.lseek(self._fd, 0, os.SEEK_END) if self._is_block else st.st_size

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

    Every operation on the file runs in one thread of the sink's own, in the order it
    was called. Writers keep several writes in flight (write-behind); running them in
    parallel would only make them queue for the file's inode lock, which Linux holds
    for each buffered write (measured on ext4: two threads writing one file spent 12 %
    of the CPU spinning on it, for no gain). In one thread they cost one core at most
    and overlap with the reads and the computing in other threads, and a ``flush``
    or ``truncate`` always comes after the writes submitted before it.
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
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="file-sink")

    def _call(self, fn: Callable[..., object], *args: object) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` in the sink's thread now; the future says when it ran."""
        return asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _pwrite_all(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def write_at(self, offset: int, data: bytes | memoryview) -> asyncio.Future[None]:
        """Queue the write at once and return its future: no coroutine and no task per
        write (a conversion makes thousands), and the order of calls is the order of
        writes even when nobody awaits them yet."""
        return self._call(self._pwrite_all, offset, data)

    async def write(self, data: bytes | memoryview) -> None:
        pos = self._pos
        self._pos += len(data)
        await self.write_at(pos, data)

    async def truncate(self, size: int) -> None:
        if not self.is_block_device:
            await self._call(os.ftruncate, self._fd, size)

    async def flush(self) -> None:
        await self._call(os.fsync, self._fd)

    async def close(self) -> None:
        # Writes still queued (not cancelled) or running finish before the descriptor
        # goes away; there are at most the write-behind depth of them.
        await asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
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
