"""VHDX writer: dynamic (default) or fixed, per [MS-VHDX].

Layout (every region 1 MiB aligned)::

    0       file type identifier ("vhdxfile", creator "vmigrate")
    64 KiB  header 1, 128 KiB header 2 (sequence n and n+1, empty log: LogGuid zero)
    192 KiB region table 1, 256 KiB region table 2 (BAT and metadata, both required)
    1 MiB   log (1 MiB, never used)
    2 MiB   metadata region: table, then file parameters, virtual disk size, page 83
            id, logical and physical sector size
    3 MiB   BAT (payload entries with sector-bitmap entries interleaved per chunk)
    ...     payload blocks

Virtual sizes are rounded up to the logical sector size (512 default; 4096 with
:class:`VhdxWriterOptions`). Block size: ``options.cluster_size`` (32 MiB default, a
power of two from 1 to 256 MiB).

- **dynamic** on a seekable sink: blocks are appended in the order data first reaches
  them; blocks never written stay ``PAYLOAD_BLOCK_ZERO``; zero pieces inside a block
  stay holes on a fresh file. Headers, metadata and BAT are written by :meth:`finish`.
- On a sequential sink the writer needs :meth:`set_allocation_map` first (dynamic) and
  then writes everything in file order, blocks in full. ``subformat="fixed"`` plans
  every block (LeaveBlocksAllocated) and so streams without a map.
"""

from __future__ import annotations

import struct
import uuid
from array import array
from dataclasses import dataclass
from typing import ClassVar

from app.formats.base import (
    Extent,
    FormatError,
    ImageWriter,
    MiB,
    SeekableSink,
    SequentialSink,
    WriterOptions,
)
from app.formats.buffers import WriteBehind, is_zero, zeros
from app.formats.probes import VHDX_SIGNATURE
from app.formats.vdisk_common import BlockedWriter, crc32c
from app.formats.vhdx_meta import (
    BAT_GUID,
    FILE_PARAMETERS,
    FMT,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    HEADER_STRUCT,
    LEAVE_BLOCKS_ALLOCATED,
    LOGICAL_SECTOR_SIZE,
    MAX_BLOCK,
    MAX_VHDX_SIZE,
    META_ENTRY,
    META_HDR,
    META_IS_REQUIRED,
    META_IS_VIRTUAL_DISK,
    METADATA_GUID,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_ZERO,
    PHYSICAL_SECTOR_SIZE,
    REGION_ENTRY,
    REGION_HDR,
    REGION_OFFSETS,
    REGION_SIGNATURE,
    REGION_TABLE_SIZE,
    VIRTUAL_DISK_ID,
    VIRTUAL_DISK_SIZE,
)

DEFAULT_BLOCK = 32 * MiB
LOG_OFFSET = 1 * MiB
LOG_LENGTH = 1 * MiB
METADATA_OFFSET = 2 * MiB
METADATA_LENGTH = 1 * MiB
BAT_OFFSET = 3 * MiB


@dataclass(frozen=True, slots=True)
class VhdxWriterOptions(WriterOptions):
    """VHDX knobs on top of :class:`WriterOptions` (sector sizes: 512 or 4096)."""

    logical_sector_size: int = 512
    physical_sector_size: int = 4096


def _with_crc(buf: bytearray) -> bytes:
    struct.pack_into("<I", buf, 4, 0)
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)


