"""VMDK metadata: the hosted sparse extent header, markers and the text descriptor.

Layouts follow VMware's "Virtual Disk Format" technical notes (1.1 and 5.0). All
integers in a sparse extent are little-endian; offsets and sizes are in 512-byte
sectors unless a name says bytes.
"""

from __future__ import annotations

import re
import secrets
import struct
from dataclasses import dataclass, field, replace

from app.formats.base import SECTOR, FormatError
from app.formats.probes import VMDK_COWD_MAGIC

FMT = "vmdk"

MAGIC = 0x564D444B  # "KDMV" on disk (probes.VMDK_MAGIC)

FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17

COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1

GD_AT_END = 0xFFFFFFFFFFFFFFFF
NL_CHARS = b"\n \r\n"

#: Grain sizes this module accepts (sectors): VMware uses 128 (64 KiB).
MIN_GRAIN_SECTORS = 1
MAX_GRAIN_SECTORS = 4096  # 2 MiB
MAX_GTES_PER_GT = 65536
#: Largest embedded or standalone descriptor we read.
MAX_DESCRIPTOR_BYTES = 1024 * 1024

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

#: magic, version, flags, capacity, grainSize, descriptorOffset, descriptorSize,
#: numGTEsPerGT, rgdOffset, gdOffset, overHead, uncleanShutdown, 4 newline chars,
#: compressAlgorithm; padded to one sector.
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
_GRAIN_MARKER = struct.Struct("<QI")  # lba, compressed size
_META_MARKER = struct.Struct("<QII")  # numSectors, size (0), type
GRAIN_MARKER_SIZE = _GRAIN_MARKER.size


