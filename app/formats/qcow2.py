"""qcow2 images (QEMU copy-on-write v2 and v3): reading and writing.

Reader (needs a :class:`~app.formats.base.RandomAccessSource`)
    Supported: versions 2 (compat 0.10) and 3 (compat 1.1), any cluster size from
    512 B to 2 MiB, header extensions (feature names are used in error messages),
    standard, zero-flag (v3), unallocated and compressed clusters (zlib = raw deflate,
    and zstd from the v3 ``compression_type`` field), extended L2 entries with
    subclusters, internal snapshots (ignored: the active L1 table is read), lazy
    refcounts (refcounts are read only to check that clusters in use are counted).
    :meth:`Qcow2Reader.allocation_map` answers from L1/L2 without reading data.
    Contiguous host clusters are coalesced into large reads with several in flight;
    compressed clusters are inflated on a thread pool.

    Refused with a :class:`~app.formats.base.FormatError`: qcow version 1 and unknown
    versions, backing files ("flatten the chain first"), encryption (AES or LUKS),
    external data files, the dirty and corrupt bits, unknown incompatible features,
    cluster sizes outside 512 B-2 MiB, L1 tables over 32 MiB, virtual sizes over
    ``max_virtual_size``, and any malformed or inconsistent structure (truncation,
    tables past the end of the file, metadata overlaps, reserved bits, compressed
    clusters that do not inflate to exactly one cluster). Standard data clusters must
    lie wholly inside the file (QEMU always writes them whole). The work an image can
    cause is bounded by what it holds (:mod:`app.formats.qcow2_guard`): no host cluster
    shared within the active L2 tables, compressed data claiming at most
    ``max_compression_ratio`` times its host clusters, no cluster in use with a refcount
    of 0; all checked as the L2 tables are walked, before the data they map is read.

Writer
    See :mod:`app.formats.qcow2_writer`.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import sys
from array import array
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import ClassVar

from app.formats import probes
from app.formats import qcow2_layout as L
from app.formats.base import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_VIRTUAL_SIZE,
    Extent,
    FormatError,
    ImageInfo,
    ImageReader,
    RandomAccessSource,
    SeekableSink,
    SequentialSink,
    SequentialSource,
    WriterOptions,
)
from app.formats.qcow2_guard import DEFAULT_MAX_COMPRESSION_RATIO, AllocationGuard
from app.formats.qcow2_writer import Qcow2StreamWriter, Qcow2Writer, create_qcow2_writer
from app.formats.raw import READ_DEPTH, prefetch_reads

FMT = L.FMT

__all__ = [
    "Qcow2Reader",
    "Qcow2StreamWriter",
    "Qcow2Writer",
    "create_writer",
    "open_reader",
    "probe",
]

# Run kinds: a run is (guest_offset, length, kind, host_offset, compressed_length).
ZERO = 0
DATA = 1
COMPRESSED = 2
Run = tuple[int, int, int, int, int]

#: Largest span read at once for a group of compressed clusters (beyond one chunk).
_MAX_COMPRESSED_SPAN_SLACK = 4 * 1024 * 1024

_LITTLE_ENDIAN = sys.byteorder == "little"

#: Compressed groups in flight (each is inflated on a codec pool thread).
_INFLATE_DEPTH = max(READ_DEPTH, os.cpu_count() or 1)

#: Pieces of a data item at least this long are not joined with their neighbours.
_OWN_EXTENT = 256 * 1024


probe = probes.qcow2


def _be64(data: bytes) -> array[int]:
    arr = array("Q")
    arr.frombytes(data)
    if _LITTLE_ENDIAN:
        arr.byteswap()
    return arr


class _Metadata:
    """The host clusters that hold metadata (header, L1, refcount table, L2 tables) as
    a sorted array, so overlap checks cost a binary search and little memory."""

    def __init__(self, clusters: array[int]) -> None:
        self._clusters = clusters

    def overlaps(self, first: int, end: int) -> bool:
        """Does any metadata cluster fall in ``[first, end)``?"""
        i = bisect.bisect_left(self._clusters, first)
        return i < len(self._clusters) and self._clusters[i] < end


@dataclass(frozen=True, slots=True)
class _ZeroItem:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class _DataItem:
    pieces: list[tuple[int, int, int]]  # (guest, host, length), guest-contiguous


@dataclass(frozen=True, slots=True)
class _CompressedItem:
    clusters: list[tuple[int, int, int, int]]  # (guest, length, host, compressed length)


_Item = _ZeroItem | _DataItem | _CompressedItem


class _Planner:
    """Turns runs into work items: zero extents, grouped reads of data clusters and
    grouped reads + inflation of compressed clusters; each item covers at most one
    chunk of guest data."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.items: list[_Item] = []
        self._zero: tuple[int, int] | None = None
        self._data: list[tuple[int, int, int]] = []  # (guest, host, length)
        self._data_len = 0
        self._comp: list[tuple[int, int, int, int]] = []  # (guest, length, host, clen)
        self._comp_len = 0
        self._comp_lo = 0
        self._comp_hi = 0

    def _flush_zero(self) -> None:
        if self._zero is not None:
            self.items.append(_ZeroItem(*self._zero))
            self._zero = None

    def _flush_data(self) -> None:
        if self._data:
            self.items.append(_DataItem(self._data))
            self._data, self._data_len = [], 0

    def _flush_comp(self) -> None:
        if self._comp:
            self.items.append(_CompressedItem(self._comp))
            self._comp, self._comp_len = [], 0

    def flush(self) -> None:
        self._flush_zero()
        self._flush_data()
        self._flush_comp()

    def add(self, run: Run) -> None:
        guest, length, kind, host, clen = run
        if kind == ZERO:
            self._flush_data()
            self._flush_comp()
            if self._zero is not None:
                start, zlen = self._zero
                self._zero = (start, zlen + length)
            else:
                self._zero = (guest, length)
        elif kind == DATA:
            self._flush_zero()
            self._flush_comp()
            while length:
                room = self.chunk - self._data_len
                if room <= 0:
                    self._flush_data()
                    room = self.chunk
                piece = min(length, room)
                self._data.append((guest, host, piece))
                self._data_len += piece
                guest, host, length = guest + piece, host + piece, length - piece
        else:
            self._flush_zero()
            self._flush_data()
            if self._comp:
                lo, hi = min(self._comp_lo, host), max(self._comp_hi, host + clen)
                if (
                    self._comp_len + length > self.chunk
                    or hi - lo > self.chunk + _MAX_COMPRESSED_SPAN_SLACK
                ):
                    self._flush_comp()
            if not self._comp:
                self._comp_lo, self._comp_hi = host, host + clen
            self._comp_lo = min(self._comp_lo, host)
            self._comp_hi = max(self._comp_hi, host + clen)
            self._comp.append((guest, length, host, clen))
            self._comp_len += length

    def take(self) -> list[_Item]:
        items, self.items = self.items, []
        return items


