"""qcow2 writers: random-access layout on a seekable sink, layout-first streaming on a
sequential sink.

Both write version 3 (compat 1.1, the default) or version 2 (``subformat="v2"``,
compat 0.10), 16-bit refcounts, no extensions, any power-of-two cluster size from
512 B to 2 MiB (64 KiB default). Zero extents and all-zero clusters are never written:
they stay unallocated. The virtual size is rounded up to a multiple of 512 in the
header, as QEMU does. Refcounts are exact (``qemu-img check``: no errors, no leaks).

:class:`Qcow2Writer` (seekable sink)
    Data clusters are appended as they come, in guest order; each L2 table is written
    as soon as the guest position passes its range and each refcount block as soon as
    the host clusters it covers are final, so memory stays bounded whatever the disk
    size. The L1 table, the last refcount blocks, the refcount table and the header are
    written by :meth:`Qcow2Writer.finish`. With ``WriterOptions.compress`` clusters are
    compressed (raw deflate, as QEMU's ``zlib`` type) in parallel on a thread pool, in
    order; a cluster that does not shrink is stored uncompressed. Levels 1-3 use ISA-L
    (several times faster than zlib, similar ratio), other levels use zlib itself.

:class:`Qcow2StreamWriter` (sequential sink; ``streamable``, ``needs_allocation_map``)
    The whole layout is computed from the allocation map given to
    :meth:`Qcow2StreamWriter.set_allocation_map`: header, L1 table, refcount table and
    blocks, L2 tables, then the data clusters of the mapped ranges in guest order.
    Mapped clusters that turn out to be zero are written as zeros; non-zero data
    outside the map is a :class:`~app.formats.base.FormatError`. Compression is not
    supported when streaming (compressed sizes are not known in advance).

Neither writer can resume (``durable_offset()`` is 0). :class:`Qcow2Writer` keeps a few
writes (and compression jobs) in flight after ``write`` returns, holding references to
the extents' data, which must therefore not be mutated afterwards; ``abort()`` drops
that work when a conversion is abandoned.
"""

from __future__ import annotations

import asyncio
import os
import sys
from array import array
from collections import deque
from collections.abc import Iterator
from typing import ClassVar

from app.formats import qcow2_layout as L
from app.formats.base import (
    Extent,
    FormatError,
    ImageWriter,
    SeekableSink,
    SequentialSink,
    WriterOptions,
)
from app.formats.buffers import Buffer, WriteBehind, first_bytes_nonzero, is_zero, zeros

FMT = L.FMT
DEFAULT_CLUSTER_SIZE = 64 * 1024

_LITTLE_ENDIAN = sys.byteorder == "little"
_MAX_REFCOUNT = 0xFFFF
#: Clusters per compression job handed to the pool.
_COMPRESS_BATCH = 16


def _pack64(values: array[int], pad_to: int = 0) -> bytes:
    arr = array("Q", values)
    if _LITTLE_ENDIAN:
        arr.byteswap()
    data = arr.tobytes()
    if len(data) < pad_to:
        data += bytes(pad_to - len(data))
    return data


def _pack16(values: array[int], pad_to: int = 0) -> bytes:
    arr = array("H", values)
    if _LITTLE_ENDIAN:
        arr.byteswap()
    data = arr.tobytes()
    if len(data) < pad_to:
        data += bytes(pad_to - len(data))
    return data


def _parse_options(virtual_size: int, options: WriterOptions) -> tuple[int, int, int]:
    """``(version, cluster_bits, header_size)`` from the options, validated."""
    sub = (options.subformat or "v3").lower()
    if sub in ("v3", "3", "1.1"):
        version = 3
    elif sub in ("v2", "2", "0.10"):
        version = 2
    else:
        raise FormatError(f"unknown qcow2 subformat {options.subformat!r} (v2 or v3)", fmt=FMT)
    cs = options.cluster_size or DEFAULT_CLUSTER_SIZE
    cbits = cs.bit_length() - 1
    if cs != 1 << cbits or not L.MIN_CLUSTER_BITS <= cbits <= L.MAX_CLUSTER_BITS:
        raise FormatError(f"cluster size {cs} must be a power of two from 512 B to 2 MiB", fmt=FMT)
    size = L.round_up(virtual_size, 512)
    if L.l1_entries_needed(size, cs) * 8 > L.MAX_L1_BYTES:
        raise FormatError(
            f"virtual size {virtual_size} needs an L1 table over 32 MiB with {cs}-byte "
            "clusters; use a larger cluster size",
            fmt=FMT,
        )
    if not 0 <= options.compression_level <= 9:
        raise FormatError(f"compression level {options.compression_level} not in 0-9", fmt=FMT)
    return version, cbits, size


