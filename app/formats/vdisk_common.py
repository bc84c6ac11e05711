"""Helpers shared by the VMDK, VHD and VHDX modules.

- :class:`ExtentBuilder` turns an in-order sequence of data pieces and zero runs into
  :class:`~app.formats.base.Extent` values that honour the reader contract (data
  extents at most ``chunk_size`` bytes, adjacent zero runs merged, all-zero data
  pieces turned into zero runs).
- :class:`StreamReader` reads exact byte counts from a sequential source and keeps the
  position for error messages.
- :func:`read_exact_at` reads from a random-access source and turns a short read into
  a :class:`~app.formats.base.FormatError`.
- :class:`HostHoles` says which parts of a range of the image file are holes (read as
  zeros without being stored), so block readers do not read them.
- :func:`crc32c` is a small table-driven CRC-32C (Castagnoli), as VHDX needs it.
- :func:`compute_pool` is the process-wide thread pool for CPU-bound work
  (compression, decompression) that releases the GIL.
- :func:`deflate` / :func:`inflate_bounded` wrap isal (when it produces valid zlib
  streams) or the standard zlib module.
"""

from __future__ import annotations

import bisect
import os
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from app.formats.base import (
    Extent,
    FormatError,
    RandomAccessSource,
    SequentialSource,
    immutable,
)
from app.formats.buffers import is_zero


class ExtentBuilder:
    """Collects in-order pieces of a virtual disk and emits contract-abiding extents.

    Call :meth:`zero` and :meth:`data` with consecutive offsets; each returns the
    extents that became complete. :meth:`finish` returns the rest.

    Data is not copied when it need not be: a piece of at least ``chunk_size / 4``
    bytes goes out as views of itself (cut at ``chunk_size``), so a large read from a
    file stays a view of the page cache all the way to the writer. Smaller pieces
    (grains, sector runs of a bitmap) are gathered and joined into one extent of up
    to ``chunk_size`` bytes, so the pipeline does not pay per tiny piece. Pieces must
    not change after they were given (writable buffers are copied).
    """

    def __init__(self, chunk_size: int, *, detect_zeros: bool = True) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.chunk_size = chunk_size
        self.detect_zeros = detect_zeros
        self.pos = 0
        self._zero_start = 0
        self._zero_len = 0
        self._parts: list[bytes | memoryview] = []
        self._parts_len = 0
        self._parts_start = 0

    def _flush_zero(self, out: list[Extent]) -> None:
        if self._zero_len:
            out.append(Extent(self._zero_start, self._zero_len))
            self._zero_len = 0

    def _flush_data(self, out: list[Extent]) -> None:
        if self._parts:
            parts = self._parts
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            out.append(Extent(self._parts_start, self._parts_len, data))
            self._parts = []
            self._parts_len = 0

    def zero(self, offset: int, length: int) -> list[Extent]:
        """A run of zeros at ``offset`` (must equal the current position)."""
        if offset != self.pos:
            raise AssertionError(f"extent builder: zero run at {offset}, expected {self.pos}")
        out: list[Extent] = []
        if length <= 0:
            return out
        self._flush_data(out)
        if not self._zero_len:
            self._zero_start = offset
        self._zero_len += length
        self.pos += length
        return out

    def data(self, offset: int, data: bytes | bytearray | memoryview) -> list[Extent]:
        """Bytes at ``offset`` (must equal the current position)."""
        if offset != self.pos:
            raise AssertionError(f"extent builder: data at {offset}, expected {self.pos}")
        n = len(data)
        if n == 0:
            return []
        if self.detect_zeros and is_zero(data):
            return self.zero(offset, n)
        out: list[Extent] = []
        self._flush_zero(out)
        piece = immutable(data)
        cs = self.chunk_size
        self.pos += n
        if n >= cs // 4:  # large: out as views of itself
            self._flush_data(out)
            if n <= cs:
                out.append(Extent(offset, n, piece))
                return out
            view = memoryview(piece)
            for pos in range(0, n, cs):
                length = min(cs, n - pos)
                out.append(Extent(offset + pos, length, view[pos : pos + length]))
            return out
        if self._parts_len + n > cs:
            self._flush_data(out)
        if not self._parts:
            self._parts_start = offset
        self._parts.append(piece)
        self._parts_len += n
        if self._parts_len == cs:
            self._flush_data(out)
        return out

    def finish(self) -> list[Extent]:
        out: list[Extent] = []
        self._flush_data(out)
        self._flush_zero(out)
        return out


#: Holes in an image file shorter than this are read like data: skipping them would cut
#: reads into small pieces for little gain.
MIN_HOLE = 64 * 1024


