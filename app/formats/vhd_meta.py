"""VHD on-disk structures: the hard disk footer and the dynamic disk header.

Per Microsoft's "Virtual Hard Disk Image Format Specification" (v1.0). All fields are
big-endian. Checksums are the one's complement of the byte sum with the checksum field
taken as zero.
"""

from __future__ import annotations

import struct
import time
import uuid
from dataclasses import dataclass, replace

from app.formats.base import SECTOR, FormatError
from app.formats.probes import VHD_COOKIE

FMT = "vhd"

DYN_COOKIE = b"cxsparse"
FILE_VERSION = 0x00010000
HEADER_VERSION = 0x00010000
FEATURES_RESERVED = 0x00000002
NO_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED_BAT = 0xFFFFFFFF

TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
TYPE_NAMES = {0: "none", 1: "reserved", 2: "fixed", 3: "dynamic", 4: "differencing"}

#: Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946684800
#: Largest CHS geometry a footer can hold (65535 cylinders, 16 heads, 255 sectors).
MAX_CHS_SECTORS = 65535 * 16 * 255

#: Creator applications for which qemu takes ``current_size`` as the disk size rather
#: than the CHS geometry (block/vpc.c): Hyper-V, QEMU with force_size, Disk2vhd,
#: XenServer, XenConverter.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"tap\0", b"CTXS")

_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
_DYN = struct.Struct(">8sQQIIII16sI")

FOOTER_CHECKSUM_AT = 64
DYN_CHECKSUM_AT = 36


