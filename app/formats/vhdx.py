"""VHDX (Hyper-V virtual hard disk v2) reader, per Microsoft's [MS-VHDX] specification.

Supported (random access only): fixed and dynamic VHDX files with 512 or 4096-byte
logical sectors and any valid block size (1-256 MiB). The reader picks the valid header
(CRC-32C) with the highest sequence number, uses region table 1 (or 2 when 1 is
damaged), reads the metadata items it needs and walks the BAT a window at a time.

Block states: not present, undefined, zero and unmapped read as zeros; fully present
blocks are read from the file (holes in the file are skipped without reading).

Refused with :class:`~app.formats.base.FormatError`:

- a non-empty log (header LogGuid not zero): the file needs log replay first; open it
  in Hyper-V or run ``qemu-img check -r all`` on it;
- differencing disks (HasParent, a parent locator, or partially present blocks);
- unknown *required* regions or metadata items;
- damage: bad signatures or checksums, both headers invalid, regions/BAT/blocks past
  the end of the file, sizes above ``max_virtual_size``, invalid block states.

Writing: see :mod:`app.formats.vhdx_writer` (dynamic or fixed; seekable, or streamable
after :meth:`~app.formats.base.ImageWriter.set_allocation_map`).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

from app.formats import probes
from app.formats.base import (
    DEFAULT_CHUNK,
    DEFAULT_MAX_VIRTUAL_SIZE,
    Extent,
    FormatError,
    ImageInfo,
    ImageReader,
    ImageWriter,
    MiB,
    RandomAccessSource,
    SeekableSink,
    SequentialSink,
    SequentialSource,
    WriterOptions,
)
from app.formats.probes import VHDX_SIGNATURE
from app.formats.vdisk_common import (
    ExtentBuilder,
    HostHoles,
    crc32c,
    read_exact_at,
)
from app.formats.vhdx_meta import (
    BAT_GUID,
    FILE_PARAMETERS,
    FMT,
    HEADER_OFFSETS,
    HEADER_SIGNATURE,
    HEADER_SIZE,
    HEADER_STRUCT,
    KNOWN_METADATA,
    LOGICAL_SECTOR_SIZE,
    MAX_BLOCK,
    MAX_TABLE_ENTRIES,
    MAX_VHDX_SIZE,
    META_ENTRY,
    META_HDR,
    METADATA_GUID,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK,
    PARENT_LOCATOR,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PHYSICAL_SECTOR_SIZE,
    REGION_ENTRY,
    REGION_HDR,
    REGION_OFFSETS,
    REGION_SIGNATURE,
    REGION_TABLE_SIZE,
    VIRTUAL_DISK_SIZE,
    ZERO_STATES,
    KiB,
)
from app.formats.vhdx_writer import VhdxWriter, VhdxWriterOptions

__all__ = ["VhdxReader", "VhdxWriter", "VhdxWriterOptions", "create_writer", "open_reader", "probe"]

_BAT_WINDOW = 8192  # entries read at once (64 KiB)


probe = probes.vhdx


def _checked(data: bytes) -> bool:
    """True when the CRC-32C at bytes 4..8 matches the rest (field taken as zero)."""
    stored = struct.unpack_from("<I", data, 4)[0]
    return bool(crc32c(data[:4] + b"\0\0\0\0" + data[8:]) == stored)


@dataclass(frozen=True, slots=True)
class Header:
    sequence: int
    log_guid: uuid.UUID
    version: int
    log_length: int
    log_offset: int
    offset: int


def _parse_header(data: bytes, offset: int) -> Header | None:
    if len(data) < HEADER_SIZE or data[:4] != HEADER_SIGNATURE:
        return None
    if not _checked(data[:HEADER_SIZE]):
        return None
    _sig, _ck, seq, _fw, _dw, log_guid, _log_ver, version, log_len, log_off = (
        HEADER_STRUCT.unpack_from(data, 0)
    )
    return Header(seq, uuid.UUID(bytes_le=log_guid), version, log_len, log_off, offset)


@dataclass(frozen=True, slots=True)
class Metadata:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    logical_sector: int
    physical_sector: int


class VhdxReader(ImageReader):
    format: ClassVar[str] = "vhdx"
    needs_random_access: ClassVar[bool] = True

    def __init__(
        self,
        source: RandomAccessSource,
        meta: Metadata,
        bat_offset: int,
        bat_entries: int,
        details: dict[str, str | int | bool],
    ) -> None:
        self._source = source
        self._meta = meta
        self._bat_offset = bat_offset
        self._bat_entries = bat_entries
        self._chunk_ratio = (1 << 23) * meta.logical_sector // meta.block_size
        self._window_start = -1
        self._window: tuple[int, ...] = ()
        self._used = False
        self.info = ImageInfo(
            format=FMT,
            virtual_size=meta.virtual_size,
            subformat="fixed" if meta.leave_blocks_allocated else "dynamic",
            cluster_size=meta.block_size,
            details=details,
        )

    async def close(self) -> None:
        await self._source.close()

    @property
    def payload_blocks(self) -> int:
        return -(-self._meta.virtual_size // self._meta.block_size)

    async def _bat_entry(self, index: int) -> int:
        if not self._window_start <= index < self._window_start + len(self._window):
            start = index - index % _BAT_WINDOW
            count = min(_BAT_WINDOW, self._bat_entries - start)
            raw = await read_exact_at(
                self._source, self._bat_offset + 8 * start, 8 * count, FMT, "BAT"
            )
            self._window = struct.unpack(f"<{count}Q", raw)
            self._window_start = start
        return self._window[index - self._window_start]

    async def _payload(self, block: int) -> tuple[int, int]:
        """``(state, file offset)`` of payload block ``block``, validated."""
        index = block + block // self._chunk_ratio
        entry = await self._bat_entry(index)
        state = entry & 7
        file_off = (entry >> 20) * MiB
        where = self._bat_offset + 8 * index
        if state in ZERO_STATES:
            return state, 0
        if state == PAYLOAD_PARTIALLY_PRESENT:
            raise FormatError(
                f"block {block} is partially present, which only differencing disks use",
                fmt=FMT,
                offset=where,
            )
        if state != PAYLOAD_FULLY_PRESENT:
            raise FormatError(f"block {block} has invalid state {state}", fmt=FMT, offset=where)
        length = min(self._meta.block_size, self._meta.virtual_size - block * self._meta.block_size)
        if file_off < MiB or file_off + length > self._source.size:
            raise FormatError(
                f"block {block} at file offset {file_off} lies outside the file",
                fmt=FMT,
                offset=where,
            )
        return state, file_off

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        bs = self._meta.block_size
        vsize = self._meta.virtual_size
        out: list[tuple[int, int]] = []
        for b in range(self.payload_blocks):
            state, _ = await self._payload(b)
            if state != PAYLOAD_FULLY_PRESENT:
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
        return self._extents(chunk_size)

    async def _extents(self, chunk_size: int) -> AsyncIterator[Extent]:
        bs = self._meta.block_size
        vsize = self._meta.virtual_size
        builder = ExtentBuilder(chunk_size)
        holes = HostHoles(await self._source.data_ranges())
        for b in range(self.payload_blocks):
            start = b * bs
            length = min(bs, vsize - start)
            state, file_off = await self._payload(b)
            if state != PAYLOAD_FULLY_PRESENT:
                for ext in builder.zero(start, length):
                    yield ext
                continue
            for foff, run, is_data in holes.split(file_off, length):
                voff = start + foff - file_off
                if not is_data:
                    for ext in builder.zero(voff, run):
                        yield ext
                    continue
                for pos in range(0, run, chunk_size):
                    n = min(chunk_size, run - pos)
                    data = await read_exact_at(
                        self._source, foff + pos, n, FMT, f"block {b} data"
                    )
                    for ext in builder.data(voff + pos, data):
                        yield ext
        for ext in builder.finish():
            yield ext


async def _read_headers(source: RandomAccessSource) -> Header:
    headers: list[Header] = []
    for off in HEADER_OFFSETS:
        data = await source.read_at(off, HEADER_SIZE)
        h = _parse_header(data, off)
        if h is not None:
            headers.append(h)
    if not headers:
        raise FormatError(
            "both headers are damaged (bad signature or checksum)",
            fmt=FMT,
            offset=HEADER_OFFSETS[0],
        )
    best = max(headers, key=lambda h: h.sequence)
    if best.version != 1:
        raise FormatError(f"unsupported VHDX version {best.version}", fmt=FMT, offset=best.offset)
    if best.log_guid.int != 0:
        raise FormatError(
            "VHDX needs log replay (it was not closed cleanly); open it in Hyper-V or run "
            "'qemu-img check -r all' on it first",
            fmt=FMT,
            offset=best.offset + 48,
        )
    return best


async def _read_regions(source: RandomAccessSource) -> dict[uuid.UUID, tuple[int, int]]:
    last_error = "bad signature or checksum"
    for off in REGION_OFFSETS:
        data = await source.read_at(off, REGION_TABLE_SIZE)
        if len(data) < REGION_TABLE_SIZE or data[:4] != REGION_SIGNATURE:
            continue
        if not _checked(data):
            continue
        _sig, _ck, count = REGION_HDR.unpack_from(data, 0)
        if count > MAX_TABLE_ENTRIES:
            last_error = f"{count} entries"
            continue
        regions: dict[uuid.UUID, tuple[int, int]] = {}
        for i in range(count):
            guid_b, file_off, length, required = REGION_ENTRY.unpack_from(data, 16 + 32 * i)
            guid = uuid.UUID(bytes_le=guid_b)
            if guid in (BAT_GUID, METADATA_GUID):
                if file_off % MiB or file_off < MiB or length % MiB or length == 0:
                    raise FormatError(
                        f"region {guid} at {file_off}+{length} is misaligned",
                        fmt=FMT,
                        offset=off + 16 + 32 * i,
                    )
                if file_off + length > source.size:
                    raise FormatError(
                        f"region {guid} ends past the end of the file", fmt=FMT,
                        offset=off + 16 + 32 * i,
                    )  # fmt: skip
                regions[guid] = (file_off, length)
            elif required & 1:
                raise FormatError(
                    f"unknown required region {guid}", fmt=FMT, offset=off + 16 + 32 * i
                )
        for needed in (BAT_GUID, METADATA_GUID):
            if needed not in regions:
                raise FormatError(f"region table lacks region {needed}", fmt=FMT, offset=off)
        return regions
    raise FormatError(
        f"both region tables are damaged ({last_error})", fmt=FMT, offset=REGION_OFFSETS[0]
    )


async def _read_metadata(
    source: RandomAccessSource, region: tuple[int, int], max_virtual_size: int
) -> Metadata:
    base, length = region
    table = await read_exact_at(source, base, METADATA_TABLE_SIZE, FMT, "metadata table")
    sig, _res, count = META_HDR.unpack_from(table, 0)
    if sig != METADATA_SIGNATURE:
        raise FormatError("bad metadata table signature", fmt=FMT, offset=base)
    if count > MAX_TABLE_ENTRIES:
        raise FormatError(f"metadata table has {count} entries", fmt=FMT, offset=base + 10)
    items: dict[uuid.UUID, bytes] = {}
    for i in range(count):
        where = base + 32 + 32 * i
        guid_b, item_off, item_len, flags = META_ENTRY.unpack_from(table, 32 + 32 * i)
        guid = uuid.UUID(bytes_le=guid_b)
        if guid == PARENT_LOCATOR:
            raise FormatError(
                "differencing VHDX (has a parent locator) is not supported; merge it first",
                fmt=FMT,
                offset=where,
            )
        if guid not in KNOWN_METADATA:
            if flags & 4:
                raise FormatError(f"unknown required metadata item {guid}", fmt=FMT, offset=where)
            continue
        if item_len > 64 * KiB or (item_len and item_off < METADATA_TABLE_SIZE):
            raise FormatError(f"metadata item {guid} has a bad location", fmt=FMT, offset=where)
        if item_off + item_len > length:
            raise FormatError(
                f"metadata item {guid} lies outside the metadata region", fmt=FMT, offset=where
            )
        items[guid] = await read_exact_at(
            source, base + item_off, item_len, FMT, f"metadata item {guid}"
        )

    def item(guid: uuid.UUID, size: int, name: str) -> bytes:
        data = items.get(guid)
        if data is None or len(data) < size:
            raise FormatError(f"metadata lacks a valid {name} item", fmt=FMT, offset=base)
        return data

    block_size, bits = struct.unpack_from("<II", item(FILE_PARAMETERS, 8, "file parameters"))
    vsize = struct.unpack_from("<Q", item(VIRTUAL_DISK_SIZE, 8, "virtual disk size"))[0]
    logical = struct.unpack_from("<I", item(LOGICAL_SECTOR_SIZE, 4, "logical sector size"))[0]
    physical = 4096
    if PHYSICAL_SECTOR_SIZE in items:
        physical = struct.unpack_from(
            "<I", item(PHYSICAL_SECTOR_SIZE, 4, "physical sector size")
        )[0]
    if block_size & (block_size - 1) or not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise FormatError(f"block size {block_size} is invalid", fmt=FMT, offset=base)
    if logical not in (512, 4096):
        raise FormatError(f"logical sector size {logical} is invalid", fmt=FMT, offset=base)
    if physical not in (512, 4096):
        raise FormatError(f"physical sector size {physical} is invalid", fmt=FMT, offset=base)
    if vsize > min(max_virtual_size, MAX_VHDX_SIZE):
        raise FormatError(
            f"virtual size {vsize} exceeds the limit of {min(max_virtual_size, MAX_VHDX_SIZE)}",
            fmt=FMT,
            offset=base,
        )
    if vsize % logical:
        raise FormatError(
            f"virtual size {vsize} is not a multiple of the sector size {logical}",
            fmt=FMT,
            offset=base,
        )
    if bits & 2:
        raise FormatError(
            "differencing VHDX (HasParent) is not supported; merge it first", fmt=FMT, offset=base
        )
    return Metadata(block_size, bool(bits & 1), bool(bits & 2), vsize, logical, physical)


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> ImageReader:
    """Open a fixed or dynamic VHDX (see the module docstring)."""
    if not isinstance(source, RandomAccessSource):
        raise FormatError("reading a VHDX needs random access", fmt=FMT)
    ident = await source.read_at(0, 520)
    if len(ident) < 8 or ident[:8] != VHDX_SIGNATURE:
        raise FormatError("not a VHDX file (bad file type identifier)", fmt=FMT, offset=0)
    creator = ident[8:520].decode("utf-16-le", errors="replace").split("\0", 1)[0]
    header = await _read_headers(source)
    regions = await _read_regions(source)
    meta = await _read_metadata(source, regions[METADATA_GUID], max_virtual_size)
    chunk_ratio = (1 << 23) * meta.logical_sector // meta.block_size
    payload = -(-meta.virtual_size // meta.block_size)
    total = payload + (payload - 1) // chunk_ratio if payload else 0
    bat_off, bat_len = regions[BAT_GUID]
    if total * 8 > bat_len:
        raise FormatError(
            f"BAT region of {bat_len} bytes cannot hold {total} entries",
            fmt=FMT,
            offset=bat_off,
        )
    details: dict[str, str | int | bool] = {
        "creator": creator,
        "logical_sector_size": meta.logical_sector,
        "physical_sector_size": meta.physical_sector,
        "leave_blocks_allocated": meta.leave_blocks_allocated,
        "header_sequence": header.sequence,
    }
    return VhdxReader(source, meta, bat_off, total, details)


def create_writer(
    sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
) -> ImageWriter:
    """``options.subformat``: ``dynamic`` (default) or ``fixed``."""
    return VhdxWriter(sink, virtual_size, options)
