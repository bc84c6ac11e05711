"""streamOptimized VMDK: the sequential reader (marker walk) and the writer.

Layout of a streamOptimized extent (VMware Virtual Disk Format 5.0, "Stream-Optimized
Compressed Sparse Extents")::

    header (gdOffset = GD_AT_END) | descriptor | padding to overHead
    { grain marker (lba, size) + zlib data, padded to a sector }*
    { GT marker + grain table }* after the grains it covers
    GD marker + grain directory | footer marker + footer (header copy) | EOS marker

qemu-img writes a variant: the grain directory and tables sit in the overhead area at
the front (header gdOffset set) and the file may end without an EOS marker. The
sequential reader accepts both: for the VMware layout it requires the footer and the
EOS marker; for the qemu layout it counts the allocated grains in the tables at the
front and requires exactly that many grain markers; any other layout must end with the
EOS marker. A truncated stream is an error either way. Grains must appear in increasing
LBA order (every known producer does that); a random-access source is read through the
grain tables instead (:mod:`app.formats.vmdk`), which has no ordering requirement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from app.formats.base import (
    SECTOR,
    Extent,
    FormatError,
    ImageWriter,
    SeekableSink,
    SequentialSink,
    WriterOptions,
)
from app.formats.buffers import is_zero
from app.formats.vdisk_common import (
    ExtentBuilder,
    StreamReader,
    compute_pool,
    deflate,
    inflate_bounded,
)
from app.formats.vmdk_meta import (
    ADAPTER_TYPES,
    COMPRESS_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    FMT,
    GD_AT_END,
    GRAIN_MARKER_SIZE,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    MAX_GRAIN_SECTORS,
    NL_CHARS,
    SparseHeader,
    build_descriptor,
    pack_grain_marker,
    pack_meta_marker,
    unpack_meta_marker,
)

#: Grains read and inflated together (split over the compute pool's threads), by the
#: streamOptimized walker and the monolithicSparse reader alike.
BATCH_GRAINS = 64


def max_compressed_size(grain_bytes: int) -> int:
    """Largest compressed grain accepted: deflate of incompressible data grows a little;
    qemu's reader allows twice the grain size, and so do we."""
    return 2 * grain_bytes + SECTOR


