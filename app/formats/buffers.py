"""Byte-buffer helpers every format module and the pipeline share: shared zero bytes,
zero detection at memcmp speed without copies, and write-behind for positional writes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable

Buffer = bytes | bytearray | memoryview

#: Zero bytes for comparisons and padding, sized for the largest piece compared at once.
_ZERO_LEN = 4 * 1024 * 1024
_ZEROS = bytes(_ZERO_LEN)
_ZEROS_VIEW = memoryview(_ZEROS)


def zeros(n: int) -> memoryview:
    """A read-only view of ``n`` zero bytes (shared up to 4 MiB; larger sizes allocate)."""
    if n <= _ZERO_LEN:
        return _ZEROS_VIEW[:n]
    return memoryview(bytes(n))


def is_zero(buf: Buffer, start: int = 0, end: int | None = None) -> bool:
    """True when ``buf[start:end]`` is all zero bytes.

    Ordinary data is rejected by looking at three bytes; the rest is a memcmp against
    shared zeros (``bytes.startswith`` takes any buffer), with no copy of ``buf``.
    """
    if end is None:
        end = len(buf)
    if end <= start:
        return True
    if buf[start] or buf[end - 1] or buf[(start + end) >> 1]:
        return False
    view = memoryview(buf)
    return all(
        _ZEROS.startswith(view[pos : min(pos + _ZERO_LEN, end)])
        for pos in range(start, end, _ZERO_LEN)
    )


def first_bytes_nonzero(data: Buffer, offset: int, granule: int) -> bool:
    """True when the first byte of every ``granule`` block of ``data`` (virtual bytes at
    ``offset``, blocks aligned on the disk) is non-zero, so no block can be all zeros.
    One strided copy of a byte per block: ordinary data costs no loop in Python."""
    if not data or not data[0]:
        return False
    first = granule - offset % granule
    return first >= len(data) or 0 not in memoryview(data)[first::granule].tobytes()


class WriteBehind:
    """Up to ``depth`` positional writes in flight, so the next piece is read or
    computed while the last ones are written. The writes target disjoint ranges, so
    their completion order does not matter; a failed write is raised by the next
    :meth:`submit` or by :meth:`drain`, which then cancels the others."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self._tasks: deque[asyncio.Future[None]] = deque()

    async def submit(self, write: Awaitable[None]) -> None:
        """Keep ``write`` (a coroutine, or a future of a write already queued) in
        flight; waits while ``depth`` writes are."""
        try:
            while self._tasks and (len(self._tasks) >= self.depth or self._tasks[0].done()):
                await self._tasks.popleft()
        except BaseException:
            if inspect.iscoroutine(write):
                write.close()
            elif isinstance(write, asyncio.Future):
                write.cancel()
            raise
        self._tasks.append(asyncio.ensure_future(write))

    async def drain(self) -> None:
        try:
            while self._tasks:
                await self._tasks.popleft()
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        tasks = list(self._tasks)
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
