"""Byte sources and sinks over local files, pipes and memory.

File I/O runs in worker threads (a :class:`Lane` per file) with positional reads and
writes (``os.pread``/``os.pwrite``), so concurrent readers never share a file offset
and the event loop never blocks on a disk.

Disk data is read in chunks (1 MiB by default) into new buffers, not mapped: the
writer's copy into the output then reads from a buffer that was just written and still
sits in the CPU cache. Measured on the 4 GiB benchmark (2 GiB of data, 2 vCPUs): 1 MiB
``pread`` buffers gave a steady 0.77-0.86 s for raw -> vhd fixed, where 4 MiB read-only
mappings of the input's page cache (one copy fewer) took 0.8-1.9 s, and 4 MiB ``pread``
buffers 1.2-1.6 s. A mapping would also turn an input truncated under us into
``SIGBUS``; a read only comes back short.

A large write to a regular file first allocates its range (``fallocate``): ext4
otherwise reserves and maps each 4 KiB block of a delayed allocation as the write
copies it. In a bare read/write loop over the benchmark's 2 GiB of data that took the
writes from 0.49 s to 0.34-0.40 s. Only the ranges written are allocated, so holes stay
holes; a file system without ``fallocate`` just gets the writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import stat
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.formats.base import FormatError

#: Writes at least this large allocate their range before they copy (see above).
PREALLOCATE_MIN = 64 * 1024


def _load_fallocate() -> Callable[[int, int, int, int], None] | None:
    """glibc's ``fallocate(2)`` wrapper. (``os.posix_fallocate`` would write zeros on a
    file system without it, which is worse than not allocating at all.)"""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int

    def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
        if fn(fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return fallocate


_fallocate = _load_fallocate()

_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


class _Results:
    """What a :class:`Lane`'s thread shares with the loops that call it: finished calls,
    handed over in batches. (The thread holds this, not the lane, so a lane nobody
    stopped can still be collected; its finaliser ends the thread.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}

    def add(self, outcome: _Outcome) -> None:
        """In the thread: queue the outcome; wake its loop unless a wake-up is pending."""
        loop = outcome[0].get_loop()
        with self._lock:
            pending = self._done.setdefault(loop, [])
            pending.append(outcome)
            if len(pending) > 1:
                return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(self._deliver, loop)

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            done = self._done.pop(loop, [])
        for fut, result, exc in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)


_Call = tuple["asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


def _lane_worker(calls: queue.SimpleQueue[_Call | None], results: _Results) -> None:
    while (item := calls.get()) is not None:
        fut, fn, args = item
        del item
        if fut.cancelled():
            continue
        try:
            results.add((fut, fn(*args), None))
        except BaseException as exc:  # for whoever awaits the future
            results.add((fut, None, exc))
        del fut, fn, args


class Lane:
    """One worker thread that runs calls in the order they were made and hands their
    results back to the event loop in batches.

    ``run_in_executor`` costs a ``concurrent.futures.Future``, a work item, a chained
    asyncio future and a wake-up of the loop (a byte through its self-pipe) for every
    call, and a conversion makes two calls per MiB. Here a call is a queue entry and a
    loop future, and the thread wakes the loop once for all the calls that finished
    while the loop was busy. A call whose future was cancelled before it started is
    skipped. The thread starts on the first call and ends on :meth:`stop`, or when
    the lane is garbage-collected.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` now; returns its future (of the running loop)."""
        fut = asyncio.get_running_loop().create_future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=_lane_worker, args=(self._calls, _Results()), name=self._name
            )
            self._thread.daemon = True
            self._thread.start()
            weakref.finalize(self, self._calls.put, None)
        self._calls.put((fut, fn, args))
        return fut

    async def stop(self) -> None:
        """Let the calls already queued finish, then end the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._calls.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None  # a later call starts a new thread


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
        self._lane = Lane("file-source")

    @property
    def size(self) -> int:
        return self._size

    def read_at_sync(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        return os.pread(self._fd, min(length, self._size - offset), offset)

    def read_at(self, offset: int, length: int) -> asyncio.Future[bytes]:
        """:meth:`read_at_sync` in the source's thread; returns its future (no task)."""
        return self._lane.call(self.read_at_sync, offset, length)

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
        ranges: list[tuple[int, int]] | None = await self._lane.call(self.data_ranges_sync)
        return ranges

    async def close(self) -> None:
        await self._lane.stop()  # reads in flight finish before the descriptor goes
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
        mode = os.fstat(self._fd).st_mode
        self.is_block_device = stat.S_ISBLK(mode)
        self._preallocate = stat.S_ISREG(mode) and _fallocate is not None
        self._lane = Lane("file-sink")

    def _call(self, fn: Callable[..., object], *args: object) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` in the sink's thread now; the future says when it ran."""
        return self._lane.call(fn, *args)

    def _pwrite_all(self, offset: int, data: bytes | memoryview) -> None:
        if self._preallocate and len(data) >= PREALLOCATE_MIN:
            self._allocate(offset, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def _allocate(self, offset: int, length: int) -> None:
        assert _fallocate is not None
        try:
            _fallocate(self._fd, 0, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise  # ENOSPC, EIO, EFBIG: the write would fail the same way
            self._preallocate = False

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
        await self._lane.stop()
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