def _u32_le(data: bytes) -> list[int]:
    arr = array("I")
    arr.frombytes(data[: len(data) // 4 * 4])
    if sys.byteorder == "big":  # pragma: no cover - little-endian hosts in practice
        arr.byteswap()
    return arr.tolist()


def _u32_le_bytes(arr: array[int]) -> bytes:
    if sys.byteorder == "big":  # pragma: no cover
        arr = array("I", arr)
        arr.byteswap()
    return arr.tobytes()


async def _count_front_tables(rd: StreamReader, hdr: SparseHeader) -> int | None:
    """qemu layout: read the GD and GTs that sit before the grains and count the grains
    they reference. None when the tables are not laid out where a stream can see them."""
    overhead = hdr.overhead * SECTOR
    gd_start = hdr.gd_offset * SECTOR
    gd_len = hdr.num_gts * 4
    if gd_start < rd.pos or gd_start + gd_len > overhead:
        return None
    await rd.skip(gd_start - rd.pos, "metadata")
    gd = _u32_le(await rd.read_exact(gd_len, "grain directory"))
    tables = Counter(e for e in gd if e)
    count = 0
    for sector in sorted(tables):
        start = sector * SECTOR
        if start < rd.pos or start + hdr.gt_bytes > overhead:
            return None
        await rd.skip(start - rd.pos, "metadata")
        gt = _u32_le(await rd.read_exact(hdr.gt_bytes, "grain table"))
        count += tables[sector] * sum(1 for e in gt if e > 1)
    return count


#: One compressed grain on its way to be inflated: virtual offset, compressed bytes,
#: file offset of its marker (for error messages).
Grain = tuple[int, bytes | memoryview, int]


def _inflate_run(grains: list[Grain], grain_bytes: int, vsize: int) -> list[tuple[int, bytes]]:
    """Inflate ``grains`` (in increasing offset order) in the calling thread; grains
    that follow each other on the disk are joined into one buffer, so the extents built
    from them need no further copy. Returns ``(virtual offset, data)`` runs."""
    runs: list[tuple[int, bytes]] = []
    parts: list[bytes] = []
    run_start = run_end = 0
    for voff, comp, where in grains:
        data = inflate_bounded(comp, grain_bytes, FMT, where)
        length = min(grain_bytes, vsize - voff)
        if len(data) != length:  # a short grain reads as zeros after its data
            data = data[:length] + bytes(max(0, length - len(data)))
        if parts and voff != run_end:
            runs.append((run_start, parts[0] if len(parts) == 1 else b"".join(parts)))
            parts = []
        if not parts:
            run_start = run_end = voff
        parts.append(data)
        run_end += length
    if parts:
        runs.append((run_start, parts[0] if len(parts) == 1 else b"".join(parts)))
    return runs


async def inflate_grains(
    grains: list[Grain], grain_bytes: int, vsize: int
) -> list[tuple[int, bytes]]:
    """Inflate a batch of grains on every core of the shared compute pool (one
    contiguous slice of the batch per thread, one thread-pool round trip each);
    returns the ``(virtual offset, data)`` runs in order."""
    if not grains:
        return []
    loop = asyncio.get_running_loop()
    pool = compute_pool()
    step = -(-len(grains) // min(len(grains), os.cpu_count() or 1))
    futs = [
        loop.run_in_executor(pool, _inflate_run, grains[i : i + step], grain_bytes, vsize)
        for i in range(0, len(grains), step)
    ]
    return [run for runs in await asyncio.gather(*futs) for run in runs]


def emit_runs(builder: ExtentBuilder, runs: list[tuple[int, bytes]]) -> list[Extent]:
    """Hand inflated runs to ``builder``; the gaps between them are zeros."""
    out: list[Extent] = []
    for voff, data in runs:
        if voff > builder.pos:
            out += builder.zero(builder.pos, voff - builder.pos)
        out += builder.data(voff, data)
    return out


async def walk_stream(
    rd: StreamReader, hdr: SparseHeader, chunk_size: int
) -> AsyncIterator[Extent]:
    """Extents of a streamOptimized extent read front to back from ``rd``.

    ``rd`` is positioned after the header and descriptor.
    """
    grain_bytes = hdr.grain_bytes
    gs = hdr.grain_size
    vsize = hdr.capacity * SECTOR
    max_comp = max_compressed_size(grain_bytes)
    meta_limit = max(-(-hdr.num_gts * 4 // SECTOR), -(-hdr.gt_bytes // SECTOR)) + 128
    tables_in_front = hdr.gd_offset != GD_AT_END
    expected: int | None = None
    if tables_in_front:
        expected = await _count_front_tables(rd, hdr)
    start = max(hdr.overhead * SECTOR, -(-rd.pos // SECTOR) * SECTOR)
    await rd.skip(start - rd.pos, "metadata before the first grain")

    builder = ExtentBuilder(chunk_size)
    next_lba = 0
    seen = 0
    saw_eos = False
    saw_footer = False
    batch: list[Grain] = []
    pending: asyncio.Future[list[tuple[int, bytes]]] | None = None
    try:
        while True:
            if await rd.at_eof():
                break
            marker_off = rd.pos
            sector = await rd.read_exact(SECTOR, "marker")
            num, size, mtype = unpack_meta_marker(sector)
            if size:
                lba = num
                if lba % gs or lba >= hdr.capacity or lba < next_lba:
                    what = (
                        "is not grain aligned" if lba % gs
                        else "is past the end of the disk" if lba >= hdr.capacity
                        else "is out of order (a stream must be in increasing LBA order)"
                    )  # fmt: skip
                    raise FormatError(f"grain marker LBA {lba} {what}", fmt=FMT, offset=marker_off)
                if size > max_comp:
                    raise FormatError(
                        f"compressed grain of {size} bytes is larger than allowed",
                        fmt=FMT,
                        offset=marker_off,
                    )
                total = -(-(GRAIN_MARKER_SIZE + size) // SECTOR) * SECTOR
                rest = await rd.read_exact(total - SECTOR, "grain") if total > SECTOR else b""
                comp = memoryview(sector + rest)[GRAIN_MARKER_SIZE : GRAIN_MARKER_SIZE + size]
                batch.append((lba * SECTOR, comp, marker_off))
                next_lba = lba + gs
                seen += 1
                if len(batch) >= BATCH_GRAINS:
                    if pending is not None:
                        for ext in emit_runs(builder, await pending):
                            yield ext
                    pending = asyncio.ensure_future(inflate_grains(batch, grain_bytes, vsize))
                    batch = []
                continue
            # A metadata marker: finish the grains seen so far first.
            if pending is not None:
                for ext in emit_runs(builder, await pending):
                    yield ext
                pending = None
            if batch:
                runs = await inflate_grains(batch, grain_bytes, vsize)
                batch = []
                for ext in emit_runs(builder, runs):
                    yield ext
            if mtype == MARKER_EOS:
                saw_eos = True
                break
            if mtype not in (MARKER_GT, MARKER_GD, MARKER_FOOTER):
                raise FormatError(f"unknown marker type {mtype}", fmt=FMT, offset=marker_off)
            if num > meta_limit:
                raise FormatError(
                    f"metadata marker claims {num} sectors", fmt=FMT, offset=marker_off
                )
            if mtype == MARKER_FOOTER:
                if num < 1:
                    raise FormatError("empty footer", fmt=FMT, offset=marker_off)
                footer_off = rd.pos
                footer = SparseHeader.parse(
                    await rd.read_exact(SECTOR, "footer"),
                    max_virtual_size=vsize,
                    offset=footer_off,
                    what="footer",
                )
                if (footer.capacity, footer.grain_size) != (hdr.capacity, hdr.grain_size):
                    raise FormatError(
                        "footer disagrees with the header", fmt=FMT, offset=footer_off
                    )
                saw_footer = True
                await rd.skip((num - 1) * SECTOR, "footer")
            else:
                await rd.skip(num * SECTOR, "grain table" if mtype == MARKER_GT else "directory")
        if pending is not None:
            for ext in emit_runs(builder, await pending):
                yield ext
            pending = None
        for ext in emit_runs(builder, await inflate_grains(batch, grain_bytes, vsize)):
            yield ext
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending

    if expected is not None:  # qemu's layout: the tables at the front say what must follow
        if seen != expected:
            raise FormatError(
                f"stream holds {seen} grains but the grain tables list {expected}: "
                "the file is truncated or damaged",
                fmt=FMT,
                offset=rd.pos,
            )
    else:
        if not saw_eos:
            raise FormatError(
                "stream ended before the end-of-stream marker (truncated)", fmt=FMT, offset=rd.pos
            )
        if not tables_in_front and not saw_footer:
            raise FormatError("stream has no footer (truncated or damaged)", fmt=FMT, offset=rd.pos)
    if builder.pos < vsize:
        for ext in builder.zero(builder.pos, vsize - builder.pos):
            yield ext
    for ext in builder.finish():
        yield ext


# --- writer ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmdkWriterOptions(WriterOptions):
    """VMDK-specific writer knobs on top of :class:`WriterOptions`.

    - ``adapter_type``: ``ddb.adapterType`` (vSphere: ``lsilogic``, ``pvscsi``, ``ide``...)
    - ``hw_version``: ``ddb.virtualHWVersion``.
    - ``filename``: name recorded in the extent line (defaults to the sink's file name).
    """

    adapter_type: str = "lsilogic"
    hw_version: str = "4"
    filename: str | None = None


DEFAULT_GRAIN = 64 * 1024
_OVERHEAD_SECTORS = 128  # header + descriptor, padded to 64 KiB like VMware does
_DESCRIPTOR_SECTORS = 20
_OUT_FLUSH = 4 * 1024 * 1024


def _compress_grain(data: bytes, level: int) -> bytes | None:
    """Runs in the pool: None for an all-zero grain, else its zlib stream."""
    if is_zero(data):
        return None
    return deflate(data, level)


class StreamOptimizedWriter(ImageWriter):
    """Writes a VMware-layout streamOptimized extent as a pure stream.

    Grains are compressed in the shared thread pool, several in flight, and written in
    order. All-zero grains and zero extents are never written. Virtual sizes that are not
    a whole number of sectors are rounded up to the next sector (VMDK counts sectors).
    """

    format: ClassVar[str] = "vmdk"
    streamable: ClassVar[bool] = True

    def __init__(
        self, sink: SequentialSink | SeekableSink, virtual_size: int, options: WriterOptions
    ) -> None:
        super().__init__(virtual_size)
        grain_bytes = options.cluster_size or DEFAULT_GRAIN
        if (
            grain_bytes & (grain_bytes - 1)
            or not 4096 <= grain_bytes <= MAX_GRAIN_SECTORS * SECTOR
        ):
            raise FormatError(
                f"grain size {grain_bytes} must be a power of two between 4 KiB and 2 MiB",
                fmt=FMT,
            )
        vopts = options if isinstance(options, VmdkWriterOptions) else VmdkWriterOptions()
        if vopts.adapter_type not in ADAPTER_TYPES:
            raise FormatError(f"unknown adapter type {vopts.adapter_type!r}", fmt=FMT)
        if not 1 <= options.compression_level <= 9:
            raise FormatError("compression level must be 1-9", fmt=FMT)
        self._sink = sink
        self._level = options.compression_level
        self._grain_bytes = grain_bytes
        capacity = -(-virtual_size // SECTOR)
        self._capacity_bytes = capacity * SECTOR
        self._header = SparseHeader(
            version=3,
            flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity=capacity,
            grain_size=grain_bytes // SECTOR,
            descriptor_offset=1,
            descriptor_size=_DESCRIPTOR_SECTORS,
            num_gtes_per_gt=512,
            rgd_offset=0,
            gd_offset=GD_AT_END,
            overhead=_OVERHEAD_SECTORS,
            unclean_shutdown=False,
            nl_chars=NL_CHARS,
            compress_algorithm=COMPRESS_DEFLATE,
        )
        name = vopts.filename or getattr(getattr(sink, "path", None), "name", None) or "disk.vmdk"
        self._descriptor = build_descriptor(
            capacity=capacity,
            filename=str(name),
            adapter_type=vopts.adapter_type,
            hw_version=vopts.hw_version,
        )
        if len(self._descriptor) > _DESCRIPTOR_SECTORS * SECTOR:
            raise FormatError("descriptor too long", fmt=FMT)
        self._gd = array("I", bytes(4 * self._header.num_gts))
        self._gt = array("I", bytes(4 * 512))
        self._gt_index = -1
        self._gt_used = False
        self._out = bytearray()
        self._file_pos = 0
        self._written = 0
        self._cur_index = -1
        self._cur_buf: bytearray | None = None
        self._next = 0
        self._inflight: deque[tuple[int, asyncio.Future[bytes | None]]] = deque()
        self._max_inflight = max(8, 4 * (os.cpu_count() or 2))
        self._started = False
        self._finished = False

    # -- output plumbing
    async def _flush_out(self) -> None:
        if not self._out:
            return
        data = bytes(self._out)
        self._out = bytearray()
        write = getattr(self._sink, "write", None)
        if write is not None:
            await write(data)
        else:
            await self._sink.write_at(self._written, data)  # type: ignore[union-attr]
        self._written += len(data)

    async def _emit(self, data: bytes | bytearray | memoryview) -> None:
        self._out += data
        self._file_pos += len(data)
        if len(self._out) >= _OUT_FLUSH:
            await self._flush_out()

    async def _pad_sector(self) -> None:
        rem = self._file_pos % SECTOR
        if rem:
            await self._emit(bytes(SECTOR - rem))

    async def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        await self._emit(self._header.pack())
        await self._emit(self._descriptor.ljust(_DESCRIPTOR_SECTORS * SECTOR, b"\0"))
        await self._emit(bytes((_OVERHEAD_SECTORS - 1 - _DESCRIPTOR_SECTORS) * SECTOR))

    # -- grain tables
    async def _close_gt(self) -> None:
        if self._gt_index < 0 or not self._gt_used:
            return
        await self._emit(pack_meta_marker(self._header.gt_bytes // SECTOR, MARKER_GT))
        self._gd[self._gt_index] = self._file_pos // SECTOR
        await self._emit(_u32_le_bytes(self._gt))
        await self._pad_sector()
        self._gt = array("I", bytes(4 * 512))
        self._gt_used = False

    async def _drain_one(self) -> None:
        index, fut = self._inflight.popleft()
        comp = await fut
        if comp is None:
            return
        gt_index = index // 512
        if gt_index != self._gt_index:
            await self._close_gt()
            self._gt_index = gt_index
        self._gt[index % 512] = self._file_pos // SECTOR
        self._gt_used = True
        lba = index * self._header.grain_size
        await self._emit(pack_grain_marker(lba, len(comp)))
        await self._emit(comp)
        await self._pad_sector()

    async def _submit(self, index: int, data: bytes) -> None:
        await self._ensure_started()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(compute_pool(), _compress_grain, data, self._level)
        self._inflight.append((index, fut))
        while len(self._inflight) > self._max_inflight:
            await self._drain_one()

    async def _flush_current(self) -> None:
        if self._cur_buf is not None:
            buf, self._cur_buf = self._cur_buf, None
            await self._submit(self._cur_index, bytes(buf))
        self._cur_index = -1

    # -- ImageWriter
    async def write(self, extent: Extent) -> None:
        if self._finished:
            raise FormatError("write after finish", fmt=FMT)
        if extent.offset < self._next:
            raise FormatError(
                f"extent at {extent.offset} is before the previous end {self._next}", fmt=FMT
            )
        if extent.end > self._capacity_bytes:
            raise FormatError(
                f"extent ends at {extent.end}, past the virtual size {self.virtual_size}", fmt=FMT
            )
        self._next = extent.end
        if extent.data is None:
            return
        gb = self._grain_bytes
        view = memoryview(extent.data)
        pos = extent.offset
        i = 0
        n_total = len(view)
        while i < n_total:
            index, in_off = divmod(pos, gb)
            n = min(gb - in_off, n_total - i)
            if index != self._cur_index:
                await self._flush_current()
                if in_off == 0 and n == gb:
                    await self._submit(index, bytes(view[i : i + n]))
                    pos += n
                    i += n
                    continue
                self._cur_index = index
                self._cur_buf = bytearray(gb)
            assert self._cur_buf is not None
            self._cur_buf[in_off : in_off + n] = view[i : i + n]
            pos += n
            i += n
            if in_off + n == gb:
                await self._flush_current()

    async def finish(self) -> None:
        if self._finished:
            return
        await self._flush_current()
        while self._inflight:
            await self._drain_one()
        await self._ensure_started()
        await self._close_gt()
        gd_bytes = _u32_le_bytes(self._gd)
        await self._emit(pack_meta_marker(-(-len(gd_bytes) // SECTOR), MARKER_GD))
        gd_sector = self._file_pos // SECTOR
        await self._emit(gd_bytes)
        await self._pad_sector()
        await self._emit(pack_meta_marker(1, MARKER_FOOTER))
        await self._emit(self._header.with_gd(gd_sector).pack())
        await self._emit(pack_meta_marker(0, MARKER_EOS))
        await self._flush_out()
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            await flush()
        self._finished = True

    async def abort(self) -> None:
        """Drop in-flight work (the output is incomplete)."""
        for _, fut in self._inflight:
            fut.cancel()
        self._inflight.clear()