class HostHoles:
    """The holes of an image file, from its source's
    :meth:`~app.formats.base.RandomAccessSource.data_ranges` (SEEK_DATA/SEEK_HOLE).

    A block format stores a block's data somewhere in the file, and the file system
    may not have stored all of it: ``qemu-img`` allocates a whole VHD block but writes
    only the sectors it was given, so the rest is a hole. Reading a hole costs as much
    as reading data (the kernel fills page cache with zeros) and then every zero has to
    be compared. :meth:`split` tells the reader which parts it can emit as zero runs
    without reading them, as ``qemu-img`` does when it asks the file for block status.
    Holes shorter than ``min_hole`` count as data. Without ranges (not a regular file,
    a file system that cannot say) everything is data.
    """

    def __init__(self, ranges: list[tuple[int, int]] | None, *, min_hole: int = MIN_HOLE) -> None:
        self.known = ranges is not None
        merged: list[tuple[int, int]] = []  # (start, end) of data, gaps >= min_hole
        for off, length in sorted(ranges or ()):
            end = off + length
            if merged and off - merged[-1][1] < min_hole:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((off, end))
        self._ranges = merged
        self._starts = [s for s, _ in merged]

    def split(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``[offset, offset + length)`` as consecutive ``(offset, length, is_data)``
        runs; a run with ``is_data`` False is a hole (zeros)."""
        end = offset + length
        if not self.known:
            return [(offset, length, True)] if length > 0 else []
        out: list[tuple[int, int, bool]] = []
        pos = offset
        i = max(bisect.bisect_right(self._starts, offset) - 1, 0)
        while pos < end and i < len(self._ranges):
            start, stop = self._ranges[i]
            i += 1
            if stop <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                out.append((pos, start - pos, False))
                pos = start
            run_end = min(stop, end)
            out.append((pos, run_end - pos, True))
            pos = run_end
        if pos < end:
            out.append((pos, end - pos, False))
        return out


class StreamReader:
    """Exact reads from a :class:`SequentialSource`, tracking the stream position.

    Reads from the source in blocks of ``block_size`` and serves small reads from the
    buffer, so parsing a stream of 512-byte markers does not cost one await each.
    """

    def __init__(
        self,
        source: SequentialSource,
        fmt: str,
        *,
        block_size: int = 1024 * 1024,
        max_read: int = 64 * 1024 * 1024,
    ) -> None:
        self.source = source
        self.fmt = fmt
        self.block_size = block_size
        self.max_read = max_read
        #: Stream offset of the next byte :meth:`read_upto` returns.
        self.pos = 0
        self._buf = b""
        self._off = 0
        self._eof = False

    async def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available unless the stream ends first."""
        avail = len(self._buf) - self._off
        if avail >= need or self._eof:
            return
        parts = [self._buf[self._off :]] if avail else []
        want = max(need, self.block_size)
        while avail < need:
            piece = await self.source.read(want - avail)
            if not piece:
                self._eof = True
                break
            parts.append(piece)
            avail += len(piece)
        self._buf = parts[0] if len(parts) == 1 else b"".join(parts)
        self._off = 0

    async def read_upto(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at end of stream."""
        if n > self.max_read:
            raise FormatError(f"refusing to read {n} bytes at once", fmt=self.fmt, offset=self.pos)
        if n <= 0:
            return b""
        await self._fill(n)
        end = min(self._off + n, len(self._buf))
        if self._off == 0 and end == len(self._buf):
            data = self._buf
            self._buf = b""
            self._off = 0
        else:
            data = self._buf[self._off : end]
            self._off = end
        self.pos += len(data)
        return data

    async def read_exact(self, n: int, what: str) -> bytes:
        start = self.pos
        data = await self.read_upto(n)
        if len(data) != n:
            raise FormatError(f"truncated {what}: stream ended", fmt=self.fmt, offset=start)
        return data

    async def at_eof(self) -> bool:
        """True when no byte is left in the stream."""
        await self._fill(1)
        return self._off >= len(self._buf)

    async def skip(self, n: int, what: str) -> None:
        """Consume ``n`` bytes in bounded pieces."""
        while n > 0:
            step = min(n, self.block_size)
            await self.read_exact(step, what)
            n -= step


class BlockedWriter:
    """The block bookkeeping VHD dynamic and VHDX writers share: extents are split at
    block boundaries and either written in place (seekable sink) or gathered into the
    current block's buffer, which is flushed whole when complete (layout-first stream).
    Subclasses provide ``_seek_piece`` and ``_flush_block`` and set ``_bs``.
    """

    _bs: int
    _cur: int = -1
    _buf: bytearray | None = None

    async def _seek_piece(self, block: int, in_off: int, piece: memoryview) -> None:
        raise NotImplementedError

    async def _flush_block(self) -> None:
        raise NotImplementedError

    async def _write_blocks(self, offset: int, data: bytes | bytearray | memoryview,
                            streaming: bool) -> None:
        bs = self._bs
        # Writes may still be in flight after we return: never keep a view of a buffer
        # the reader could reuse.
        view = memoryview(immutable(data))
        pos = offset
        i = 0
        while i < len(view):
            b, in_off = divmod(pos, bs)
            n = min(bs - in_off, len(view) - i)
            if not streaming:
                await self._seek_piece(b, in_off, view[i : i + n])
            else:
                if b != self._cur:
                    await self._flush_block()
                    self._cur = b
                    self._buf = bytearray(bs)
                assert self._buf is not None
                self._buf[in_off : in_off + n] = view[i : i + n]
                if in_off + n == bs:
                    await self._flush_block()
            pos += n
            i += n


async def read_exact_at(
    source: RandomAccessSource, offset: int, length: int, fmt: str, what: str
) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` or raise a :class:`FormatError`."""
    if offset < 0 or length < 0:
        raise FormatError(f"{what} has a negative position or length", fmt=fmt, offset=offset)
    if offset + length > source.size:
        raise FormatError(
            f"{what} ({length} bytes) extends past the end of the file ({source.size} bytes)",
            fmt=fmt,
            offset=offset,
        )
    parts: list[bytes] = []
    got = 0
    while got < length:
        piece = await source.read_at(offset + got, length - got)
        if not piece:
            raise FormatError(f"truncated {what}", fmt=fmt, offset=offset + got)
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


# --- CRC-32C (Castagnoli), reflected polynomial 0x82F63B78 -------------------------


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _gf2_times(mat: list[int], vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, row) for row in mat]


_zero_ops: list[list[int]] = []


def _zero_operators() -> list[list[int]]:
    """``ops[k]`` advances a CRC-32C register over ``2**k`` zero bytes (k < 40)."""
    if not _zero_ops:
        op = [0x82F63B78] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
        for _ in range(3):
            op = _gf2_square(op)  # 2, 4, 8 zero bits: one zero byte
        ops = [op]
        for _ in range(39):
            ops.append(_gf2_square(ops[-1]))
        _zero_ops.extend(ops)
    return _zero_ops


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``crc``), as used by VHDX and iSCSI.

    Table-driven over the bytes up to the last non-zero one; a run of trailing zeros
    (VHDX headers and region tables are mostly zeros) is skipped with precomputed GF(2)
    operators, so a 64 KiB table costs about as much as its used part.
    """
    raw = bytes(data)
    body = raw.rstrip(b"\0")
    zero_tail = len(raw) - len(body)
    table = _CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for b in body:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    if zero_tail:
        ops = _zero_operators()
        k = 0
        while zero_tail:
            if zero_tail & 1:
                crc = _gf2_times(ops[k], crc)
            zero_tail >>= 1
            k += 1
    return crc ^ 0xFFFFFFFF


# --- Compression ---------------------------------------------------------------------

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def compute_pool() -> ThreadPoolExecutor:
    """The shared pool (``os.cpu_count()`` workers) for compression and decompression."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="vdisk-compute"
            )
        return _pool