class Qcow2Reader(ImageReader):
    """Extents of a qcow2 image (validated by :func:`open_reader`)."""

    format: ClassVar[str] = FMT
    needs_random_access: ClassVar[bool] = True

    def __init__(
        self,
        source: RandomAccessSource,
        header: L.Header,
        l1: array[int],
        *,
        file_size: int,
        extended_l2: bool,
        metadata: _Metadata,
        refcount_table: bytes = b"",
        max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
        check_allocation: bool = True,
    ) -> None:
        self._source = source
        self._refcount_table = refcount_table
        self._max_ratio = max_compression_ratio
        self._check_allocation = check_allocation
        self._hdr = header
        self._l1 = l1
        self._file_size = file_size
        self._extl2 = extended_l2
        self._cs = header.cluster_size
        self._cbits = header.cluster_bits
        self._l2_entries = L.l2_entries_per_table(self._cs, extended_l2)
        self._meta = metadata
        self._zstd = header.compression_type == L.COMPRESSION_ZSTD
        self._skip_below = 0
        self.info = ImageInfo(
            format=FMT,
            virtual_size=header.size,
            subformat="v3" if header.version == 3 else "v2",
            cluster_size=self._cs,
            details={
                "compat": "1.1" if header.version == 3 else "0.10",
                "compression_type": L.COMPRESSION_NAMES.get(header.compression_type, "?"),
                "extended_l2": extended_l2,
                "refcount_bits": 1 << header.refcount_order,
                "snapshots": header.nb_snapshots,
            },
        )

    # ----------------------------------------------------------------- mapping

    def _l2_plan(self) -> Iterator[tuple[int, int]]:
        """Reads of allocated L2 tables, contiguous tables coalesced (<= 1 MiB)."""
        cs = self._cs
        max_tables = max(1, (1 << 20) // cs)
        start = -1
        count = 0
        for entry in self._l1:
            off = entry & L.OFFSET_MASK
            if not off:
                continue
            if count and off == start + count * cs and count < max_tables:
                count += 1
                continue
            if count:
                yield start, count * cs
            start, count = off, 1
        if count:
            yield start, count * cs

    async def _runs(self) -> AsyncIterator[list[Run]]:
        """Runs per L2 table, in guest order, covering ``[0, virtual_size)``."""
        vsize = self._hdr.size
        cs = self._cs
        span = cs * self._l2_entries
        tables = prefetch_reads(self._source, self._l2_plan(), depth=2, fmt=FMT)
        guard = AllocationGuard(self._source, self._hdr, self._file_size,
                                self._refcount_table,
                                max_compression_ratio=self._max_ratio)
        buf: bytes | memoryview = b""
        buf_off = buf_end = 0
        try:
            for index, entry in enumerate(self._l1):
                guest = index * span
                if guest >= vsize:
                    break
                off = entry & L.OFFSET_MASK
                if not off:
                    yield [(guest, min(span, vsize - guest), ZERO, 0, 0)]
                    continue
                if not buf_off <= off < buf_end:
                    try:
                        buf_off, buf = await tables.__anext__()
                    except StopAsyncIteration:  # pragma: no cover - plan matches the L1
                        raise FormatError("L2 table missing", fmt=FMT, offset=off) from None
                    buf_end = buf_off + len(buf)
                table = bytes(buf[off - buf_off : off - buf_off + cs])
                runs = self._check_overlaps(self._parse_l2(table, guest, off), off)
                if self._check_allocation:
                    await guard.check(runs, off)
                yield self._skipped(runs) if guest < self._skip_below else runs
        finally:
            await tables.aclose()

    def skip_below(self, offset: int) -> bool:
        """Clusters wholly below ``offset`` are reported as zeros and not read (their
        L2 tables still are: they are small, and checked as always)."""
        self._skip_below = max(0, offset)
        return True

    def _skipped(self, runs: list[Run]) -> list[Run]:
        """Runs below the skip offset as zeros; a data run across it is split there
        (at a cluster boundary), so only its upper part is read."""
        cut = self._skip_below - self._skip_below % self._cs
        out: list[Run] = []
        for guest, length, kind, host, clen in runs:
            if guest + length <= cut:
                out.append((guest, length, ZERO, 0, 0))
            elif kind == DATA and guest < cut:
                out.append((guest, cut - guest, ZERO, 0, 0))
                out.append((cut, guest + length - cut, DATA, host + cut - guest, clen))
            else:
                out.append((guest, length, kind, host, clen))
        return out

    def _check_data(self, host: int, length: int, where: int) -> None:
        cs = self._cs
        if host & (cs - 1):
            raise FormatError(f"data cluster {host:#x} not cluster-aligned", fmt=FMT, offset=where)
        if host + length > self._file_size:
            raise FormatError(
                f"data cluster {host:#x} past the end of the file", fmt=FMT, offset=where
            )

    def _compressed_run(self, entry: int, guest: int, length: int, where: int) -> Run:
        host, clen = L.decode_compressed(entry, self._cbits)
        if host < self._cs or host >= self._file_size:
            raise FormatError(
                f"compressed cluster at {host:#x} outside the file", fmt=FMT, offset=where
            )
        clen = min(clen, self._file_size - host)
        return (guest, length, COMPRESSED, host, clen)

    def _check_overlaps(self, runs: list[Run], table_off: int) -> list[Run]:
        cs = self._cs
        for guest, length, kind, host, clen in runs:
            if kind == ZERO:
                continue
            end = host + (clen if kind == COMPRESSED else length)
            if self._meta.overlaps(host // cs, L.div_round_up(end, cs)):
                raise FormatError(
                    f"data for virtual offset {guest} (host {host:#x}) overlaps qcow2 metadata",
                    fmt=FMT,
                    offset=table_off,
                )
        return runs

    def _parse_l2(self, table: bytes, guest_base: int, table_off: int) -> list[Run]:
        vsize = self._hdr.size
        cs = self._cs
        count = min(self._l2_entries, L.div_round_up(vsize - guest_base, cs))
        width = L.l2_entry_size(self._extl2)
        if table.startswith(bytes(count * width)):
            return [(guest_base, min(count * cs, vsize - guest_base), ZERO, 0, 0)]
        values = _be64(table[: count * width])
        runs: list[Run] = []

        def push(guest: int, length: int, kind: int, host: int, clen: int) -> None:
            if runs:
                g, n, k, h, _ = runs[-1]
                if k == kind and g + n == guest:
                    if kind == ZERO:
                        runs[-1] = (g, n + length, ZERO, 0, 0)
                        return
                    if kind == DATA and h + n == host:
                        runs[-1] = (g, n + length, DATA, h, 0)
                        return
            runs.append((guest, length, kind, host, clen))

        v3 = self._hdr.version >= 3
        # Standard entries come in runs: unallocated (0) or plain data clusters at
        # consecutive host offsets. Such a run is taken whole (one check, one push);
        # anything else goes entry by entry below. Parsing 8192 entries one at a time
        # took about 5 ms of the event loop, during which it queued no reads.
        odd = L.OFLAG_COMPRESSED | L.OFLAG_ZERO | L.L2_STD_RESERVED_MASK
        j = 0
        while j < count:
            guest = guest_base + j * cs
            entry = values[j * 2] if self._extl2 else values[j]
            if not self._extl2 and not entry & odd:
                k = j + 1
                if not entry:
                    while k < count and not values[k]:
                        k += 1
                    push(guest, min((k - j) * cs, vsize - guest), ZERO, 0, 0)
                    j = k
                    continue
                host = entry & L.OFFSET_MASK
                if host:
                    following = entry + cs
                    while k < count and values[k] == following:
                        k += 1
                        following += cs
                    length = min((k - j) * cs, vsize - guest)
                    if host & (cs - 1) or host + length > self._file_size:
                        for m in range(j, k):  # name the first bad entry
                            self._check_data(
                                host + (m - j) * cs,
                                min(cs, vsize - guest_base - m * cs),
                                table_off + m * width,
                            )
                    push(guest, length, DATA, host, 0)
                    j = k
                    continue
            i = j
            j += 1
            length = min(cs, vsize - guest)
            where = table_off + i * width
            if entry & L.OFLAG_COMPRESSED:
                push(*self._compressed_run(entry, guest, length, where))
                continue
            if entry & L.L2_STD_RESERVED_MASK:
                raise FormatError(
                    f"L2 entry {entry:#x} has reserved bits set", fmt=FMT, offset=where
                )
            host = entry & L.OFFSET_MASK
            if self._extl2:
                if entry & L.OFLAG_ZERO:
                    raise FormatError("extended L2 entry has bit 0 set", fmt=FMT, offset=where)
                bitmap = values[i * 2 + 1]
                alloc, zero = bitmap & 0xFFFF_FFFF, bitmap >> 32
                if alloc & zero:
                    raise FormatError(
                        "subcluster both allocated and zero", fmt=FMT, offset=where + 8
                    )
                if not alloc:
                    push(guest, length, ZERO, 0, 0)
                    continue
                if not host:
                    raise FormatError(
                        "allocated subclusters without a host cluster", fmt=FMT, offset=where
                    )
                sub = cs // 32
                # Only the allocated subclusters need to be in the file (QEMU may leave
                # the rest of the last cluster unwritten).
                self._check_data(host, min(length, alloc.bit_length() * sub), where)
                if alloc == 0xFFFF_FFFF:
                    push(guest, length, DATA, host, 0)
                    continue
                for k in range(32):
                    sg = guest + k * sub
                    if sg >= guest + length:
                        break
                    slen = min(sub, guest + length - sg)
                    if alloc >> k & 1:
                        push(sg, slen, DATA, host + k * sub, 0)
                    else:
                        push(sg, slen, ZERO, 0, 0)
                continue
            if entry & L.OFLAG_ZERO:
                if not v3:
                    raise FormatError("zero flag in a version 2 image", fmt=FMT, offset=where)
                push(guest, length, ZERO, 0, 0)
            elif not host:
                if entry & L.OFLAG_COPIED:
                    raise FormatError(
                        "L2 entry maps host offset 0 (external data file?)", fmt=FMT, offset=where
                    )
                push(guest, length, ZERO, 0, 0)
            else:
                self._check_data(host, length, where)
                push(guest, length, DATA, host, 0)
        return runs

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        out: list[tuple[int, int]] = []
        async for runs in self._runs():
            for guest, length, kind, _, _ in runs:
                if kind == ZERO:
                    continue
                if out and out[-1][0] + out[-1][1] == guest:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((guest, length))
        return out

    # ----------------------------------------------------------------- data

    async def _read_data(self, pieces: list[tuple[int, int, int]]) -> list[Extent]:
        """One data item: guest-contiguous pieces at scattered host offsets. Large
        pieces become extents of their own (views of the file where it can); small ones
        are joined, so a fragmented image does not cost the pipeline per cluster."""

        async def one(host: int, length: int) -> bytes | memoryview:
            data = await self._source.read_at(host, length)
            if len(data) != length:
                raise FormatError("data cluster cut short by end of file", fmt=FMT, offset=host)
            return data

        if len(pieces) == 1:
            guest, host, length = pieces[0]
            return [Extent(guest, length, await one(host, length))]
        parts = await asyncio.gather(*(one(h, n) for _, h, n in pieces))
        if min(n for _, _, n in pieces) >= _OWN_EXTENT:
            return [
                Extent(guest, n, part) for (guest, _, n), part in zip(pieces, parts, strict=True)
            ]
        data = b"".join(parts)
        return [Extent(pieces[0][0], len(data), data)]

    def _inflate_group(
        self, span: bytes, span_off: int, group: list[tuple[int, int, int, int]]
    ) -> bytes:
        cs = self._cs
        out = []
        view = memoryview(span)
        for _guest, length, host, clen in group:
            raw = view[host - span_off : host - span_off + clen]
            if self._zstd:
                data = L.unzstd_cluster(raw, cs, host)
            else:
                data = L.inflate_cluster(raw, cs, host)
            out.append(data if length == cs else data[:length])
        return b"".join(out)

    async def _read_compressed(
        self, group: list[tuple[int, int, int, int]], chunk: int
    ) -> list[Extent]:
        lo = min(h for _, _, h, _ in group)
        hi = max(h + c for _, _, h, c in group)
        span = await self._source.read_at(lo, hi - lo)
        if len(span) != hi - lo:
            raise FormatError("compressed data cut short by end of file", fmt=FMT, offset=lo)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(L.codec_pool(), self._inflate_group, span, lo, group)
        guest = group[0][0]
        view = memoryview(data)
        return [
            Extent(guest + pos, min(chunk, len(data) - pos), view[pos : pos + chunk])
            for pos in range(0, len(data), chunk)
        ]

    def _start(self, item: _Item, chunk: int) -> asyncio.Task[list[Extent]] | list[Extent]:
        if isinstance(item, _ZeroItem):
            return [Extent(item.offset, item.length)]
        if isinstance(item, _DataItem):
            return asyncio.ensure_future(self._read_data(item.pieces))
        return asyncio.ensure_future(self._read_compressed(item.clusters, chunk))

    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return self._extents(chunk_size)

    async def _extents(self, chunk: int) -> AsyncIterator[Extent]:
        planner = _Planner(chunk)
        queue: deque[asyncio.Task[list[Extent]] | list[Extent]] = deque()
        in_flight = 0
        try:
            async for runs in self._runs():
                for run in runs:
                    planner.add(run)
                for item in planner.take():
                    # Keep the pending item list bounded: drain before adding more.
                    # Compressed groups are CPU-bound: one in flight per codec thread.
                    limit = _INFLATE_DEPTH if isinstance(item, _CompressedItem) else READ_DEPTH
                    while in_flight >= limit or len(queue) > 4 * limit:
                        head = queue.popleft()
                        if isinstance(head, asyncio.Task):
                            in_flight -= 1
                            head = await head
                        for ext in head:
                            yield ext
                    started = self._start(item, chunk)
                    if isinstance(started, asyncio.Task):
                        in_flight += 1
                    queue.append(started)
            planner.flush()
            for item in planner.take():
                queue.append(self._start(item, chunk))
            while queue:
                head = queue.popleft()
                if isinstance(head, asyncio.Task):
                    head = await head
                for ext in head:
                    yield ext
        finally:
            tasks = [t for t in queue if isinstance(t, asyncio.Task)]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self._source.close()


# --------------------------------------------------------------------------- open


async def _read_exact(source: RandomAccessSource, offset: int, length: int, what: str) -> bytes:
    data = await source.read_at(offset, length)
    if len(data) != length:
        raise FormatError(f"{what} cut short by end of file", fmt=FMT, offset=offset)
    return data


def _refuse_features(hdr: L.Header, names: dict[tuple[int, int], str]) -> None:
    bits = hdr.incompatible_features
    if bits & L.INCOMPAT_CORRUPT:
        raise FormatError(
            "image is marked corrupt; repair it with 'qemu-img check -r all' first",
            fmt=FMT,
            offset=72,
        )
    if bits & L.INCOMPAT_DIRTY:
        raise FormatError(
            "image is dirty (not closed cleanly, refcounts may be stale); "
            "run 'qemu-img check -r all' first",
            fmt=FMT,
            offset=72,
        )
    if bits & L.INCOMPAT_DATA_FILE:
        raise FormatError("images with an external data file are not supported", fmt=FMT)
    unknown = bits & ~L.INCOMPAT_KNOWN
    if unknown:
        labels = [names.get((0, bit), f"bit {bit}") for bit in range(64) if unknown >> bit & 1]
        raise FormatError(
            f"unsupported incompatible features: {', '.join(labels)}", fmt=FMT, offset=72
        )


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    max_compression_ratio: float = DEFAULT_MAX_COMPRESSION_RATIO,
    check_allocation: bool = True,
) -> Qcow2Reader:
    """Parse and validate the header, extensions and L1 table of a qcow2 image.

    ``check_allocation=False`` reads L2 entries as they are, unchecked against each
    other and the refcounts (:mod:`app.formats.qcow2_guard`): for tests of the parser
    and for repairing tools, never for images from outside."""
    if not isinstance(source, RandomAccessSource):
        raise FormatError("reading qcow2 needs random access (a file or ranged HTTP)", fmt=FMT)
    file_size = source.size
    head = await source.read_at(0, L.V3_HEADER_LENGTH)
    hdr = L.Header.parse(head)
    if not L.MIN_CLUSTER_BITS <= hdr.cluster_bits <= L.MAX_CLUSTER_BITS:
        raise FormatError(
            f"cluster_bits {hdr.cluster_bits} outside the supported 9-21", fmt=FMT, offset=20
        )
    cs = hdr.cluster_size
    if hdr.version == 3:
        if hdr.header_length < L.V3_MIN_HEADER_LENGTH or hdr.header_length % 8:
            raise FormatError(f"bad header_length {hdr.header_length}", fmt=FMT, offset=100)
        if hdr.header_length > cs:
            raise FormatError(
                f"header_length {hdr.header_length} exceeds the cluster size", fmt=FMT, offset=100
            )
        if hdr.refcount_order > 6:
            raise FormatError(f"refcount_order {hdr.refcount_order} exceeds 6", fmt=FMT, offset=96)
    header_area = await source.read_at(0, min(cs, file_size))
    if len(header_area) < hdr.header_length:
        raise FormatError("header cut short by end of file", fmt=FMT, offset=len(header_area))
    ext_end = cs
    if hdr.header_length < hdr.backing_file_offset < cs:
        ext_end = hdr.backing_file_offset
    extensions = L.parse_extensions(header_area, hdr.header_length, ext_end)
    names: dict[tuple[int, int], str] = {}
    for ext_type, body in extensions:
        if ext_type == L.EXT_FEATURE_TABLE:
            names = L.feature_names(body)

    if hdr.backing_file_offset:
        name = "(unreadable name)"
        if 0 < hdr.backing_file_size <= L.MAX_BACKING_NAME:
            raw_name = await source.read_at(hdr.backing_file_offset, hdr.backing_file_size)
            if len(raw_name) == hdr.backing_file_size:
                name = repr(raw_name.decode("utf-8", "replace"))
        raise FormatError(
            f"backing file {name}: flatten the chain first "
            "(qemu-img convert, or qemu-img rebase -b '')",
            fmt=FMT,
            offset=8,
        )
    if hdr.crypt_method:
        method = {1: "AES", 2: "LUKS"}.get(hdr.crypt_method, str(hdr.crypt_method))
        raise FormatError(f"encrypted images ({method}) are not supported", fmt=FMT, offset=32)
    for ext_type, body in extensions:
        if ext_type == L.EXT_DATA_FILE:
            raise FormatError(
                f"external data file {body.decode('utf-8', 'replace')!r} is not supported",
                fmt=FMT,
            )
        if ext_type == L.EXT_CRYPTO:
            raise FormatError("encryption header extension present", fmt=FMT)
    _refuse_features(hdr, names)

    has_ctype_bit = bool(hdr.incompatible_features & L.INCOMPAT_COMPRESSION)
    if hdr.compression_type not in L.COMPRESSION_NAMES:
        raise FormatError(f"unknown compression type {hdr.compression_type}", fmt=FMT, offset=104)
    if has_ctype_bit != (hdr.compression_type != L.COMPRESSION_ZLIB):
        raise FormatError(
            "compression type field and incompatible feature bit disagree", fmt=FMT, offset=104
        )
    extended_l2 = bool(hdr.incompatible_features & L.INCOMPAT_EXTL2)
    if extended_l2 and hdr.cluster_bits < 14:
        raise FormatError("extended L2 entries need clusters of at least 16 KiB", fmt=FMT)

    if hdr.size > max_virtual_size:
        raise FormatError(
            f"virtual size {hdr.size} exceeds the limit of {max_virtual_size} bytes",
            fmt=FMT,
            offset=24,
        )
    needed = L.l1_entries_needed(hdr.size, cs, extended_l2)
    if hdr.l1_size < needed:
        raise FormatError(
            f"L1 table of {hdr.l1_size} entries too small for {hdr.size} bytes", fmt=FMT, offset=36
        )
    if hdr.l1_size * 8 > L.MAX_L1_BYTES:
        raise FormatError(f"L1 table of {hdr.l1_size} entries is absurd", fmt=FMT, offset=36)
    if needed:
        if hdr.l1_table_offset & (cs - 1) or hdr.l1_table_offset == 0:
            raise FormatError(f"bad L1 table offset {hdr.l1_table_offset:#x}", fmt=FMT, offset=40)
        l1_bytes = await _read_exact(source, hdr.l1_table_offset, needed * 8, "L1 table")
        l1 = _be64(l1_bytes)
    else:
        l1 = array("Q")
    rt_off, rt_clusters = hdr.refcount_table_offset, hdr.refcount_table_clusters
    if (
        rt_off & (cs - 1)
        or rt_off == 0
        or rt_clusters == 0
        or rt_clusters * cs > L.MAX_REFCOUNT_TABLE_BYTES
        or rt_off >= file_size
    ):
        raise FormatError(
            f"bad refcount table ({rt_clusters} clusters at {rt_off:#x})", fmt=FMT, offset=48
        )
    # The part of the refcount table that covers the file (the rest may be unread).
    per_block = cs * 8 // (1 << hdr.refcount_order)
    rt_needed = min(rt_clusters * cs, L.div_round_up(L.div_round_up(file_size, cs), per_block) * 8)
    refcount_table = await _read_exact(source, rt_off, rt_needed, "refcount table")
    fixed = [0]  # the header cluster
    if needed:
        fixed.extend(
            range(hdr.l1_table_offset // cs, L.div_round_up(hdr.l1_table_offset + needed * 8, cs))
        )
    fixed.extend(range(rt_off // cs, rt_off // cs + rt_clusters))
    l2_clusters = array("Q")
    for index, entry in enumerate(l1):
        off = entry & L.OFFSET_MASK
        where = hdr.l1_table_offset + index * 8
        if entry & L.L1_RESERVED_MASK:
            raise FormatError(f"L1 entry {entry:#x} has reserved bits set", fmt=FMT, offset=where)
        if not off:
            continue
        if off & (cs - 1):
            raise FormatError(f"L2 table {off:#x} not cluster-aligned", fmt=FMT, offset=where)
        if off + cs > file_size:
            raise FormatError(f"L2 table {off:#x} past the end of the file", fmt=FMT, offset=where)
        l2_clusters.append(off // cs)
    clusters = array("Q", sorted([*fixed, *l2_clusters]))
    del l2_clusters
    for i in range(1, len(clusters)):
        if clusters[i] == clusters[i - 1]:
            raise FormatError(
                f"metadata structures overlap at host cluster {clusters[i] * cs:#x} "
                "(header, L1, refcount table or L2 tables)",
                fmt=FMT,
                offset=clusters[i] * cs,
            )
    return Qcow2Reader(
        source,
        hdr,
        l1,
        file_size=file_size,
        extended_l2=extended_l2,
        metadata=_Metadata(clusters),
        refcount_table=refcount_table,
        max_compression_ratio=max_compression_ratio,
        check_allocation=check_allocation,
    )


def create_writer(
    sink: SeekableSink | SequentialSink,
    virtual_size: int,
    options: WriterOptions | None = None,
) -> Qcow2Writer | Qcow2StreamWriter:
    """A qcow2 writer: random-access layout on a seekable sink, layout-first streaming
    (needs :meth:`~app.formats.base.ImageWriter.set_allocation_map`) on a stream."""
    return create_qcow2_writer(sink, virtual_size, options or WriterOptions())
