"""On-disk structures of qcow2 shared by the reader and the writer.

Header (v2 and v3) parsing and packing, header extensions, L1/L2 entry bit layouts,
refcount-structure sizing and the cluster compression codecs (raw deflate and zstd).
Everything is big-endian on disk. See the QEMU "Qcow2 Image File Format" spec.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zstandard as _zstd
from isal import isal_zlib as _isal_zlib

from app.formats.base import FormatError
from app.formats.probes import QCOW2_MAGIC

FMT = "qcow2"

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
#: What this module writes for v3: the 104 mandatory bytes plus compression_type and
#: padding to a multiple of 8.
V3_HEADER_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # 2 MiB, QEMU's implementation limit
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's limit on the L1 table
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024  # QEMU's limit on the refcount table
MAX_BACKING_NAME = 1023

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# L1 / L2 entry bits.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
L1_RESERVED_MASK = 0x7F00_0000_0000_01FF  # bits 0-8 and 56-62
L2_STD_RESERVED_MASK = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61

COMPRESSED_SECTOR = 512

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3_EXTRA = struct.Struct(">QQQII")  # 32 bytes, offsets 72-103
_EXT_HEADER = struct.Struct(">II")


def div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return div_round_up(a, b) * b


@dataclass(slots=True)
class Header:
    """The fixed qcow2 header (fields past 104 bytes: only ``compression_type``)."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @classmethod
    def parse(cls, data: bytes) -> Header:
        """Decode the header fields (no semantic validation beyond what decoding needs)."""
        if len(data) < _HEADER_V2.size:
            raise FormatError(f"truncated header ({len(data)} bytes)", fmt=FMT, offset=0)
        (
            magic,
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
        ) = _HEADER_V2.unpack_from(data)
        if magic != QCOW2_MAGIC:
            raise FormatError(f"bad magic {magic!r}, not a qcow2 image", fmt=FMT, offset=0)
        if version not in (2, 3):
            raise FormatError(f"unsupported qcow2 version {version}", fmt=FMT, offset=4)
        hdr = cls(
            version=version,
            cluster_bits=cluster_bits,
            size=size,
            l1_size=l1_size,
            l1_table_offset=l1_table_offset,
            refcount_table_offset=refcount_table_offset,
            refcount_table_clusters=refcount_table_clusters,
            backing_file_offset=backing_file_offset,
            backing_file_size=backing_file_size,
            crypt_method=crypt_method,
            nb_snapshots=nb_snapshots,
            snapshots_offset=snapshots_offset,
        )
        if version == 3:
            if len(data) < V3_MIN_HEADER_LENGTH:
                raise FormatError("truncated v3 header", fmt=FMT, offset=len(data))
            (
                hdr.incompatible_features,
                hdr.compatible_features,
                hdr.autoclear_features,
                hdr.refcount_order,
                hdr.header_length,
            ) = _HEADER_V3_EXTRA.unpack_from(data, _HEADER_V2.size)
            if hdr.header_length > V3_MIN_HEADER_LENGTH:
                if len(data) <= V3_MIN_HEADER_LENGTH:
                    raise FormatError("truncated v3 header", fmt=FMT, offset=len(data))
                hdr.compression_type = data[V3_MIN_HEADER_LENGTH]
        return hdr

    def pack(self) -> bytes:
        out = _HEADER_V2.pack(
            QCOW2_MAGIC,
            self.version,
            self.backing_file_offset,
            self.backing_file_size,
            self.cluster_bits,
            self.size,
            self.crypt_method,
            self.l1_size,
            self.l1_table_offset,
            self.refcount_table_offset,
            self.refcount_table_clusters,
            self.nb_snapshots,
            self.snapshots_offset,
        )
        if self.version >= 3:
            out += _HEADER_V3_EXTRA.pack(
                self.incompatible_features,
                self.compatible_features,
                self.autoclear_features,
                self.refcount_order,
                self.header_length,
            )
            if self.header_length > V3_MIN_HEADER_LENGTH:
                extra = bytes([self.compression_type])
                out += extra + bytes(self.header_length - V3_MIN_HEADER_LENGTH - 1)
        return out