class VhdxWriter(BlockedWriter, ImageWriter):
    format: ClassVar[str] = "vhdx"
    streamable: ClassVar[bool] = True
    needs_allocation_map: ClassVar[bool] = True

    def __init__(
        self, sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
    ) -> None:
        super().__init__(virtual_size)
        sub = (options.subformat or "dynamic").lower()
        if sub not in ("dynamic", "fixed"):
            raise FormatError(f"unknown VHDX subformat {options.subformat!r}", fmt=FMT)
        vopts = options if isinstance(options, VhdxWriterOptions) else VhdxWriterOptions()
        if vopts.logical_sector_size not in (512, 4096):
            raise FormatError("logical sector size must be 512 or 4096", fmt=FMT)
        if vopts.physical_sector_size not in (512, 4096):
            raise FormatError("physical sector size must be 512 or 4096", fmt=FMT)
        bs = options.cluster_size or DEFAULT_BLOCK
        if bs & (bs - 1) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise FormatError(
                f"block size {bs} must be a power of two between 1 MiB and 256 MiB", fmt=FMT
            )
        ls = vopts.logical_sector_size
        self.size = -(-virtual_size // ls) * ls
        if self.size > MAX_VHDX_SIZE:
            raise FormatError("VHDX disks are limited to 64 TiB", fmt=FMT)
        self._sink = sink
        self._fixed = sub == "fixed"
        self._logical = ls
        self._physical = vopts.physical_sector_size
        self._bs = bs
        self._holes_ok = options.target_zeroed
        self._chunk_ratio = (1 << 23) * ls // bs
        self._payload = -(-self.size // bs)
        total = self._payload + (self._payload - 1) // self._chunk_ratio if self._payload else 0
        self._bat = array("Q", [PAYLOAD_ZERO]) * total
        self._bat_length = max(-(-total * 8 // MiB), 1) * MiB
        self._data_start = BAT_OFFSET + self._bat_length
        self._file_end = self._data_start
        self._next = 0
        self._finished = False
        self._behind = WriteBehind()
        self._plan: list[int] | None = None
        self._planned: set[int] = set()
        self._plan_pos = 0
        self._cur = -1
        self._buf: bytearray | None = None
        self._streamed = 0  # bytes written so far in streaming mode
        self._ids = (uuid.uuid4(), uuid.uuid4(), uuid.uuid4())
        if self._fixed:
            self._make_plan(set(range(self._payload)))

    # -- layout
    def _bat_index(self, block: int) -> int:
        return block + block // self._chunk_ratio

    def _make_plan(self, blocks: set[int]) -> None:
        plan = sorted(blocks)
        pos = self._data_start
        for b in plan:
            self._bat[self._bat_index(b)] = PAYLOAD_FULLY_PRESENT | (pos // MiB) << 20
            pos += self._bs
        self._plan = plan
        self._planned = blocks

    def _metadata_head(self) -> bytes:
        """Identifier, both headers, both region tables: the first MiB of the file."""
        out = bytearray(LOG_OFFSET)
        out[:8] = VHDX_SIGNATURE
        creator = "vmigrate".encode("utf-16-le")
        out[8 : 8 + len(creator)] = creator
        file_write, data_write, _ = self._ids
        for seq, off in zip((1, 2), HEADER_OFFSETS, strict=True):
            hdr = bytearray(HEADER_SIZE)
            HEADER_STRUCT.pack_into(
                hdr, 0, HEADER_SIGNATURE, 0, seq, file_write.bytes_le, data_write.bytes_le,
                bytes(16), 0, 1, LOG_LENGTH, LOG_OFFSET,
            )  # fmt: skip
            out[off : off + HEADER_SIZE] = _with_crc(hdr)
        table = bytearray(REGION_TABLE_SIZE)
        REGION_HDR.pack_into(table, 0, REGION_SIGNATURE, 0, 2)
        REGION_ENTRY.pack_into(table, 16, BAT_GUID.bytes_le, BAT_OFFSET, self._bat_length, 1)
        REGION_ENTRY.pack_into(table, 48, METADATA_GUID.bytes_le, METADATA_OFFSET,
                               METADATA_LENGTH, 1)  # fmt: skip
        region = _with_crc(table)
        for off in REGION_OFFSETS:
            out[off : off + REGION_TABLE_SIZE] = region
        return bytes(out)

    def _metadata_region(self) -> bytes:
        region = bytearray(METADATA_LENGTH)
        vd = META_IS_VIRTUAL_DISK | META_IS_REQUIRED
        items = [
            (FILE_PARAMETERS, struct.pack("<II", self._bs,
                                          LEAVE_BLOCKS_ALLOCATED if self._fixed else 0),
             META_IS_REQUIRED),
            (VIRTUAL_DISK_SIZE, struct.pack("<Q", self.size), vd),
            (VIRTUAL_DISK_ID, self._ids[2].bytes_le, vd),
            (LOGICAL_SECTOR_SIZE, struct.pack("<I", self._logical), vd),
            (PHYSICAL_SECTOR_SIZE, struct.pack("<I", self._physical), vd),
        ]  # fmt: skip
        META_HDR.pack_into(region, 0, METADATA_SIGNATURE, 0, len(items))
        pos = METADATA_TABLE_SIZE
        for i, (guid, data, flags) in enumerate(items):
            META_ENTRY.pack_into(region, 32 + 32 * i, guid.bytes_le, pos, len(data), flags)
            region[pos : pos + len(data)] = data
            pos += len(data)
        return bytes(region)

    def _bat_bytes(self) -> bytes:
        raw = struct.pack(f"<{len(self._bat)}Q", *self._bat)
        return raw + bytes(self._bat_length - len(raw))

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

    # -- streaming
    async def set_allocation_map(self, ranges: list[tuple[int, int]]) -> None:
        if self._next or self._streamed:
            raise FormatError("set_allocation_map must come before any data", fmt=FMT)
        if self._fixed:
            return  # every block is planned already
        blocks: set[int] = set()
        for off, length in ranges:
            if length <= 0:
                continue
            if off < 0 or off + length > self.size:
                raise FormatError(f"allocation range ({off}, {length}) outside the disk", fmt=FMT)
            blocks.update(range(off // self._bs, (off + length - 1) // self._bs + 1))
        self._make_plan(blocks)

    async def _swrite(self, data: bytes | memoryview) -> None:
        write = getattr(self._sink, "write", None)
        if write is not None:
            await write(data)
        else:
            await self._sink.write_at(self._streamed, data)  # type: ignore[union-attr]
        self._streamed += len(data)

    async def _stream_until(self, block: int, data: bytearray | None) -> None:
        """Write planned blocks up to and including ``block`` (``data`` for it)."""
        assert self._plan is not None
        if not self._streamed:
            await self._swrite(self._metadata_head())
            await self._swrite(zeros(LOG_LENGTH))
            await self._swrite(self._metadata_region())
            await self._swrite(self._bat_bytes())
        while self._plan_pos < len(self._plan) and self._plan[self._plan_pos] <= block:
            pb = self._plan[self._plan_pos]
            self._plan_pos += 1
            if pb == block and data is not None:
                await self._swrite(memoryview(data))
            else:
                await self._swrite(zeros(self._bs))

    async def _flush_block(self) -> None:
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
        await self._stream_until(b, None if empty else buf)

    # -- seekable
    async def _seek_piece(self, b: int, in_off: int, piece: memoryview) -> None:
        sink: SeekableSink = self._sink  # type: ignore[assignment]
        index = self._bat_index(b)
        zero = is_zero(piece)
        if self._bat[index] & 7 != PAYLOAD_FULLY_PRESENT:
            if zero:
                return
            off = self._file_end
            self._file_end += self._bs
            self._bat[index] = PAYLOAD_FULLY_PRESENT | (off // MiB) << 20
            if not self._holes_ok:
                await sink.write_at(off, zeros(self._bs))
        elif zero and self._holes_ok:
            return
        base = (self._bat[index] >> 20) * MiB
        await self._behind.submit(sink.write_at(base + in_off, piece))

    async def write(self, extent: Extent) -> None:
        self._check(extent)
        if extent.data is None:
            return
        streaming = self._plan is not None
        if not streaming and not hasattr(self._sink, "write_at"):
            raise FormatError(
                "a dynamic VHDX on a sequential sink needs set_allocation_map() first", fmt=FMT
            )
        await self._write_blocks(extent.offset, extent.data, streaming)

    async def abort(self) -> None:
        """Drop writes still in flight (the output stays incomplete)."""
        await self._behind.cancel()

    async def finish(self) -> None:
        if self._finished:
            return
        if self._plan is not None:
            await self._flush_block()
            await self._stream_until(self._payload, None)
        else:
            if not hasattr(self._sink, "write_at"):
                raise FormatError(
                    "a dynamic VHDX on a sequential sink needs set_allocation_map() first",
                    fmt=FMT,
                )
            sink: SeekableSink = self._sink  # type: ignore[assignment]
            await self._behind.drain()
            await sink.write_at(0, self._metadata_head())
            if not self._holes_ok:
                await sink.write_at(LOG_OFFSET, zeros(LOG_LENGTH))
            await sink.write_at(METADATA_OFFSET, self._metadata_region())
            await sink.write_at(BAT_OFFSET, self._bat_bytes())
            await sink.truncate(self._file_end)
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            await flush()
        self._finished = True