def vhd_checksum(data: bytes | bytearray, checksum_at: int) -> int:
    total = sum(data) - sum(data[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """``(cylinders, heads, sectors_per_track)`` per the VHD specification, appendix.

    The geometry rounds down and saturates at 65535x16x255; it never changes the disk
    size, which lives in ``current_size``.
    """
    total_sectors = min(total_sectors, MAX_CHS_SECTORS)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_x_heads = total_sectors // spt
    else:
        spt = 17
        cyl_x_heads = total_sectors // spt
        heads = max((cyl_x_heads + 1023) // 1024, 4)
        if cyl_x_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_x_heads = total_sectors // spt
        if cyl_x_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_x_heads = total_sectors // spt
    return cyl_x_heads // heads, heads, spt


@dataclass(frozen=True, slots=True)
class Footer:
    features: int
    version: int
    data_offset: int
    timestamp: int
    creator_app: bytes
    creator_version: int
    creator_os: bytes
    original_size: int
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    unique_id: bytes
    saved_state: int

    @property
    def chs_size(self) -> int:
        return self.cylinders * self.heads * self.sectors * SECTOR

    @classmethod
    def parse(cls, data: bytes, *, offset: int, what: str = "footer") -> Footer:
        if len(data) < SECTOR:
            raise FormatError(f"truncated {what}", fmt=FMT, offset=offset)
        (cookie, features, version, data_offset, ts, app, app_ver, host, orig, cur, cyl,
         heads, spt, dtype, checksum, uid, saved) = _FOOTER.unpack_from(data, 0)  # fmt: skip
        if cookie != VHD_COOKIE:
            raise FormatError(f"bad {what} cookie {cookie!r}", fmt=FMT, offset=offset)
        if vhd_checksum(data[:SECTOR], FOOTER_CHECKSUM_AT) != checksum:
            raise FormatError(f"{what} checksum mismatch", fmt=FMT, offset=offset + 64)
        if version >> 16 != 1:
            raise FormatError(f"unsupported file format version {version:#x}", fmt=FMT,
                              offset=offset + 12)  # fmt: skip
        return cls(features, version, data_offset, ts, app, app_ver, host, orig, cur, cyl,
                   heads, spt, dtype, uid, saved)  # fmt: skip

    def pack(self) -> bytes:
        raw = bytearray(
            _FOOTER.pack(
                VHD_COOKIE, self.features, self.version, self.data_offset, self.timestamp,
                self.creator_app, self.creator_version, self.creator_os, self.original_size,
                self.current_size, self.cylinders, self.heads, self.sectors, self.disk_type, 0,
                self.unique_id, self.saved_state,
            )
        )
        raw += bytes(SECTOR - len(raw))
        struct.pack_into(">I", raw, FOOTER_CHECKSUM_AT, vhd_checksum(raw, FOOTER_CHECKSUM_AT))
        return bytes(raw)

    @classmethod
    def new(
        cls,
        *,
        size: int,
        disk_type: int,
        creator_app: bytes = b"win ",
        creator_version: int = 0x000A0000,
    ) -> Footer:
        cyl, heads, spt = chs_geometry(size // SECTOR)
        return cls(
            features=FEATURES_RESERVED,
            version=FILE_VERSION,
            data_offset=NO_DATA_OFFSET if disk_type == TYPE_FIXED else SECTOR,
            timestamp=max(int(time.time()) - VHD_EPOCH, 0) & 0xFFFFFFFF,
            creator_app=creator_app,
            creator_version=creator_version,
            creator_os=b"Wi2k",
            original_size=size,
            current_size=size,
            cylinders=cyl,
            heads=heads,
            sectors=spt,
            disk_type=disk_type,
            unique_id=uuid.uuid4().bytes,
            saved_state=0,
        )

    def with_data_offset(self, data_offset: int) -> Footer:
        return replace(self, data_offset=data_offset)


@dataclass(frozen=True, slots=True)
class DynamicHeader:
    table_offset: int
    max_table_entries: int
    block_size: int
    parent_unique_id: bytes = bytes(16)

    SIZE = 1024

    @classmethod
    def parse(cls, data: bytes, *, offset: int) -> DynamicHeader:
        if len(data) < cls.SIZE:
            raise FormatError("truncated dynamic disk header", fmt=FMT, offset=offset)
        cookie, _data_off, table_off, version, entries, block, checksum, parent, _ts = (
            _DYN.unpack_from(data, 0)
        )
        if cookie != DYN_COOKIE:
            raise FormatError(f"bad dynamic header cookie {cookie!r}", fmt=FMT, offset=offset)
        if vhd_checksum(data[: cls.SIZE], DYN_CHECKSUM_AT) != checksum:
            raise FormatError("dynamic header checksum mismatch", fmt=FMT, offset=offset + 36)
        if version >> 16 != 1:
            raise FormatError(f"unsupported dynamic header version {version:#x}", fmt=FMT,
                              offset=offset + 24)  # fmt: skip
        return cls(table_off, entries, block, parent)

    def pack(self) -> bytes:
        raw = bytearray(
            _DYN.pack(
                DYN_COOKIE, NO_DATA_OFFSET, self.table_offset, HEADER_VERSION,
                self.max_table_entries, self.block_size, 0, self.parent_unique_id, 0,
            )
        )
        raw += bytes(self.SIZE - len(raw))
        struct.pack_into(">I", raw, DYN_CHECKSUM_AT, vhd_checksum(raw, DYN_CHECKSUM_AT))
        return bytes(raw)


def bitmap_bytes(block_size: int) -> int:
    """Bytes of the per-block sector bitmap, padded to a whole sector."""
    nbytes = -(-(block_size // SECTOR) // 8)
    return -(-nbytes // SECTOR) * SECTOR


def bitmap_runs(bitmap: bytes, nsectors: int) -> list[tuple[int, int, bool]]:
    """``(first_sector, count, present)`` runs for the first ``nsectors`` bits of a VHD
    sector bitmap (most significant bit of byte 0 is sector 0)."""
    runs: list[tuple[int, int, bool]] = []
    nbytes = -(-nsectors // 8)
    full, rest = divmod(nsectors, 8)
    if bitmap[:full] == b"\xff" * full and (
        not rest or bitmap[full] >> (8 - rest) == (1 << rest) - 1
    ):
        return [(0, nsectors, True)] if nsectors else []

    def add(start: int, count: int, present: bool) -> None:
        if count <= 0:
            return
        if runs and runs[-1][2] == present and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + count, present)
        else:
            runs.append((start, count, present))

    for i in range(nbytes):
        b = bitmap[i]
        base = i * 8
        width = min(8, nsectors - base)
        if b == 0xFF or b == 0:
            add(base, width, b == 0xFF)
            continue
        for bit in range(width):
            add(base + bit, 1, bool(b & (0x80 >> bit)))
    return runs
