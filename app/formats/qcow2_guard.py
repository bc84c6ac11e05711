"""Bounds on the work a qcow2 image can cause, checked while its L2 tables are walked.

A qcow2 file can claim far more than it holds: L2 entries of a 10 MiB file may all
point at one compressed cluster and claim 64 GiB, each entry costing a full inflate
and the digest of a cluster. QEMU never writes such a file, and its refcounts would
say so. :class:`AllocationGuard` refuses, with a :class:`~app.formats.base.FormatError`
and before any of the data is read, an image whose active L2 tables

- point two guest clusters at the same standard host cluster, or a standard cluster
  at one holding compressed data (QEMU never shares a cluster within one L1 table);
- claim more than ``max_compression_ratio`` times the host clusters that hold their
  compressed data (deflate itself cannot exceed about 1032:1; real disks compress
  a few times; the default 256 bounds a bomb to 256 x its file size);
- reference a host cluster whose refcount is 0 (the refcount table disagrees).

Memory: one bit per host cluster (at most :data:`MAX_BITMAP_BYTES`; beyond that the
bitmaps count groups of clusters, which keeps the ratio bound sound and gives up only
the duplicate check) plus a small cache of refcount blocks.
"""

from __future__ import annotations

import sys
from array import array
from collections import OrderedDict

from app.formats import qcow2_layout as L
from app.formats.base import FormatError, RandomAccessSource

FMT = L.FMT

#: Guest bytes allowed per byte of host clusters holding compressed data.
DEFAULT_MAX_COMPRESSION_RATIO = 256
#: Largest bitmap kept per kind of use (standard, compressed).
MAX_BITMAP_BYTES = 32 * 1024 * 1024
#: Refcount blocks kept in memory (bytes).
_REFCOUNT_CACHE_BYTES = 8 * 1024 * 1024
#: Mask of a refcount table entry's offset (bits 9-63; 0-8 are reserved).
_RT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00

ZERO, DATA, COMPRESSED = 0, 1, 2
_WIDTH_CODES = {2: "H", 4: "I", 8: "Q"}
Run = tuple[int, int, int, int, int]


def _be_array(code: str, data: bytes) -> array[int]:
    arr = array(code)
    arr.frombytes(data)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr


class _Bitmap:
    def __init__(self, nbits: int) -> None:
        self.bits = bytearray((nbits + 7) // 8)

    def test_and_set(self, i: int) -> bool:
        byte, bit = i >> 3, 1 << (i & 7)
        was = bool(self.bits[byte] & bit)
        self.bits[byte] |= bit
        return was

    def test(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))


