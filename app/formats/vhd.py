"""VHD (Microsoft Virtual Hard Disk, "vpc"): fixed and dynamic disks.

Reading (random access only):

- **fixed**: data then a 512-byte footer at the end; holes in the file are skipped.
- **dynamic**: footer copy at the start, dynamic header, BAT and blocks, each with a
  sector bitmap that is honoured (sectors whose bit is 0 read as zeros). If the
  trailing footer is damaged the copy at the start is used, as the specification says.

The virtual size is the footer's ``current_size``. qemu instead uses the CHS geometry
for images whose creator application is not one of ``win ``, ``qem2``, ``d2v ``,
``tap\\0`` or ``CTXS`` (unless the geometry is the 65535x16x255 maximum), so it may
report less than ``current_size`` for Virtual PC / VirtualBox images; this reader takes
``current_size`` as the specification intends.

Refused with :class:`~app.formats.base.FormatError`: differencing disks, unknown disk
types, bad cookies or checksums, headers/BAT/blocks past the end of the file, block
sizes that are not a power of two between 512 bytes and 256 MiB, a BAT too small for
the disk, and sizes above ``max_virtual_size``.

Writing: see :mod:`app.formats.vhd_writer` (fixed: streamable; dynamic: on a seekable
sink, or streamable after :meth:`set_allocation_map`).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

from app.formats import probes
from app.formats.base import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_VIRTUAL_SIZE,
    SECTOR,
    Extent,
    FormatError,
    ImageInfo,
    ImageReader,
    ImageWriter,
    RandomAccessSource,
    SeekableSink,
    SequentialSink,
    SequentialSource,
    WriterOptions,
)
from app.formats.probes import VHD_COOKIE
from app.formats.raw import prefetch_reads
from app.formats.vdisk_common import (
    ExtentBuilder,
    HostHoles,
    read_exact_at,
)
from app.formats.vhd_meta import (
    FMT,
    NO_DATA_OFFSET,
    TYPE_DIFFERENCING,
    TYPE_DYNAMIC,
    TYPE_FIXED,
    TYPE_NAMES,
    UNUSED_BAT,
    DynamicHeader,
    Footer,
    bitmap_bytes,
    bitmap_runs,
)
from app.formats.vhd_writer import VhdDynamicWriter, VhdFixedWriter, VhdWriterOptions

__all__ = [
    "VhdDynamicWriter",
    "VhdFixedWriter",
    "VhdReader",
    "VhdWriterOptions",
    "create_writer",
    "open_reader",
    "probe",
]

MIN_BLOCK = SECTOR
MAX_BLOCK = 256 * 1024 * 1024


probe = probes.vhd


class VhdReader(ImageReader):
    format: ClassVar[str] = "vhd"
    needs_random_access: ClassVar[bool] = True

    def __init__(
        self,
        source: RandomAccessSource,
        footer: Footer,
        *,
        dyn: DynamicHeader | None = None,
        bat: list[int] | None = None,
        details: dict[str, str | int | bool] | None = None,
    ) -> None:
        self._source = source
        self._footer = footer
        self._dyn = dyn
        self._bat = bat
        self._used = False
        info_details: dict[str, str | int | bool] = {
            "creator_app": footer.creator_app.decode("latin-1"),
            "chs_size": footer.chs_size,
        }
        info_details.update(details or {})
        self.info = ImageInfo(
            format=FMT,
            virtual_size=footer.current_size,
            subformat=TYPE_NAMES.get(footer.disk_type, "?"),
            cluster_size=dyn.block_size if dyn else None,
            details=info_details,
        )

    async def close(self) -> None:
        await self._source.close()

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        vsize = self.virtual_size
        if self._dyn is None or self._bat is None:
            ranges = await self._source.data_ranges()
            if ranges is None:
                return [(0, vsize)] if vsize else []
            return [(o, min(o + n, vsize) - o) for o, n in ranges if o < vsize]
        bs = self._dyn.block_size
        out: list[tuple[int, int]] = []
        for b, entry in enumerate(self._bat):
            if entry == UNUSED_BAT:
                continue
            off = b * bs
            length = min(bs, vsize - off)
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((off, length))
        return out

    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        if self._used:
            raise FormatError("extents() can be iterated once per reader", fmt=FMT)
        self._used = True
        if self._dyn is None:
            return self._fixed_extents(chunk_size)
        return self._dynamic_extents(chunk_size)

    async def _read_runs(
        self, builder: ExtentBuilder, voff: int, foff: int, length: int, chunk_size: int
    ) -> AsyncIterator[Extent]:
        """Data at file offset ``foff`` for virtual ``[voff, voff+length)``, in chunks."""
        pos = 0
        while pos < length:
            n = min(chunk_size, length - pos)
            data = await read_exact_at(self._source, foff + pos, n, FMT, "disk data")
            for ext in builder.data(voff + pos, data):
                yield ext
            pos += n

    async def _fixed_extents(self, chunk_size: int) -> AsyncIterator[Extent]:
        vsize = self.virtual_size
        builder = ExtentBuilder(chunk_size)
        ranges = await self._source.data_ranges()
        if ranges is None:
            ranges = [(0, vsize)]
        for off, length in ranges:
            end = min(off + length, vsize)
            if end <= off:
                continue
            for ext in builder.zero(builder.pos, off - builder.pos):
                yield ext
            async for ext in self._read_runs(builder, off, off, end - off, chunk_size):
                yield ext
        for ext in builder.zero(builder.pos, vsize - builder.pos):
            yield ext
        for ext in builder.finish():
            yield ext

    def _block_layout(self, holes: HostHoles, b: int) -> list[tuple[int, int, bool]]:
        """The file range of allocated block ``b`` (its bitmap, then its sectors) as
        ``(file offset, length, is_data)`` runs; holes in the file read as zeros."""
        assert self._dyn is not None
        assert self._bat is not None
        bs = self._dyn.block_size
        sectors = -(-min(bs, self.virtual_size - b * bs) // SECTOR)
        return holes.split(self._bat[b] * SECTOR, bitmap_bytes(bs) + sectors * SECTOR)

    def _block_reads(self, holes: HostHoles, chunk_size: int) -> Iterator[tuple[int, int]]:
        """File ranges to read for the allocated blocks, in disk order: the data runs of
        each block's layout, cut into pieces of at most ``chunk_size`` bytes (more for a
        piece that starts with the bitmap, so it comes with some sectors)."""
        assert self._dyn is not None
        assert self._bat is not None
        step = max(chunk_size, bitmap_bytes(self._dyn.block_size) + SECTOR)
        for b, entry in enumerate(self._bat[: -(-self.virtual_size // self._dyn.block_size)]):
            if entry == UNUSED_BAT:
                continue
            for pos, length, is_data in self._block_layout(holes, b):
                end = pos + length
                while is_data and pos < end:
                    yield pos, min(step, end - pos)
                    pos += step

    async def _block_pieces(
        self, holes: HostHoles, b: int,
        reads: AsyncIterator[tuple[int, bytes | memoryview]],
    ) -> AsyncIterator[bytes | memoryview | int]:
        """Allocated block ``b``'s file range in order (bitmap, then sectors): data as
        :meth:`_block_reads` planned it, taken from ``reads``, and each hole as an int
        (that many zero bytes)."""
        for _, run, is_data in self._block_layout(holes, b):
            if not is_data:
                yield run
                continue
            got = 0
            while got < run:
                _, piece = await anext(reads)
                got += len(piece)
                yield piece

    async def _dynamic_extents(self, chunk_size: int) -> AsyncIterator[Extent]:
        assert self._dyn is not None
        assert self._bat is not None
        vsize = self.virtual_size
        bs = self._dyn.block_size
        bm_len = bitmap_bytes(bs)
        builder = ExtentBuilder(chunk_size)
        holes = HostHoles(await self._source.data_ranges())
        # Bitmap and data of a block come in one read, a few reads ahead of us; holes in
        # the file are not read at all. A block's data goes out piece by piece as it
        # arrives (never the whole block at once: blocks may be up to 256 MiB).
        plan = self._block_reads(holes, chunk_size)
        reads = prefetch_reads(self._source, plan, fmt=FMT)
        try:
            for b in range(-(-vsize // bs)):
                start = b * bs
                length = min(bs, vsize - start)
                if self._bat[b] == UNUSED_BAT:
                    for ext in builder.zero(start, length):
                        yield ext
                    continue
                head = bytearray()
                block: _BlockBitmap | None = None
                pos = 0  # offset in the block's data of the next piece
                async for piece in self._block_pieces(holes, b, reads):
                    size = piece if isinstance(piece, int) else len(piece)
                    if block is None:  # still reading the bitmap
                        take = min(size, bm_len - len(head))
                        head += bytes(take) if isinstance(piece, int) else piece[:take]
                        if len(head) < bm_len:
                            continue
                        block = _BlockBitmap(bitmap_runs(bytes(head), -(-length // SECTOR)))
                        size -= take
                        piece = size if isinstance(piece, int) else memoryview(piece)[take:]
                    n = min(size, length - pos)
                    if n > 0:
                        for ext in block.emit(builder, start, pos, piece, n):
                            yield ext
                    pos += size
        finally:
            await reads.aclose()
        for ext in builder.finish():
            yield ext


class _BlockBitmap:
    """A block's sector bitmap as runs, applied to the block's data piece by piece."""

    def __init__(self, runs: list[tuple[int, int, bool]]) -> None:
        self.runs = runs
        self.all_present = len(runs) == 1 and runs[0][2]
        self._starts = [first * SECTOR for first, _, _ in runs]

    def emit(
        self, builder: ExtentBuilder, start: int, pos: int, piece: bytes | memoryview | int,
        n: int,
    ) -> list[Extent]:
        """Extents for ``n`` bytes of ``piece`` (data, or an int for a hole) at offset
        ``pos`` of the block's data, which starts at virtual offset ``start``: bytes of
        present sectors as data (holes as zeros), absent sectors as zeros."""
        if self.all_present:
            if isinstance(piece, int):
                return builder.zero(start + pos, n)
            return builder.data(start + pos, memoryview(piece)[:n])
        out: list[Extent] = []
        end = pos + n
        i = max(bisect.bisect_right(self._starts, pos) - 1, 0)
        while i < len(self.runs) and self._starts[i] < end:
            first, count, present = self.runs[i]
            i += 1
            lo = max(first * SECTOR, pos)
            hi = min((first + count) * SECTOR, end)
            if hi <= lo:
                continue
            if present and not isinstance(piece, int):
                out += builder.data(start + lo, memoryview(piece)[lo - pos : hi - pos])
            else:
                out += builder.zero(start + lo, hi - lo)
        return out


async def _read_footer(source: RandomAccessSource) -> tuple[Footer, bool]:
    """The footer, and whether it came from the end of the file (False: the copy)."""
    size = source.size
    if size < SECTOR:
        raise FormatError(f"file of {size} bytes is too small for a VHD", fmt=FMT, offset=0)
    tail = await read_exact_at(source, size - SECTOR, SECTOR, FMT, "footer")
    try:
        return Footer.parse(tail, offset=size - SECTOR), True
    except FormatError as tail_error:
        head = await read_exact_at(source, 0, SECTOR, FMT, "footer copy")
        if head[:8] != VHD_COOKIE:
            raise
        try:
            copy = Footer.parse(head, offset=0, what="footer copy")
        except FormatError:
            raise tail_error from None
        if copy.disk_type == TYPE_FIXED:
            raise
        return copy, False


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> ImageReader:
    """Open a fixed or dynamic VHD (see the module docstring)."""
    if not isinstance(source, RandomAccessSource):
        raise FormatError("reading a VHD needs random access (its footer is at the end)", fmt=FMT)
    footer, at_end = await _read_footer(source)
    size = source.size
    vsize = footer.current_size
    if vsize > max_virtual_size:
        raise FormatError(
            f"virtual size {vsize} exceeds the limit of {max_virtual_size} bytes",
            fmt=FMT,
            offset=size - SECTOR + 48 if at_end else 48,
        )
    details: dict[str, str | int | bool] = {"footer_copy_used": not at_end}
    if footer.disk_type == TYPE_DIFFERENCING:
        raise FormatError(
            "differencing VHDs depend on a parent disk and are not supported; merge it first",
            fmt=FMT,
        )
    if footer.disk_type == TYPE_FIXED:
        if size - SECTOR < vsize:
            raise FormatError(
                f"fixed VHD holds {size - SECTOR} data bytes but its footer says {vsize}",
                fmt=FMT,
                offset=size - SECTOR,
            )
        return VhdReader(source, footer, details=details)
    if footer.disk_type != TYPE_DYNAMIC:
        raise FormatError(f"unknown disk type {footer.disk_type}", fmt=FMT, offset=60)
    data_limit = size - SECTOR if at_end else size
    if footer.data_offset == NO_DATA_OFFSET or footer.data_offset + 1024 > data_limit:
        raise FormatError(
            f"dynamic header offset {footer.data_offset:#x} is outside the file", fmt=FMT,
            offset=16,
        )  # fmt: skip
    dyn = DynamicHeader.parse(
        await read_exact_at(source, footer.data_offset, 1024, FMT, "dynamic header"),
        offset=footer.data_offset,
    )
    bs = dyn.block_size
    if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
        raise FormatError(f"block size {bs} is not a power of two in 512 B..256 MiB", fmt=FMT,
                          offset=footer.data_offset + 32)  # fmt: skip
    nblocks = -(-vsize // bs)
    if dyn.max_table_entries < nblocks:
        raise FormatError(
            f"BAT has {dyn.max_table_entries} entries, the disk needs {nblocks}",
            fmt=FMT,
            offset=footer.data_offset + 28,
        )
    bat_raw = await read_exact_at(source, dyn.table_offset, nblocks * 4, FMT, "BAT")
    bat = list(struct.unpack(f">{nblocks}I", bat_raw))
    bm_len = bitmap_bytes(bs)
    for b, entry in enumerate(bat):
        if entry == UNUSED_BAT:
            continue
        needed = bm_len + min(bs, vsize - b * bs)
        if entry * SECTOR + needed > data_limit or entry * SECTOR < SECTOR:
            raise FormatError(
                f"block {b} at sector {entry} lies outside the file's data area",
                fmt=FMT,
                offset=dyn.table_offset + 4 * b,
            )
    details["block_size"] = bs
    return VhdReader(source, footer, dyn=dyn, bat=bat, details=details)


def create_writer(
    sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
) -> ImageWriter:
    """``options.subformat``: ``dynamic`` (default, like qemu-img) or ``fixed``."""
    sub = (options.subformat or "dynamic").lower()
    if sub == "fixed":
        return VhdFixedWriter(sink, virtual_size, options)
    if sub == "dynamic":
        return VhdDynamicWriter(sink, virtual_size, options)
    raise FormatError(f"unknown VHD subformat {options.subformat!r} (fixed or dynamic)", fmt=FMT)