def _pick_deflate() -> Callable[[bytes, int], bytes]:
    """isal's zlib-format compressor when it round-trips through stdlib zlib, else zlib."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency
        return lambda data, level: zlib.compress(data, level)

    def isal_deflate(data: bytes, level: int) -> bytes:
        # zlib levels 1-9 onto isal's 0-3: fast levels stay fast, high levels compress.
        isal_level = 1 if level <= 3 else 2 if level <= 6 else 3
        out: bytes = isal_zlib.compress(data, isal_level)
        return out

    sample = (b"vmigrate-isal-probe " * 4000) + os.urandom(4096) + bytes(8192)
    try:
        ok = zlib.decompress(isal_deflate(sample, 6)) == sample
    except Exception:  # any failure means: do not use isal  # pragma: no cover
        ok = False
    if ok:
        return isal_deflate
    return lambda data, level: zlib.compress(data, level)  # pragma: no cover


_deflate_impl: Callable[[bytes, int], bytes] | None = None


def deflate(data: bytes | memoryview, level: int = 6) -> bytes:
    """A zlib-format (RFC 1950) deflate stream of ``data``."""
    global _deflate_impl
    if _deflate_impl is None:
        _deflate_impl = _pick_deflate()
    return _deflate_impl(bytes(data), level)


def _pick_inflate() -> tuple[Callable[[], Any], tuple[type[Exception], ...]]:
    """isal's decompressobj (faster) when importable, else zlib's; plus their errors."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - isal is a dependency
        return zlib.decompressobj, (zlib.error,)
    isal_error = cast("type[Exception]", isal_zlib.error)
    return isal_zlib.decompressobj, (zlib.error, isal_error)


_inflate_obj, _inflate_errors = _pick_inflate()


def inflate_bounded(data: bytes | memoryview, limit: int, fmt: str, offset: int) -> bytes:
    """Inflate a zlib stream that must decode to at most ``limit`` bytes.

    Raises :class:`FormatError` for corrupt data, a stream that would produce more than
    ``limit`` bytes, or a stream that ends early (missing its end marker). Bytes after
    the end of the stream are ignored (producers pad).
    """
    d = _inflate_obj()
    try:
        out: bytes = d.decompress(data, limit)
        # Input left over after `limit` bytes of output: it may only be the stream's
        # trailer; anything that still produces output means the data is too big.
        for _ in range(4):
            if d.eof or not d.unconsumed_tail:
                break
            if d.decompress(d.unconsumed_tail, 1):
                raise FormatError(
                    f"compressed data inflates beyond {limit} bytes", fmt=fmt, offset=offset
                )
    except _inflate_errors as exc:
        raise FormatError(f"corrupt compressed data ({exc})", fmt=fmt, offset=offset) from exc
    if not d.eof:
        raise FormatError("compressed data is truncated or too big", fmt=fmt, offset=offset)
    return out
