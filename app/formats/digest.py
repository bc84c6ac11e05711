"""The product-wide disk digest, ``vmd1``.

A digest names the *content of a virtual disk*, independent of the container format
that holds it, of how the disk is split into extents, and of which regions happen to
be sparse. The exact definition is in ``docs/digest.md``; in short::

    B      = 1 MiB                                  (block size of version vmd1)
    N      = virtual size in bytes
    blk_k  = disk[k*B : min((k+1)*B, N)]            k = 0 .. ceil(N/B) - 1
    h_k    = SHA-256(blk_k)                         (the last block may be short)
    digest = SHA-256(u64_be(N) || h_0 || h_1 || ... )
    text   = "vmd1:" + lowercase hex of digest

Every full block of zeros has the same hash (:data:`ZERO_BLOCK_HASH`), so sparse
regions cost one 32-byte update of the outer hash per MiB and no hashing at all.

This module uses only the Python standard library and imports nothing from the rest
of the application, so the file can be shipped as-is to a remote host and run with
``python3 digest.py /dev/vg/snap`` to digest a block device or raw file there.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import sys
from collections import deque
from collections.abc import AsyncIterable, Callable, Sequence
from concurrent.futures import Executor
from typing import Protocol

#: Version tag, also the prefix of the printed digest.
VERSION = "vmd1"
#: Block size of version ``vmd1`` (fixed: changing it changes every digest).
BLOCK_SIZE = 1024 * 1024
_ZERO_BLOCK = bytes(BLOCK_SIZE)
#: SHA-256 of one full block of zeros (precomputed at import, about a millisecond).
ZERO_BLOCK_HASH = hashlib.sha256(_ZERO_BLOCK).digest()
#: How many zero-block hashes are fed to the outer hash per update call.
_ZERO_BATCH = 4096
_ZERO_BATCH_BYTES = ZERO_BLOCK_HASH * _ZERO_BATCH
#: Read size of the standalone file digest: whole blocks, several at a time.
_FILE_READ = 8 * BLOCK_SIZE

Buffer = bytes | bytearray | memoryview


class DigestError(ValueError):
    """Data fed out of order, past the virtual size, or a digest read too early."""


def _block_hash(block: Buffer) -> bytes:
    """SHA-256 of one block, skipping the hash when the block is a full block of zeros.

    ``bytes.startswith`` compares buffers with memcmp, so the zero test costs a few
    percent of a hash and stops at the first non-zero byte.
    """
    if len(block) == BLOCK_SIZE and _ZERO_BLOCK.startswith(block):
        return ZERO_BLOCK_HASH
    return hashlib.sha256(block).digest()


def block_hashes(data: Buffer) -> bytes:
    """The hashes of the whole blocks that make up ``data`` (a multiple of
    :data:`BLOCK_SIZE` bytes), concatenated as the outer hash takes them.

    A pure function, safe in any thread: blocks do not depend on each other, so the
    blocks of a disk can be hashed in parallel and fed in order with
    :meth:`DiskDigest.update_hashed`.
    """
    view = memoryview(data).cast("B")
    if len(view) % BLOCK_SIZE:
        raise DigestError(f"{len(view)} bytes are not whole {BLOCK_SIZE}-byte blocks")
    return b"".join([_block_hash(view[i : i + BLOCK_SIZE])
                     for i in range(0, len(view), BLOCK_SIZE)])


def _check_extent(offset: int, length: int, data: Buffer | None) -> None:
    if data is not None and len(data) != length:
        raise DigestError(f"extent at {offset}: {len(data)} bytes, length says {length}")


class DiskDigest:
    """Incremental ``vmd1`` digest of a disk fed front to back in pieces of any size.

    Feed the whole virtual disk in order with :meth:`update` (bytes) and
    :meth:`update_zeros` (zero runs); pieces need not be block-aligned: a partial
    block is buffered until it completes. :meth:`hexdigest` needs every byte of
    ``[0, virtual_size)`` to have been fed. Not thread-safe: feed from one thread at a
    time (successive calls from different threads are fine).
    """

    __slots__ = ("_buf", "_outer", "_pos", "virtual_size")

    def __init__(self, virtual_size: int) -> None:
        if virtual_size < 0 or virtual_size >= 1 << 64:
            raise DigestError(f"virtual size {virtual_size} out of range")
        self.virtual_size = virtual_size
        self._outer = hashlib.sha256(virtual_size.to_bytes(8, "big"))
        self._pos = 0
        #: Bytes of the current, incomplete block (which starts at pos - len(buf)).
        self._buf = bytearray()

    @property
    def position(self) -> int:
        """Offset of the next byte expected."""
        return self._pos

    def _check(self, offset: int | None, length: int) -> None:
        if offset is not None and offset != self._pos:
            raise DigestError(f"digest fed offset {offset}, expected {self._pos}")
        if self._pos + length > self.virtual_size:
            raise DigestError(
                f"digest fed {length} bytes at {self._pos}, past virtual size {self.virtual_size}"
            )

    def update(self, data: Buffer, offset: int | None = None) -> None:
        """Feed the next ``len(data)`` bytes (``offset``, if given, must be the position)."""
        view = memoryview(data).cast("B")
        n = len(view)
        self._check(offset, n)
        if self._buf:
            take = min(BLOCK_SIZE - len(self._buf), n)
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == BLOCK_SIZE:
                self._outer.update(_block_hash(self._buf))
                self._buf.clear()
        whole = len(view) - len(view) % BLOCK_SIZE
        if whole:
            self._outer.update(block_hashes(view[:whole]))
        if whole < len(view):
            self._buf += view[whole:]
        self._pos += n

    def update_hashed(self, hashes: bytes, offset: int | None = None) -> None:
        """Feed the next whole blocks by their hashes (:func:`block_hashes` of their
        bytes). The position must be at a block boundary."""
        count, rest = divmod(len(hashes), len(ZERO_BLOCK_HASH))
        if rest:
            raise DigestError(f"{len(hashes)} bytes are not whole block hashes")
        if self._buf:
            raise DigestError(f"block hashes fed at offset {self._pos}, inside a block")
        self._check(offset, count * BLOCK_SIZE)
        self._outer.update(hashes)
        self._pos += count * BLOCK_SIZE

    def update_zeros(self, length: int, offset: int | None = None) -> None:
        """Feed a run of ``length`` zero bytes without materialising it."""
        if length < 0:
            raise DigestError(f"negative zero run {length}")
        self._check(offset, length)
        self._pos += length
        if self._buf:
            take = min(BLOCK_SIZE - len(self._buf), length)
            self._buf += _ZERO_BLOCK[:take]
            length -= take
            if len(self._buf) == BLOCK_SIZE:
                self._outer.update(_block_hash(self._buf))
                self._buf.clear()
        blocks, rest = divmod(length, BLOCK_SIZE)
        while blocks >= _ZERO_BATCH:
            self._outer.update(_ZERO_BATCH_BYTES)
            blocks -= _ZERO_BATCH
        if blocks:
            self._outer.update(ZERO_BLOCK_HASH * blocks)
        if rest:
            self._buf += _ZERO_BLOCK[:rest]

    def feed(self, offset: int, length: int, data: Buffer | None) -> None:
        """Feed one extent: ``data`` is None for a zero run of ``length`` bytes."""
        _check_extent(offset, length, data)
        if data is None:
            self.update_zeros(length, offset)
        else:
            self.update(data, offset)

    def digest(self) -> bytes:
        """The raw 32-byte digest; the whole disk must have been fed."""
        if self._pos != self.virtual_size:
            raise DigestError(
                f"digest read at offset {self._pos} of a {self.virtual_size}-byte disk"
            )
        outer = self._outer.copy()
        if self._buf:  # the last, short block
            outer.update(hashlib.sha256(self._buf).digest())
        return outer.digest()

    def hexdigest(self) -> str:
        """The printed form, ``vmd1:<64 hex digits>``."""
        return f"{VERSION}:{self.digest().hex()}"


def digest_bytes(data: Buffer) -> str:
    """``vmd1`` digest of a disk held in memory (tests, small images)."""
    d = DiskDigest(len(data))
    d.update(data)
    return d.hexdigest()


def parse_digest(text: str) -> bytes:
    """Check a printed digest and return its 32 raw bytes."""
    version, sep, hexpart = text.partition(":")
    if not sep or version != VERSION:
        raise DigestError(f"not a {VERSION} digest: {text!r}")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise DigestError(f"not a {VERSION} digest: {text!r}") from None
    if len(raw) != 32:
        raise DigestError(f"not a {VERSION} digest: {text!r}")
    return raw


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]] | None:
    """``(start, end)`` ranges that may hold data (SEEK_DATA/SEEK_HOLE), None if unknown."""
    if not hasattr(os, "SEEK_DATA"):
        return None
    ranges: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            ranges.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            return None
        raise
    return ranges


def digest_file(
    path: str | os.PathLike[str],
    *,
    size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """``vmd1`` digest of a raw disk in a regular file or block device (synchronous).

    Holes found with SEEK_DATA/SEEK_HOLE are not read; devices and file systems that
    do not report holes are read in full, and their zero blocks are recognised with a
    memcmp instead of a hash. ``size`` limits the disk to its first ``size`` bytes
    (default: the whole file or device). ``progress(done, total)`` is called after
    each read.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        total = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
        if size is not None:
            if size > total:
                raise DigestError(f"{path} holds {total} bytes, fewer than {size}")
            total = size
        ranges = None if stat.S_ISBLK(st.st_mode) else _data_ranges(fd, total)
        if ranges is None:
            ranges = [(0, total)]
        d = DiskDigest(total)
        for start, end in ranges:
            if start > d.position:
                d.update_zeros(start - d.position)
            pos = start
            while pos < end:
                # Read up to the next multiple of the read size, so reads stay aligned.
                n = min(end, (pos // _FILE_READ + 1) * _FILE_READ) - pos
                data = os.pread(fd, n, pos)
                if not data:
                    raise DigestError(f"{path}: unexpected end of data at {pos}")
                d.update(data)
                pos += len(data)
                if progress is not None:
                    progress(pos, total)
        if d.position < total:
            d.update_zeros(total - d.position)
        return d.hexdigest()
    finally:
        os.close(fd)


class ExtentLike(Protocol):
    """What :func:`digest_extents` needs of an extent (``app.formats.base.Extent`` fits)."""

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def data(self) -> bytes | memoryview | None: ...


#: Zero runs up to this size are fed on the event loop (a 64 GiB run is 64k block
#: hashes fed in batches: about a millisecond); larger ones go to the executor.
_INLINE_ZEROS = 64 * 1024 * BLOCK_SIZE


class ParallelDigest:
    """A :class:`DiskDigest` fed from an event loop, with the hashing in ``executor``
    (default: the loop's default executor).

    The block hashes do not depend on each other; only the outer hash needs them in
    order. So the whole blocks of a data extent that starts on a block boundary are
    hashed (:func:`block_hashes`) as soon as :meth:`feed` gets it, up to ``depth``
    extents ahead (default: one more than there are cores), and fed in disk order as
    they finish: with ``depth`` at least the executor's threads, hashing uses all of
    them. Other data extents are fed in the executor in their turn (their bytes may
    complete a block begun before), zero runs on the loop (no hashing). Held data: at
    most ``depth`` extents.
    """

    def __init__(
        self, virtual_size: int, executor: Executor | None = None, depth: int | None = None
    ) -> None:
        if depth is not None and depth < 1:
            raise ValueError("depth must be at least 1")
        self._digest = DiskDigest(virtual_size)
        self._executor = executor
        self._depth = depth or (os.cpu_count() or 1) + 1
        #: Extents taken but not fed yet, in order, each with its hashing started ahead.
        self._pending: deque[tuple[ExtentLike, asyncio.Future[bytes] | None]] = deque()

    async def feed(self, extent: ExtentLike) -> None:
        """Take the next extent; returns once at most ``depth`` extents are held."""
        _check_extent(extent.offset, extent.length, extent.data)
        ahead: asyncio.Future[bytes] | None = None
        if extent.data is not None and extent.offset % BLOCK_SIZE == 0:
            whole = extent.length - extent.length % BLOCK_SIZE
            if whole:
                ahead = asyncio.get_running_loop().run_in_executor(
                    self._executor, block_hashes, memoryview(extent.data)[:whole]
                )
        self._pending.append((extent, ahead))
        while self._pending and (
            len(self._pending) > self._depth
            or self._pending[0][1] is None
            or self._pending[0][1].done()
        ):
            await self._feed_first()

    async def _feed_first(self) -> None:
        extent, ahead = self._pending[0]
        d = self._digest
        if ahead is not None:
            assert extent.data is not None
            hashes = await ahead
            d.update_hashed(hashes, extent.offset)
            whole = len(hashes) // len(ZERO_BLOCK_HASH) * BLOCK_SIZE
            if whole < extent.length:  # the tail starts a block: kept, not hashed yet
                d.update(memoryview(extent.data)[whole:])
        elif extent.data is None and extent.length <= _INLINE_ZEROS:
            d.update_zeros(extent.length, extent.offset)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                self._executor, d.feed, extent.offset, extent.length, extent.data
            )
        self._pending.popleft()

    async def hexdigest(self) -> str:
        """Feed what is held, then the printed digest (the whole disk must be fed)."""
        while self._pending:
            await self._feed_first()
        return self._digest.hexdigest()

    def cancel(self) -> None:
        """Drop what is held (after a failure): a hash already running finishes in its
        thread; its result is not used."""
        for _, ahead in self._pending:
            if ahead is not None:
                ahead.cancel()
        self._pending.clear()


async def digest_extents(
    extents: AsyncIterable[ExtentLike],
    virtual_size: int,
    *,
    executor: Executor | None = None,
    depth: int | None = None,
) -> str:
    """``vmd1`` digest of an async stream of extents covering ``[0, virtual_size)``.

    Data is hashed in ``executor`` (default: the loop's default executor), up to
    ``depth`` extents at once (default: one more than there are cores;
    :class:`ParallelDigest`), so the event loop stays responsive; hashlib releases the
    GIL for large buffers.
    """
    digest = ParallelDigest(virtual_size, executor, depth)
    try:
        async for ext in extents:
            await digest.feed(ext)
        return await digest.hexdigest()
    finally:
        digest.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 digest.py PATH [SIZE]``: print the ``vmd1`` digest of a raw disk."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (1, 2):
        print("usage: digest.py PATH [SIZE]", file=sys.stderr)
        return 2
    try:
        print(digest_file(args[0], size=int(args[1]) if len(args) == 2 else None))
    except (OSError, ValueError) as exc:
        print(f"digest: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