def parse_extensions(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """Header extensions in ``data[start:end]`` up to the end marker.

    Each extension is 8 bytes of type and length, then the data padded to 8 bytes.
    Extensions only move forwards, so the walk always terminates; one that claims to
    run past ``end`` is malformed.
    """
    out: list[tuple[int, bytes]] = []
    pos = start
    end = min(end, len(data))
    while pos + _EXT_HEADER.size <= end:
        ext_type, length = _EXT_HEADER.unpack_from(data, pos)
        if ext_type == EXT_END:
            break
        body = pos + _EXT_HEADER.size
        if length > end - body:
            raise FormatError(
                f"header extension {ext_type:#010x} of {length} bytes runs past the header area",
                fmt=FMT,
                offset=pos,
            )
        out.append((ext_type, bytes(data[body : body + length])))
        pos = body + round_up(length, 8)
    return out


def feature_names(table: bytes) -> dict[tuple[int, int], str]:
    """``(type, bit) -> name`` from a feature name table extension."""
    names: dict[tuple[int, int], str] = {}
    for pos in range(0, len(table) - 47, 48):
        kind, bit = table[pos], table[pos + 1]
        raw_name = table[pos + 2 : pos + 48].split(b"\0", 1)[0]
        names[(kind, bit)] = raw_name.decode("utf-8", "replace")
    return names


# ------------------------------------------------------------------ entries and sizing


def l2_entry_size(extended_l2: bool) -> int:
    return 16 if extended_l2 else 8


def l2_entries_per_table(cluster_size: int, extended_l2: bool) -> int:
    return cluster_size // l2_entry_size(extended_l2)


def l1_entries_needed(virtual_size: int, cluster_size: int, extended_l2: bool = False) -> int:
    per_table = cluster_size * l2_entries_per_table(cluster_size, extended_l2)
    return div_round_up(virtual_size, per_table)


def compressed_shift(cluster_bits: int) -> int:
    """Bit position of the sector-count field of a compressed cluster descriptor."""
    return 62 - (cluster_bits - 8)


def decode_compressed(entry: int, cluster_bits: int) -> tuple[int, int]:
    """``(host_offset, length)`` of a compressed cluster descriptor (L2 entry)."""
    shift = compressed_shift(cluster_bits)
    host = entry & ((1 << shift) - 1)
    sectors = ((entry >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host, sectors * COMPRESSED_SECTOR - (host & (COMPRESSED_SECTOR - 1))


def encode_compressed(host: int, length: int, cluster_bits: int) -> int:
    """The L2 entry for ``length`` compressed bytes stored at ``host``."""
    shift = compressed_shift(cluster_bits)
    extra_sectors = (host + length - 1) // COMPRESSED_SECTOR - host // COMPRESSED_SECTOR
    if host >= 1 << shift or extra_sectors >= 1 << (cluster_bits - 8):
        raise FormatError("compressed cluster does not fit its descriptor", fmt=FMT, offset=host)
    return OFLAG_COMPRESSED | (extra_sectors << shift) | host


def refcount_layout(
    used_clusters: int, cluster_size: int, refcount_bits: int = 16
) -> tuple[int, int]:
    """``(blocks, table_clusters)`` so that refcount blocks and table, appended after
    ``used_clusters`` clusters, cover every cluster including themselves."""
    per_block = cluster_size * 8 // refcount_bits
    blocks = table = 0
    while True:
        total = used_clusters + blocks + table
        new_blocks = div_round_up(total, per_block)
        new_table = div_round_up(new_blocks * 8, cluster_size)
        if (new_blocks, new_table) == (blocks, table):
            return blocks, table
        blocks, table = new_blocks, new_table


# ------------------------------------------------------------------ compression

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def codec_pool() -> ThreadPoolExecutor:
    """The process-wide pool that (de)compresses clusters (zlib, isal and zstd all
    release the GIL): one worker per CPU."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="qcow2-codec"
            )
        return _POOL


def deflate_cluster(data: bytes | bytearray | memoryview, level: int) -> bytes:
    """Raw deflate (no zlib header), as qcow2 stores ``zlib`` clusters.

    Levels 1-3 use ISA-L (much faster, comparable ratio); other levels use zlib so the
    requested ratio/speed trade-off is honoured. Any window size inflates with the
    usual 32 KiB-window raw inflate.
    """
    if 1 <= level <= 3:
        co: Any = _isal_zlib.compressobj(level, _isal_zlib.DEFLATED, -15)
    else:
        # QEMU's parameters: a 4 KiB window and memLevel 9 compress clusters about 1.5x
        # faster than the defaults for a ratio within a few percent.
        co = zlib.compressobj(level, zlib.DEFLATED, -12, 9)
    out: bytes = co.compress(data) + co.flush()
    return out


def inflate_cluster(data: bytes | memoryview, cluster_size: int, where: int) -> bytes:
    """Inflate one raw-deflate cluster, never producing more than ``cluster_size``.

    A stream that would produce more than a cluster is malformed; trailing bytes after
    the end of the stream (sector padding, the next cluster) are ignored.
    """
    try:
        d = zlib.decompressobj(-15)
        out = d.decompress(data, cluster_size)
        if not d.eof and d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1):
            raise FormatError(
                f"compressed cluster inflates beyond the cluster size {cluster_size}",
                fmt=FMT,
                offset=where,
            )
    except zlib.error as exc:
        raise FormatError(f"bad compressed cluster: {exc}", fmt=FMT, offset=where) from exc
    if len(out) != cluster_size:
        raise FormatError(
            f"compressed cluster inflates to {len(out)} bytes, expected {cluster_size}",
            fmt=FMT,
            offset=where,
        )
    return out


#: Largest zstd window accepted when decompressing (QEMU's clusters are <= 2 MiB).
_ZSTD_MAX_WINDOW = 1 << 23

_zstd_local = threading.local()


def _zstd_dctx() -> Any:
    dctx = getattr(_zstd_local, "dctx", None)
    if dctx is None:
        dctx = _zstd.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        _zstd_local.dctx = dctx
    return dctx


def unzstd_cluster(data: bytes | memoryview, cluster_size: int, where: int) -> bytes:
    """Decompress one zstd cluster, never allocating more than ``cluster_size``.

    The frame header is checked first: a declared content size other than the cluster
    size is refused before the library allocates anything.
    """
    try:
        params = _zstd.get_frame_parameters(bytes(data[:18]))
        if params.content_size not in (cluster_size, _zstd.CONTENTSIZE_UNKNOWN):
            raise FormatError(
                f"zstd cluster declares {params.content_size} bytes, expected {cluster_size}",
                fmt=FMT,
                offset=where,
            )
        if params.window_size > _ZSTD_MAX_WINDOW:
            raise FormatError("zstd cluster needs an absurd window", fmt=FMT, offset=where)
        out: bytes = _zstd_dctx().decompress(data, max_output_size=cluster_size)
    except _zstd.ZstdError as exc:
        raise FormatError(f"bad zstd cluster: {exc}", fmt=FMT, offset=where) from exc
    if len(out) != cluster_size:
        raise FormatError(
            f"zstd cluster decompresses to {len(out)} bytes, expected {cluster_size}",
            fmt=FMT,
            offset=where,
        )
    return out
