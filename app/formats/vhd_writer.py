"""VHD writers: fixed (streamable) and dynamic (seekable, or streamable given the
allocation map first).

Size rules (both subformats):

- ``current_size`` and ``original_size`` hold the exact size written. It is the virtual
  size rounded up to a whole sector (512 bytes) only when it is not one already, or to
  :attr:`VhdWriterOptions.alignment` when that is set (Azure needs fixed VHDs whose size
  is a whole number of MiB: ``VhdWriterOptions(subformat="fixed", alignment=MiB)``).
  The padding reads as zeros.
- The CHS geometry is computed per the specification but never changes the size; the
  creator application is ``win `` (Hyper-V) by default, which makes qemu (and Hyper-V,
  Azure) take ``current_size`` as the disk size instead of the rounded-down geometry.

Fixed: the data then the footer. On a seekable sink with ``target_zeroed`` zero extents
are left as holes; otherwise zeros are written.

Dynamic (2 MiB blocks by default, ``options.cluster_size`` to change): footer copy,
dynamic header, BAT, blocks (sector bitmap + data), footer. Blocks that are all zero are
not allocated. On a seekable sink blocks are appended as they complete and the BAT is
written by :meth:`finish`. On a pure stream the writer needs :meth:`set_allocation_map`
before the first extent: it lays out one block for each block the map touches and
writes the BAT first; data outside the map is an error.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from typing import ClassVar

from app.formats.base import (
    SECTOR,
    Extent,
    FormatError,
    GiB,
    ImageWriter,
    MiB,
    SeekableSink,
    SequentialSink,
    WriterOptions,
    immutable,
)
from app.formats.buffers import WriteBehind, is_zero, zeros
from app.formats.vdisk_common import BlockedWriter
from app.formats.vhd_meta import (
    FMT,
    TYPE_DYNAMIC,
    TYPE_FIXED,
    UNUSED_BAT,
    DynamicHeader,
    Footer,
    bitmap_bytes,
)

#: Largest dynamic VHD (the specification's limit; 32-bit sector offsets in the BAT).
MAX_DYNAMIC_SIZE = 2040 * GiB
DEFAULT_BLOCK = 2 * MiB
MIN_BLOCK = 64 * 1024
MAX_BLOCK = 256 * MiB
_ZERO_CHUNK = 4 * MiB


@dataclass(frozen=True, slots=True)
class VhdWriterOptions(WriterOptions):
    """VHD knobs on top of :class:`WriterOptions`.

    - ``alignment``: round the disk size up to a multiple of this many bytes (a multiple
      of 512; ``MiB`` for Azure).
    - ``creator_app``: the footer's 4-byte creator application.
    """

    alignment: int = SECTOR
    creator_app: bytes = b"win "


class _VhdWriter(ImageWriter):
    format: ClassVar[str] = "vhd"
    disk_type: ClassVar[int]

    def __init__(
        self, sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
    ) -> None:
        super().__init__(virtual_size)
        vopts = options if isinstance(options, VhdWriterOptions) else VhdWriterOptions()
        align = vopts.alignment
        if align <= 0 or align % SECTOR:
            raise FormatError(f"alignment {align} is not a positive multiple of 512", fmt=FMT)
        if len(vopts.creator_app) != 4:
            raise FormatError("creator_app must be 4 bytes", fmt=FMT)
        self._sink = sink
        self._options = options
        self.size = -(-virtual_size // align) * align
        self._footer = Footer.new(
            size=self.size, disk_type=self.disk_type, creator_app=vopts.creator_app
        )
        self._next = 0
        self._finished = False
        self._behind = WriteBehind()

    async def abort(self) -> None:
        """Drop writes still in flight (the output stays incomplete)."""
        await self._behind.cancel()

    def _check(self, extent: Extent) -> None:
        if self._finished:
            raise FormatError("write after finish", fmt=FMT)
        if extent.offset < self._next:
            raise FormatError(
                f"extent at {extent.offset} is before the previous end {self._next}", fmt=FMT
            )
        if extent.end > self.size:
            raise FormatError(
                f"extent ends at {extent.end}, past the virtual size {self.virtual_size}", fmt=FMT
            )
        self._next = extent.end

    async def _flush_sink(self) -> None:
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            await flush()


class VhdFixedWriter(_VhdWriter):
    """Fixed VHD: the disk bytes followed by the footer."""

    streamable: ClassVar[bool] = True
    disk_type: ClassVar[int] = TYPE_FIXED

    def __init__(
        self, sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
    ) -> None:
        super().__init__(sink, virtual_size, options)
        self._seekable = hasattr(sink, "write_at")
        self._holes_ok = self._seekable and hasattr(sink, "truncate") and options.target_zeroed
        if not self._seekable and not hasattr(sink, "write"):
            raise FormatError("sink can neither write in order nor at offsets", fmt=FMT)
        self._pos = 0  # bytes of the disk area written (or skipped as holes)

    async def _put(self, data: bytes | memoryview) -> None:
        if self._seekable:
            sink: SeekableSink = self._sink  # type: ignore[assignment]
            await self._behind.submit(sink.write_at(self._pos, data))
        else:
            await self._sink.write(data)  # type: ignore[union-attr]
        self._pos += len(data)

    async def _zero_to(self, end: int) -> None:
        if end <= self._pos:
            return
        if self._holes_ok:
            self._pos = end
            return
        while self._pos < end:
            await self._put(zeros(min(_ZERO_CHUNK, end - self._pos)))

    async def write(self, extent: Extent) -> None:
        self._check(extent)
        if extent.data is None:
            return
        await self._zero_to(extent.offset)
        await self._put(immutable(extent.data))

    async def finish(self) -> None:
        if self._finished:
            return
        await self._zero_to(self.size)
        if self._holes_ok:
            await self._behind.drain()
            await self._sink.truncate(self.size)  # type: ignore[union-attr]
        await self._put(self._footer.pack())
        await self._behind.drain()
        await self._flush_sink()
        self._finished = True


class VhdDynamicWriter(BlockedWriter, _VhdWriter):
    """Dynamic VHD; see the module docstring for seekable vs streaming operation."""

    streamable: ClassVar[bool] = True
    needs_allocation_map: ClassVar[bool] = True
    disk_type: ClassVar[int] = TYPE_DYNAMIC

    def __init__(
        self, sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
    ) -> None:
        super().__init__(sink, virtual_size, options)
        bs = options.cluster_size or DEFAULT_BLOCK
        if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise FormatError(
                f"block size {bs} must be a power of two between 64 KiB and 256 MiB", fmt=FMT
            )
        if self.size > MAX_DYNAMIC_SIZE:
            raise FormatError(
                f"dynamic VHDs are limited to 2040 GiB; {self.size} bytes asked "
                "(use a fixed VHD or VHDX)",
                fmt=FMT,
            )
        self._bs = bs
        self._bm_len = bitmap_bytes(bs)
        self._nblocks = -(-self.size // bs)
        self._bat = array("I", [UNUSED_BAT]) * self._nblocks
        self._bat_offset = SECTOR + DynamicHeader.SIZE
        bat_bytes = -(-self._nblocks * 4 // SECTOR) * SECTOR
        self._file_end = self._bat_offset + bat_bytes
        self._cur = -1
        self._buf: bytearray | None = None
        self._stream_plan: list[int] | None = None  # planned blocks, streaming mode
        self._plan_pos = 0  # next planned block to write
        self._planned: set[int] = set()
        self._started = False
        self._holes_ok = options.target_zeroed

    @property
    def _header(self) -> DynamicHeader:
        return DynamicHeader(self._bat_offset, self._nblocks, self._bs)

    def _bat_bytes(self) -> bytes:
        raw = struct.pack(f">{self._nblocks}I", *self._bat)
        return raw + bytes(-len(raw) % SECTOR)

    async def set_allocation_map(self, ranges: list[tuple[int, int]]) -> None:
        if self._started or self._cur >= 0 or self._next:
            raise FormatError("set_allocation_map must come before any data", fmt=FMT)
        blocks: set[int] = set()
        bs = self._bs
        for off, length in ranges:
            if length <= 0:
                continue
            if off < 0 or off + length > self.size:
                raise FormatError(f"allocation range ({off}, {length}) outside the disk", fmt=FMT)
            blocks.update(range(off // bs, (off + length - 1) // bs + 1))
        plan = sorted(blocks)
        pos = self._file_end
        for b in plan:
            self._bat[b] = pos // SECTOR
            pos += self._bm_len + bs
        self._stream_plan = plan
        self._planned = blocks

    # -- output
    async def _seq_write(self, data: bytes | memoryview) -> None:
        write = getattr(self._sink, "write", None)
        if write is not None:
            await write(data)
        else:
            await self._sink.write_at(self._file_end, data)  # type: ignore[union-attr]
        self._file_end += len(data)

    async def _start_stream(self) -> None:
        if self._started:
            return
        self._started = True
        footer = self._footer.pack()
        write = getattr(self._sink, "write", None)
        head = footer + self._header.pack() + self._bat_bytes()
        if write is not None:
            await write(head)
        else:
            await self._sink.write_at(0, head)  # type: ignore[union-attr]

    async def _stream_block(self, b: int, data: bytes | bytearray | None) -> None:
        """Write planned blocks up to and including ``b`` (``data`` for ``b`` itself)."""
        assert self._stream_plan is not None
        await self._start_stream()
        plan = self._stream_plan
        while self._plan_pos < len(plan) and plan[self._plan_pos] <= b:
            pb = plan[self._plan_pos]
            self._plan_pos += 1
            if pb == b and data is not None:
                await self._seq_write(b"\xff" * self._bm_len)
                await self._seq_write(memoryview(data))
            else:  # planned but no data: a block of absent sectors
                await self._seq_write(zeros(self._bm_len + self._bs))

    async def _flush_block(self) -> None:
        """Streaming mode: write the buffered block (and planned blocks before it)."""
        b, buf = self._cur, self._buf
        self._cur, self._buf = -1, None
        if b < 0 or buf is None:
            return
        empty = is_zero(buf)
        if b not in self._planned:
            if empty:
                return
            raise FormatError(
                f"data in block {b} lies outside the declared allocation map", fmt=FMT
            )
        await self._stream_block(b, None if empty else buf)

    async def _seek_piece(self, b: int, in_off: int, piece: memoryview) -> None:
        """Seekable mode: allocate the block on its first non-zero data, then write the
        piece in place (zero pieces stay holes on a fresh file)."""
        sink: SeekableSink = self._sink  # type: ignore[assignment]
        zero = is_zero(piece)
        if self._bat[b] == UNUSED_BAT:
            if zero:
                return
            off = self._file_end
            self._bat[b] = off // SECTOR
            self._file_end += self._bm_len + self._bs
            if self._holes_ok:
                await self._behind.submit(sink.write_at(off, b"\xff" * self._bm_len))
            else:  # the target may hold old bytes: lay down the whole block first
                await sink.write_at(off, b"\xff" * self._bm_len + zeros(self._bs))
        elif zero and self._holes_ok:
            return
        base = self._bat[b] * SECTOR + self._bm_len
        await self._behind.submit(sink.write_at(base + in_off, piece))

    async def write(self, extent: Extent) -> None:
        self._check(extent)
        if extent.data is None:
            return
        streaming = self._stream_plan is not None
        if not streaming and not hasattr(self._sink, "write_at"):
            raise FormatError(
                "a dynamic VHD on a sequential sink needs set_allocation_map() first", fmt=FMT
            )
        await self._write_blocks(extent.offset, extent.data, streaming)

    async def finish(self) -> None:
        if self._finished:
            return
        await self._flush_block()
        footer = self._footer.pack()
        if self._stream_plan is not None:
            await self._stream_block(self._nblocks, None)
            await self._seq_write(footer)
        else:
            if not hasattr(self._sink, "write_at"):
                raise FormatError(
                    "a dynamic VHD on a sequential sink needs set_allocation_map() first",
                    fmt=FMT,
                )
            sink: SeekableSink = self._sink  # type: ignore[assignment]
            await self._behind.drain()
            await sink.write_at(0, footer + self._header.pack() + self._bat_bytes())
            await sink.write_at(self._file_end, footer)
            await sink.truncate(self._file_end + SECTOR)
        await self._flush_sink()
        self._finished = True