class AllocationGuard:
    """Checks each L2 table's runs (see the module docstring); ``await check(...)``."""

    def __init__(self, source: RandomAccessSource, header: L.Header, file_size: int,
                 refcount_table: bytes, *,
                 max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO) -> None:
        self._source = source
        self._cs = header.cluster_size
        self._cbits = header.cluster_bits
        self._file_size = file_size
        self._ratio = max_compression_ratio
        clusters = L.div_round_up(file_size, self._cs) + 1
        # Group clusters when one bit each would take too much memory.
        self._shift = 0
        while (clusters >> self._shift) > MAX_BITMAP_BYTES * 8:
            self._shift += 1
        nbits = (clusters >> self._shift) + 1
        self._standard = _Bitmap(nbits)
        self._compressed = _Bitmap(nbits)
        self._compressed_units = 0
        self._compressed_guest = 0
        # The host and guest cluster of the last standard run: the subclusters of one
        # extended L2 entry come as several runs in one host cluster.
        self._last = (-1, -1)
        self._refcount_bits = 1 << header.refcount_order
        self._per_block = self._cs * 8 // self._refcount_bits
        self._rt = _be_array("Q", refcount_table)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._block_cap = max(4, _REFCOUNT_CACHE_BYTES // self._cs)

    @property
    def compressed_guest_bytes(self) -> int:
        return self._compressed_guest

    async def check(self, runs: list[Run], table_off: int) -> None:
        cs, shift = self._cs, self._shift
        unit = cs << shift
        touched: list[tuple[int, int]] = []
        for guest, length, kind, host, clen in runs:
            if kind == ZERO:
                continue
            if kind == DATA:
                first, end = host // cs, L.div_round_up(host + length, cs)
                if self._last == (first, guest // cs):
                    first += 1  # another subcluster of the entry just seen
                self._last = (end - 1, (guest + length - 1) // cs)
                for c in range(first, end):
                    g = c >> shift
                    if self._compressed.test(g) and not shift:
                        raise self._shared(guest, c, "compressed data", table_off)
                    if self._standard.test_and_set(g) and not shift:
                        raise self._shared(guest, c, "another guest cluster", table_off)
                if first < end:
                    touched.append((first, end))
                continue
            self._compressed_guest += length
            first, end = host // cs, L.div_round_up(host + clen, cs)
            for c in range(first, end):
                g = c >> shift
                if self._standard.test(g) and not shift:
                    raise self._shared(guest, c, "standard data", table_off)
                if not self._compressed.test_and_set(g):
                    self._compressed_units += 1
                    touched.append((c, c + 1))
            if self._compressed_guest > self._ratio * self._compressed_units * unit:
                raise FormatError(
                    f"compressed clusters claim {self._compressed_guest} bytes from "
                    f"{self._compressed_units * unit} bytes of host clusters, more than "
                    f"{self._ratio:g}:1; refusing a decompression bomb",
                    fmt=FMT, offset=table_off)
        for first, end in touched:
            unused = await self._first_unreferenced(first, end)
            if unused is not None:
                raise FormatError(
                    f"host cluster {unused * cs:#x} is in use but its refcount is 0 "
                    "(the refcount table disagrees with the L2 tables; "
                    "'qemu-img check -r all' repairs it)", fmt=FMT, offset=table_off)

    def _shared(self, guest: int, cluster: int, other: str, table_off: int) -> FormatError:
        return FormatError(
            f"virtual offset {guest} maps to host cluster {cluster * self._cs:#x}, which "
            f"also holds {other} (a cluster is never shared within one image)",
            fmt=FMT, offset=table_off)

    async def _first_unreferenced(self, first: int, end: int) -> int | None:
        """The first cluster in ``[first, end)`` whose refcount is 0, else None."""
        c = first
        while c < end:
            index, entry = divmod(c, self._per_block)
            stop = min(end, (index + 1) * self._per_block)
            block = await self._block(index)
            if block is None:
                return c
            zero = _first_zero(block, entry, entry + stop - c, self._refcount_bits)
            if zero is not None:
                return index * self._per_block + zero
            c = stop
        return None

    async def _block(self, index: int) -> bytes | None:
        if index >= len(self._rt):
            return None
        off = self._rt[index] & _RT_OFFSET_MASK
        if not off:
            return None
        block = self._blocks.get(off)
        if block is not None:
            self._blocks.move_to_end(off)
            return block
        if off & (self._cs - 1) or off + self._cs > self._file_size:
            raise FormatError(f"refcount block {off:#x} outside the file", fmt=FMT, offset=off)
        data = await self._source.read_at(off, self._cs)
        if len(data) != self._cs:
            raise FormatError("refcount block cut short by end of file", fmt=FMT, offset=off)
        block = bytes(data)
        self._blocks[off] = block
        if len(self._blocks) > self._block_cap:
            self._blocks.popitem(last=False)
        return block


def _first_zero(block: bytes, first: int, end: int, bits: int) -> int | None:
    """The first entry in ``[first, end)`` of a refcount block that is 0."""
    if bits >= 8:
        width = bits // 8
        chunk = block[first * width:end * width]
        if width == 1:
            i = chunk.find(0)
            return None if i < 0 else first + i
        values = array(_WIDTH_CODES[width])  # zero is zero in either byte order
        values.frombytes(chunk)
        try:
            return first + values.index(0)
        except ValueError:
            return None
    mask = (1 << bits) - 1
    for entry in range(first, end):
        pos = entry * bits
        if not (block[pos >> 3] >> (pos & 7)) & mask:
            return entry
    return None