@dataclass(frozen=True, slots=True)
class SparseHeader:
    """The 512-byte SparseExtentHeader (also used as the streamOptimized footer)."""

    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: bool
    nl_chars: bytes
    compress_algorithm: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def has_markers(self) -> bool:
        return bool(self.flags & FLAG_MARKERS)

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def total_grains(self) -> int:
        return -(-self.capacity // self.grain_size)

    @property
    def num_gts(self) -> int:
        return -(-self.total_grains // self.num_gtes_per_gt)

    @property
    def gt_bytes(self) -> int:
        return self.num_gtes_per_gt * 4

    @classmethod
    def parse(
        cls, data: bytes, *, max_virtual_size: int, offset: int = 0, what: str = "header"
    ) -> SparseHeader:
        if len(data) < SECTOR:
            raise FormatError(f"truncated sparse extent {what}", fmt=FMT, offset=offset)
        if data[:4] == VMDK_COWD_MAGIC:
            raise FormatError(
                "ESX sparse (COWD) extents are delta disks and are not supported; "
                "consolidate the snapshot chain first",
                fmt=FMT,
                offset=offset,
            )
        fields = _HEADER.unpack_from(data, 0)
        (magic, version, flags, capacity, grain, d_off, d_size, gtes, rgd, gd, overhead,
         unclean, nl, algo) = fields  # fmt: skip
        if magic != MAGIC:
            raise FormatError(f"bad sparse extent {what} magic {magic:#x}", fmt=FMT, offset=offset)
        if version not in (1, 2, 3):
            raise FormatError(
                f"unsupported sparse extent version {version}", fmt=FMT, offset=offset + 4
            )
        if flags & FLAG_NL_DETECT and nl != NL_CHARS:
            raise FormatError(
                "newline check characters are damaged: the file was probably transferred "
                "in text (ASCII) mode",
                fmt=FMT,
                offset=offset + 73,
            )
        if grain & (grain - 1) or not MIN_GRAIN_SECTORS <= grain <= MAX_GRAIN_SECTORS:
            raise FormatError(
                f"grain size of {grain} sectors is not a power of two between "
                f"{MIN_GRAIN_SECTORS} and {MAX_GRAIN_SECTORS}",
                fmt=FMT,
                offset=offset + 20,
            )
        if not 1 <= gtes <= MAX_GTES_PER_GT:
            raise FormatError(f"{gtes} entries per grain table", fmt=FMT, offset=offset + 44)
        if capacity > max_virtual_size // SECTOR:
            raise FormatError(
                f"capacity of {capacity} sectors exceeds the limit of {max_virtual_size} bytes",
                fmt=FMT,
                offset=offset + 12,
            )
        if algo not in (COMPRESS_NONE, COMPRESS_DEFLATE):
            raise FormatError(f"unknown compression algorithm {algo}", fmt=FMT, offset=offset + 77)
        if flags & FLAG_COMPRESSED and algo != COMPRESS_DEFLATE:
            raise FormatError(
                "compressed grains without the deflate algorithm", fmt=FMT, offset=offset + 77
            )
        if d_off and d_size * SECTOR > MAX_DESCRIPTOR_BYTES:
            raise FormatError(f"descriptor of {d_size} sectors", fmt=FMT, offset=offset + 36)
        return cls(
            version=version,
            flags=flags,
            capacity=capacity,
            grain_size=grain,
            descriptor_offset=d_off,
            descriptor_size=d_size,
            num_gtes_per_gt=gtes,
            rgd_offset=rgd,
            gd_offset=gd,
            overhead=overhead,
            unclean_shutdown=bool(unclean),
            nl_chars=nl,
            compress_algorithm=algo,
        )

    def pack(self) -> bytes:
        raw = _HEADER.pack(
            MAGIC,
            self.version,
            self.flags,
            self.capacity,
            self.grain_size,
            self.descriptor_offset,
            self.descriptor_size,
            self.num_gtes_per_gt,
            self.rgd_offset,
            self.gd_offset,
            self.overhead,
            int(self.unclean_shutdown),
            self.nl_chars,
            self.compress_algorithm,
        )
        return raw.ljust(SECTOR, b"\0")

    def with_gd(self, gd_offset: int) -> SparseHeader:
        return replace(self, gd_offset=gd_offset)


def pack_grain_marker(lba: int, size: int) -> bytes:
    return _GRAIN_MARKER.pack(lba, size)


def unpack_grain_marker(data: bytes | memoryview, pos: int = 0) -> tuple[int, int]:
    lba, size = _GRAIN_MARKER.unpack_from(data, pos)
    return int(lba), int(size)


def pack_meta_marker(num_sectors: int, marker_type: int) -> bytes:
    return _META_MARKER.pack(num_sectors, 0, marker_type).ljust(SECTOR, b"\0")


def unpack_meta_marker(data: bytes | memoryview, pos: int = 0) -> tuple[int, int, int]:
    """``(num_sectors_or_lba, size, type)``; ``size != 0`` means a grain marker."""
    num, size, mtype = _META_MARKER.unpack_from(data, pos)
    return int(num), int(size), int(mtype)


# --- descriptor ---------------------------------------------------------------------

_EXTENT_RE = re.compile(
    r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$'
)
_KV_RE = re.compile(r'^([A-Za-z][\w.]*)\s*=\s*(.*?)\s*$')


@dataclass(frozen=True, slots=True)
class ExtentLine:
    access: str
    sectors: int
    kind: str
    filename: str | None
    offset: int


@dataclass(slots=True)
class Descriptor:
    """The parts of a VMDK text descriptor this module acts on."""

    values: dict[str, str] = field(default_factory=dict)
    extents: list[ExtentLine] = field(default_factory=list)

    @property
    def create_type(self) -> str:
        return self.values.get("createType", "")

    @property
    def parent_cid(self) -> str:
        return self.values.get("parentCID", "ffffffff")

    def refuse_delta(self, offset: int | None = None) -> None:
        """Refuse a disk whose contents depend on a parent (a snapshot delta)."""
        if self.parent_cid.lower() != "ffffffff" or "parentFileNameHint" in self.values:
            raise FormatError(
                f"delta (child) disk with parentCID={self.parent_cid} is not supported; "
                "consolidate the snapshot chain first",
                fmt=FMT,
                offset=offset,
            )


def parse_descriptor(raw: bytes, *, offset: int = 0) -> Descriptor:
    """Parse descriptor text (NUL padding ignored). Unknown lines are ignored."""
    raw = raw.split(b"\0", 1)[0]
    text = raw.decode("utf-8", errors="replace")
    desc = Descriptor()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, kind, name, ext_off = m.groups()
            desc.extents.append(
                ExtentLine(access, int(sectors), kind.upper(), name, int(ext_off or 0))
            )
            continue
        kv = _KV_RE.match(line)
        if kv:
            key, value = kv.groups()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            desc.values[key] = value
    if not desc.extents:
        raise FormatError("descriptor lists no extents", fmt=FMT, offset=offset)
    return desc


SPLIT_TYPES = {
    "twogbmaxextentsparse",
    "twogbmaxextentflat",
}
DELTA_TYPES = {"vmfssparse", "sesparse", "vsansparse"}
RDM_TYPES = {"vmfsraw", "vmfsrawdevicemap", "vmfspassthroughrawdevicemap", "fulldevice",
              "partitioneddevice"}  # fmt: skip
FLAT_TYPES = {"monolithicflat", "vmfs", "vmfspreallocated", "vmfseagerzeroedthick", "vmfsthin"}


def check_create_type(desc: Descriptor, offset: int | None) -> str:
    """Refuse split, delta and raw-device disks; return the lower-cased createType."""
    ctype = desc.create_type
    low = ctype.lower()
    if low in SPLIT_TYPES or len(desc.extents) > 1:
        raise FormatError(
            f"split/multi-extent disk (createType={ctype!r}, {len(desc.extents)} extents) is "
            "not supported; convert it to a monolithic disk first (vmware-vdiskmanager -r)",
            fmt=FMT,
            offset=offset,
        )
    if low in DELTA_TYPES:
        raise FormatError(
            f"delta disk (createType={ctype!r}) is not supported; consolidate snapshots first",
            fmt=FMT,
            offset=offset,
        )
    if low in RDM_TYPES:
        raise FormatError(
            f"raw device mapping (createType={ctype!r}) has no disk data to migrate",
            fmt=FMT,
            offset=offset,
        )
    desc.refuse_delta(offset)
    return low


ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX", "pvscsi", "lsisas1068")


def geometry(capacity: int, adapter_type: str) -> tuple[int, int, int]:
    """``(cylinders, heads, sectors)`` for the descriptor's ddb.geometry entries."""
    if adapter_type == "ide":
        heads, sectors, max_cyl = 16, 63, 16383
    else:
        heads, sectors, max_cyl = 255, 63, 65535
    cylinders = min(max(capacity // (heads * sectors), 1), max_cyl)
    return cylinders, heads, sectors


def build_descriptor(
    *,
    capacity: int,
    filename: str,
    create_type: str = "streamOptimized",
    adapter_type: str = "lsilogic",
    hw_version: str = "4",
) -> bytes:
    """Descriptor text in the shape vSphere (OVF import) and Workstation accept."""
    cid = secrets.randbelow(0xFFFFFFFE) + 1
    cyl, heads, sectors = geometry(capacity, adapter_type)
    safe_name = filename.replace('"', "_").replace("\n", "_") or "disk.vmdk"
    lines = [
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid:08x}",
        "parentCID=ffffffff",
        f'createType="{create_type}"',
        "",
        "# Extent description",
        f'RW {capacity} SPARSE "{safe_name}"',
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        f'ddb.adapterType = "{adapter_type}"',
        f'ddb.geometry.cylinders = "{cyl}"',
        f'ddb.geometry.heads = "{heads}"',
        f'ddb.geometry.sectors = "{sectors}"',
        f'ddb.longContentID = "{secrets.token_hex(16)}"',
        'ddb.toolsVersion = "2147483647"',
        f'ddb.virtualHWVersion = "{hw_version}"',
        "",
    ]
    return "\n".join(lines).encode("utf-8")