def _header(version: int, cbits: int, size: int) -> L.Header:
    hdr = L.Header(version=version, cluster_bits=cbits, size=size)
    if version == 3:
        hdr.header_length = L.V3_HEADER_LENGTH
    return hdr


def _header_cluster(hdr: L.Header) -> bytes:
    data = hdr.pack() + bytes(8)  # end-of-extensions marker
    return data + bytes(hdr.cluster_size - len(data))


class ClusterFeed:
    """Turns in-order extents into runs of whole guest clusters that carry data.

    ``feed`` returns ``(first_cluster, buffer)`` pairs, the buffer holding a whole
    number of clusters (partial clusters are assembled in a zero-filled buffer).
    """

    def __init__(self, cluster_size: int, limit: int) -> None:
        self._cs = cluster_size
        self._limit = limit
        self._pos = 0
        self._buf: bytearray | None = None
        self._buf_cluster = -1

    def _take_buf(self) -> list[tuple[int, Buffer]]:
        if self._buf is None:
            return []
        out: list[tuple[int, Buffer]] = [(self._buf_cluster, self._buf)]
        self._buf = None
        return out

    def feed(self, ext: Extent) -> list[tuple[int, Buffer]]:
        cs = self._cs
        if ext.offset < self._pos:
            raise FormatError(
                f"extent at {ext.offset} out of order (already at {self._pos})", fmt=FMT
            )
        if ext.end > self._limit:
            raise FormatError(
                f"extent [{ext.offset}, {ext.end}) past the virtual size {self._limit}", fmt=FMT
            )
        self._pos = ext.end
        out: list[tuple[int, Buffer]] = []
        buf_end = (self._buf_cluster + 1) * cs
        if self._buf is not None and (
            (ext.data is not None and ext.offset // cs != self._buf_cluster)
            or (ext.data is None and ext.end >= buf_end)
        ):
            out = self._take_buf()
        if ext.data is None:
            return out
        data = memoryview(ext.data)
        pos, end, i = ext.offset, ext.end, 0
        if self._buf is not None or pos % cs or end - pos < cs:
            cluster = pos // cs
            if self._buf is None:
                self._buf, self._buf_cluster = bytearray(cs), cluster
            inner = pos - cluster * cs
            take = min(end - pos, cs - inner)
            self._buf[inner : inner + take] = data[:take]
            pos, i = pos + take, take
            if pos % cs == 0:
                out += self._take_buf()
        full = (end - pos) // cs
        if full:
            out.append((pos // cs, data[i : i + full * cs]))
            pos, i = pos + full * cs, i + full * cs
        if pos < end:
            self._buf, self._buf_cluster = bytearray(cs), pos // cs
            self._buf[: end - pos] = data[i:]
        return out

    def flush(self) -> list[tuple[int, Buffer]]:
        return self._take_buf()


def _compress_batch(clusters: list[Buffer], level: int, cluster_size: int) -> list[bytes | None]:
    """Per cluster: ``b""`` if all zero, compressed bytes, or None if it did not shrink."""
    out: list[bytes | None] = []
    limit = cluster_size - 1  # QEMU stores a cluster compressed only if it shrinks
    for data in clusters:
        if is_zero(data):
            out.append(b"")
            continue
        packed = L.deflate_cluster(data, level)
        out.append(packed if len(packed) <= limit else None)
    return out


class Qcow2Writer(ImageWriter):
    """qcow2 on a seekable sink (see the module docstring)."""

    format: ClassVar[str] = FMT
    streamable: ClassVar[bool] = False
    needs_allocation_map: ClassVar[bool] = False

    def __init__(
        self, sink: SeekableSink, virtual_size: int, options: WriterOptions | None = None
    ) -> None:
        super().__init__(virtual_size)
        options = options or WriterOptions()
        version, cbits, size = _parse_options(virtual_size, options)
        self._sink = sink
        self._hdr = _header(version, cbits, size)
        self._cs = cs = 1 << cbits
        self._cbits = cbits
        self._l2_entries = L.l2_entries_per_table(cs, False)
        self._l1 = array("Q", bytes(8 * L.l1_entries_needed(size, cs)))
        self._l2_index = -1
        self._l2 = array("Q")
        self._feed = ClusterFeed(cs, virtual_size)
        self._compress = options.compress
        self._level = options.compression_level
        self._jobs: deque[tuple[int, asyncio.Future[list[bytes | None]], list[Buffer]]] = deque()
        self._max_jobs = 2 * (os.cpu_count() or 1)
        # Host allocation: everything below _end is used; cluster 0 is the header.
        self._end = cs
        self._rc_per_block = cs * 8 // 16
        self._rc_base = 0  # first cluster whose refcount block is not written yet
        self._rc = array("H", [1])  # refcounts of clusters _rc_base..
        self._rc_blocks: list[int] = []
        self._finished = False
        self._wb = WriteBehind()

    # ----------------------------------------------------------------- allocation

    def _alloc_clusters(self, count: int) -> int:
        cs = self._cs
        host = L.round_up(self._end, cs)
        assert host // cs - self._rc_base == len(self._rc)
        self._end = host + count * cs
        self._rc.extend(array("H", [1]) * count)
        return host

    def _alloc_bytes(self, length: int) -> int:
        """Room for one compressed cluster, packed right after the previous one."""
        cs = self._cs
        host = self._end
        if host % cs and self._rc[host // cs - self._rc_base] >= _MAX_REFCOUNT:
            host = L.round_up(host, cs)
        first, last = host // cs, (host + length - 1) // cs
        need = last - self._rc_base + 1 - len(self._rc)
        if need > 0:
            self._rc.extend(array("H", [0]) * need)
        for c in range(first, last + 1):
            self._rc[c - self._rc_base] += 1
        self._end = host + length
        return host

    async def _finalize_refcount_blocks(self) -> None:
        """Write the refcount blocks whose clusters can no longer change."""
        per = self._rc_per_block
        while self._end // self._cs - self._rc_base >= per:
            block = self._alloc_clusters(1)
            await self._wb.submit(self._sink.write_at(block, _pack16(self._rc[:per])))
            self._rc_blocks.append(block)
            del self._rc[:per]
            self._rc_base += per

    # ----------------------------------------------------------------- L2

    async def _set_l2(self, cluster: int, entry: int) -> None:
        index, pos = divmod(cluster, self._l2_entries)
        if index != self._l2_index:
            await self._switch_l2(index)
        self._l2[pos] = entry

    async def _map_plain(self, cluster: int, count: int, host: int) -> None:
        """L2 entries for ``count`` clusters from ``cluster``, stored at consecutive host
        clusters from ``host``: one slice per L2 table, not one call per cluster."""
        cs = self._cs
        entry = host | L.OFLAG_COPIED
        while count:
            index, pos = divmod(cluster, self._l2_entries)
            if index != self._l2_index:
                await self._switch_l2(index)
            n = min(count, self._l2_entries - pos)
            self._l2[pos : pos + n] = array("Q", range(entry, entry + n * cs, cs))
            cluster, count, entry = cluster + n, count - n, entry + n * cs

    async def _switch_l2(self, index: int) -> None:
        await self._flush_l2()
        self._l2_index = index
        self._l2 = array("Q", bytes(8 * self._l2_entries))

    async def _flush_l2(self) -> None:
        if self._l2_index < 0:
            return
        host = self._alloc_clusters(1)
        await self._wb.submit(self._sink.write_at(host, _pack64(self._l2)))
        self._l1[self._l2_index] = host | L.OFLAG_COPIED
        self._l2_index = -1

    # ----------------------------------------------------------------- data

    async def _write_plain(self, first: int, buf: Buffer) -> None:
        cs = self._cs
        count = len(buf) // cs
        if first_bytes_nonzero(buf, 0, cs):  # ordinary data: no cluster is all zeros
            nonzero = [True] * count
        else:
            nonzero = [not is_zero(buf, k * cs, (k + 1) * cs) for k in range(count)]
        k = 0
        while k < count:
            if not nonzero[k]:
                k += 1
                continue
            start = k
            while k < count and nonzero[k]:
                k += 1
            host = self._alloc_clusters(k - start)
            await self._wb.submit(self._sink.write_at(host, memoryview(buf)[start * cs : k * cs]))
            await self._map_plain(first + start, k - start, host)
        await self._finalize_refcount_blocks()

    async def _submit(self, first: int, buf: Buffer) -> None:
        cs = self._cs
        view = memoryview(buf)
        count = len(buf) // cs
        loop = asyncio.get_running_loop()
        for b0 in range(0, count, _COMPRESS_BATCH):
            stop = min(count, b0 + _COMPRESS_BATCH)
            clusters: list[Buffer] = [view[k * cs : (k + 1) * cs] for k in range(b0, stop)]
            while len(self._jobs) >= self._max_jobs:
                await self._complete_job()
            fut = loop.run_in_executor(L.codec_pool(), _compress_batch, clusters, self._level, cs)
            self._jobs.append((first + b0, fut, clusters))

    async def _complete_job(self) -> None:
        first, fut, clusters = self._jobs.popleft()
        results = await fut
        parts: list[bytes] = []
        run_host = -1
        run_len = 0

        async def flush_run() -> None:
            nonlocal parts, run_host, run_len
            if parts:
                await self._wb.submit(self._sink.write_at(run_host, b"".join(parts)))
            parts, run_host, run_len = [], -1, 0

        for k, packed in enumerate(results):
            cluster = first + k
            if packed == b"":
                continue
            if packed is None:
                await flush_run()
                host = self._alloc_clusters(1)
                await self._wb.submit(self._sink.write_at(host, memoryview(clusters[k])))
                await self._set_l2(cluster, host | L.OFLAG_COPIED)
                continue
            host = self._alloc_bytes(len(packed))
            if run_host >= 0 and host != run_host + run_len:
                await flush_run()
            if run_host < 0:
                run_host = host
            parts.append(packed)
            run_len += len(packed)
            await self._set_l2(cluster, L.encode_compressed(host, len(packed), self._cbits))
        await flush_run()
        await self._finalize_refcount_blocks()

    async def _process(self, runs: list[tuple[int, Buffer]]) -> None:
        for first, buf in runs:
            if self._compress:
                await self._submit(first, buf)
            else:
                await self._write_plain(first, buf)

    async def write(self, extent: Extent) -> None:
        if self._finished:
            raise FormatError("write after finish", fmt=FMT)
        await self._process(self._feed.feed(extent))

    # ----------------------------------------------------------------- finish

    async def finish(self) -> None:
        if self._finished:
            return
        try:
            await self._process(self._feed.flush())
            while self._jobs:
                await self._complete_job()
            await self._flush_l2()
            await self._finalize_refcount_blocks()
            await self._write_tail_metadata()
        finally:
            await self.abort()  # nothing is left in flight unless finishing failed
        self._finished = True

    async def abort(self) -> None:
        """Drop compression jobs and writes still in flight (the output is incomplete)."""
        jobs = [fut for _, fut, _ in self._jobs]
        self._jobs.clear()
        for fut in jobs:
            fut.cancel()
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        await self._wb.cancel()

    async def _write_tail_metadata(self) -> None:
        cs = self._cs
        hdr = self._hdr
        # L1 table.
        hdr.l1_size = len(self._l1)
        if self._l1:
            l1_clusters = L.div_round_up(len(self._l1) * 8, cs)
            hdr.l1_table_offset = self._alloc_clusters(l1_clusters)
            await self._sink.write_at(
                hdr.l1_table_offset, _pack64(self._l1, pad_to=l1_clusters * cs)
            )
        await self._finalize_refcount_blocks()
        # Remaining refcount blocks and the refcount table, covering themselves.
        self._end = L.round_up(self._end, cs)
        used = self._end // cs
        per = self._rc_per_block
        blocks = table = 0
        while True:
            total = used + blocks + table
            need_blocks = L.div_round_up(total, per)
            new = (need_blocks - len(self._rc_blocks), L.div_round_up(need_blocks * 8, cs))
            if new == (blocks, table):
                break
            blocks, table = new
        block_host = self._alloc_clusters(blocks)
        table_host = self._alloc_clusters(table)
        for b in range(blocks):
            chunk = self._rc[b * per : (b + 1) * per]
            await self._sink.write_at(block_host + b * cs, _pack16(chunk, pad_to=cs))
            self._rc_blocks.append(block_host + b * cs)
        await self._sink.write_at(
            table_host, _pack64(array("Q", self._rc_blocks), pad_to=table * cs)
        )
        hdr.refcount_table_offset = table_host
        hdr.refcount_table_clusters = table
        await self._wb.drain()
        await self._sink.truncate(self._end)
        await self._sink.write_at(0, _header_cluster(hdr))
        await self._sink.flush()


# --------------------------------------------------------------------------- streaming


def _merge_clusters(
    ranges: list[tuple[int, int]], cluster_size: int, limit: int
) -> list[tuple[int, int]]:
    """Byte ranges -> sorted, merged ``[first, end)`` cluster-index intervals."""
    spans = []
    for off, length in ranges:
        start, stop = max(off, 0), min(off + length, limit)
        if stop > start:
            spans.append((start // cluster_size, L.div_round_up(stop, cluster_size)))
    spans.sort()
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Qcow2StreamWriter(ImageWriter):
    """qcow2 as one sequential stream, layout computed from the allocation map."""

    format: ClassVar[str] = FMT
    streamable: ClassVar[bool] = True
    needs_allocation_map: ClassVar[bool] = True

    def __init__(
        self, sink: SequentialSink, virtual_size: int, options: WriterOptions | None = None
    ) -> None:
        super().__init__(virtual_size)
        options = options or WriterOptions()
        if options.compress:
            raise FormatError(
                "compressed qcow2 cannot be streamed; write it to a seekable target", fmt=FMT
            )
        version, cbits, size = _parse_options(virtual_size, options)
        self._sink = sink
        self._hdr = _header(version, cbits, size)
        self._cs = 1 << cbits
        self._l2_entries = L.l2_entries_per_table(self._cs, False)
        self._feed = ClusterFeed(self._cs, virtual_size)
        self._mapped: list[tuple[int, int]] | None = None
        self._started = False
        self._finished = False
        # Data phase cursor: next mapped cluster to emit is _mapped[_iv][0] + ... _next.
        self._iv = 0
        self._next = 0
        self._data_off = 0
        self._total = 0

    async def set_allocation_map(self, ranges: list[tuple[int, int]]) -> None:
        if self._started:
            raise FormatError("allocation map given after data", fmt=FMT)
        self._mapped = _merge_clusters(ranges, self._cs, self._hdr.size)

    def _l2_tables(self) -> list[tuple[int, int]]:
        assert self._mapped is not None
        per = self._l2_entries
        out: list[tuple[int, int]] = []
        for a, b in self._mapped:
            t0, t1 = a // per, (b - 1) // per + 1
            if out and t0 <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], t1))
            else:
                out.append((t0, t1))
        return out

    async def _write_zeros(self, length: int) -> None:
        while length:
            n = min(length, 1 << 20)
            await self._sink.write(zeros(n))
            length -= n

    async def _start(self) -> None:
        if self._started:
            return
        if self._mapped is None:
            raise FormatError("streaming qcow2 needs set_allocation_map() before any data", fmt=FMT)
        self._started = True
        cs = self._cs
        hdr = self._hdr
        tables = self._l2_tables()
        n_l2 = sum(b - a for a, b in tables)
        n_data = sum(b - a for a, b in self._mapped)
        l1_entries = L.l1_entries_needed(hdr.size, cs)
        l1_clusters = L.div_round_up(l1_entries * 8, cs)
        blocks, rt_clusters = L.refcount_layout(1 + l1_clusters + n_l2 + n_data, cs)
        hdr.l1_size = l1_entries
        hdr.l1_table_offset = cs if l1_entries else 0
        hdr.refcount_table_offset = cs * (1 + l1_clusters)
        hdr.refcount_table_clusters = rt_clusters
        blocks_off = hdr.refcount_table_offset + rt_clusters * cs
        l2_off = blocks_off + blocks * cs
        self._data_off = l2_off + n_l2 * cs
        self._total = 1 + l1_clusters + rt_clusters + blocks + n_l2 + n_data

        await self._sink.write(_header_cluster(hdr))
        # L1 table.
        if l1_entries:
            l1 = array("Q", bytes(8 * l1_entries))
            rank = 0
            for a, b in tables:
                for t in range(a, b):
                    l1[t] = (l2_off + rank * cs) | L.OFLAG_COPIED
                    rank += 1
            await self._sink.write(_pack64(l1, pad_to=l1_clusters * cs))
        # Refcount table and blocks: every cluster of the file has refcount 1.
        await self._sink.write(
            _pack64(
                array("Q", (blocks_off + k * cs for k in range(blocks))),
                pad_to=rt_clusters * cs,
            )
        )
        per = cs * 8 // 16
        full = _pack16(array("H", [1]) * per)
        for k in range(blocks):
            count = min(per, self._total - k * per)
            block = full if count == per else _pack16(array("H", [1]) * count, pad_to=cs)
            await self._sink.write(block)
        # L2 tables.
        for table in self._l2_entries_stream(tables):
            await self._sink.write(table)

    def _l2_entries_stream(self, tables: list[tuple[int, int]]) -> Iterator[bytes]:
        assert self._mapped is not None
        per = self._l2_entries
        cs = self._cs
        mapped = self._mapped
        iv = 0
        rank = 0  # mapped clusters before mapped[iv]
        for a, b in tables:
            for t in range(a, b):
                entries = array("Q", bytes(8 * per))
                lo, hi = t * per, (t + 1) * per
                while iv < len(mapped) and mapped[iv][1] <= lo:
                    rank += mapped[iv][1] - mapped[iv][0]
                    iv += 1
                j, r = iv, rank
                while j < len(mapped) and mapped[j][0] < hi:
                    c0, c1 = max(mapped[j][0], lo), min(mapped[j][1], hi)
                    base = self._data_off + (r + c0 - mapped[j][0]) * cs
                    for c in range(c0, c1):
                        entries[c - lo] = (base + (c - c0) * cs) | L.OFLAG_COPIED
                    if mapped[j][1] > hi:
                        break
                    r += mapped[j][1] - mapped[j][0]
                    j += 1
                yield _pack64(entries)

    async def _emit_zero_until(self, cluster: int) -> None:
        """Emit zero clusters for every mapped cluster below ``cluster`` not yet written."""
        assert self._mapped is not None
        while self._iv < len(self._mapped):
            a, b = self._mapped[self._iv]
            if a >= cluster:
                return
            lo, hi = max(self._next, a), min(b, cluster)
            if lo < hi:
                await self._write_zeros((hi - lo) * self._cs)
                self._next = hi
            if hi < b:
                return
            self._iv += 1

    async def _emit(self, first: int, buf: Buffer) -> None:
        assert self._mapped is not None
        cs = self._cs
        view = memoryview(buf)
        count = len(buf) // cs
        await self._emit_zero_until(first)
        c = first
        end = first + count
        while c < end:
            if self._iv < len(self._mapped) and self._mapped[self._iv][0] <= c:
                b = self._mapped[self._iv][1]
                stop = min(b, end)
                await self._sink.write(view[(c - first) * cs : (stop - first) * cs])
                self._next = stop
                if stop == b:
                    self._iv += 1
                c = stop
            else:
                nxt = self._mapped[self._iv][0] if self._iv < len(self._mapped) else end
                stop = min(nxt, end)
                if not is_zero(view, (c - first) * cs, (stop - first) * cs):
                    raise FormatError(
                        f"data at virtual offset {c * cs} is outside the allocation map",
                        fmt=FMT,
                    )
                c = stop

    async def write(self, extent: Extent) -> None:
        if self._finished:
            raise FormatError("write after finish", fmt=FMT)
        runs = self._feed.feed(extent)
        await self._start()
        for first, buf in runs:
            await self._emit(first, buf)

    async def finish(self) -> None:
        if self._finished:
            return
        await self._start()
        for first, buf in self._feed.flush():
            await self._emit(first, buf)
        await self._emit_zero_until(L.div_round_up(self._hdr.size, self._cs))
        self._finished = True


def create_qcow2_writer(
    sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
) -> Qcow2Writer | Qcow2StreamWriter:
    if isinstance(sink, SeekableSink):
        return Qcow2Writer(sink, virtual_size, options)
    if isinstance(sink, SequentialSink):
        return Qcow2StreamWriter(sink, virtual_size, options)
    raise FormatError("the qcow2 writer needs a seekable or sequential sink", fmt=FMT)
