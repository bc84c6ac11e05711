"""VMDK (VMware virtual disk): readers for the common single-extent kinds and a
streamOptimized writer.

Supported for reading:

- **streamOptimized** (vSphere ExportVm / OVF / OVA): compressed grains with grain
  markers. Works on a :class:`~app.formats.base.SequentialSource` by walking the markers
  in order (see :mod:`app.formats.vmdk_stream`), and on a random-access source through
  the grain directory (from the footer, or from the header in qemu's layout).
- **monolithicSparse** (hosted sparse extent with an embedded descriptor): random
  access via the grain directory and grain tables; zeroed-grain entries read as zeros.
- **monolithicFlat** / ESXi **vmfs** (a text descriptor next to a ``-flat.vmdk`` file,
  :mod:`app.formats.vmdk_flat`): the descriptor must be opened from a
  :class:`~app.formats.io.FileSource`; its single FLAT/VMFS extent is resolved relative
  to the descriptor's directory and must stay inside it (absolute paths and ``..`` that
  lead elsewhere, including via symlinks, are refused).

Refused with a :class:`~app.formats.base.FormatError`: delta/child disks (parentCID not
ffffffff, COWD/vmfsSparse/seSparse), split disks (twoGbMaxExtent*, several extents),
raw device mappings, sparse extents without an embedded descriptor (one piece of a
split disk), compressed extents without grain markers, images larger than
``max_virtual_size``, and every kind of damage the readers detect (bad magic,
truncation, tables past the end of the file, grains that inflate beyond the grain size,
markers out of order, text-mode transfer damage).

Writing: streamOptimized only (:class:`~app.formats.vmdk_stream.StreamOptimizedWriter`),
as a pure sequential stream. ``options.cluster_size`` sets the grain size (64 KiB
default); pass :class:`~app.formats.vmdk_stream.VmdkWriterOptions` to set the adapter
type (``lsilogic`` default) and hardware version recorded in the descriptor.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import AsyncIterator
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
from app.formats.probes import vmdk_descriptor, vmdk_sparse
from app.formats.vdisk_common import (
    ExtentBuilder,
    StreamReader,
    read_exact_at,
)
from app.formats.vmdk_flat import VmdkFlatReader, open_flat
from app.formats.vmdk_meta import (
    FMT,
    GD_AT_END,
    GRAIN_MARKER_SIZE,
    MARKER_EOS,
    MARKER_FOOTER,
    Descriptor,
    SparseHeader,
    check_create_type,
    parse_descriptor,
    unpack_grain_marker,
    unpack_meta_marker,
)
from app.formats.vmdk_stream import (
    BATCH_GRAINS,
    Grain,
    StreamOptimizedWriter,
    VmdkWriterOptions,
    emit_runs,
    inflate_grains,
    max_compressed_size,
    walk_stream,
)

__all__ = [
    "StreamOptimizedWriter",
    "VmdkFlatReader",
    "VmdkSparseReader",
    "VmdkWriterOptions",
    "create_writer",
    "open_reader",
    "probe",
]


probe = probes.vmdk


# --- sparse extents (monolithicSparse, streamOptimized) ------------------------------


_NO_DESCRIPTOR = (
    "sparse extent has no embedded descriptor: it is probably one extent of a split disk; "
    "open the disk's descriptor file instead"
)


async def _read_embedded_descriptor(
    source: RandomAccessSource | StreamReader, hdr: SparseHeader
) -> Descriptor:
    if not hdr.descriptor_offset or not hdr.descriptor_size:
        raise FormatError(_NO_DESCRIPTOR, fmt=FMT, offset=28)
    start = hdr.descriptor_offset * SECTOR
    length = hdr.descriptor_size * SECTOR
    if isinstance(source, StreamReader):
        if start < source.pos:
            raise FormatError("descriptor overlaps the header", fmt=FMT, offset=28)
        await source.skip(start - source.pos, "header padding")
        raw = await source.read_exact(length, "descriptor")
    else:
        raw = await read_exact_at(source, start, length, FMT, "embedded descriptor")
    if not raw.split(b"\0", 1)[0].strip():
        raise FormatError(_NO_DESCRIPTOR, fmt=FMT, offset=start)
    return parse_descriptor(raw, offset=start)


def _sparse_kind(hdr: SparseHeader, desc: Descriptor) -> str:
    """'streamOptimized' or 'monolithicSparse' from flags and createType (consistently)."""
    low = check_create_type(desc, hdr.descriptor_offset * SECTOR)
    ext = desc.extents[0]
    if ext.kind != "SPARSE":
        raise FormatError(
            f"embedded descriptor lists a {ext.kind} extent, expected SPARSE",
            fmt=FMT,
            offset=hdr.descriptor_offset * SECTOR,
        )
    if ext.sectors != hdr.capacity:
        raise FormatError(
            f"descriptor says {ext.sectors} sectors but the header says {hdr.capacity}",
            fmt=FMT,
            offset=hdr.descriptor_offset * SECTOR,
        )
    stream = hdr.compressed and hdr.has_markers
    if hdr.compressed != hdr.has_markers:
        raise FormatError(
            "compressed grains without grain markers (or markers without compression) "
            "are not supported",
            fmt=FMT,
            offset=8,
        )
    if low == "streamoptimized" and not stream:
        raise FormatError(
            "createType is streamOptimized but the header has no compressed grain markers",
            fmt=FMT,
            offset=8,
        )
    if low not in ("streamoptimized", "monolithicsparse", ""):
        raise FormatError(f"unsupported createType {desc.create_type!r}", fmt=FMT)
    if hdr.gd_offset == GD_AT_END and not stream:
        raise FormatError("grain directory at end is only valid for streamOptimized", fmt=FMT)
    return "streamOptimized" if stream else "monolithicSparse"


def _u32_list(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 4}I", data[: len(data) // 4 * 4]))


class VmdkSparseReader(ImageReader):
    """monolithicSparse (and streamOptimized on a random-access source) via GD and GTs."""

    format: ClassVar[str] = "vmdk"
    needs_random_access: ClassVar[bool] = True

    def __init__(
        self,
        source: RandomAccessSource | None,
        hdr: SparseHeader,
        gd: list[int] | None,
        subformat: str,
        *,
        stream: StreamReader | None = None,
        closer: RandomAccessSource | SequentialSource | None = None,
        details: dict[str, str | int | bool] | None = None,
    ) -> None:
        self._source = source
        self._hdr = hdr
        self._gd = gd
        self._stream = stream
        self._closer = closer
        self._used = False
        self.info = ImageInfo(
            format=FMT,
            virtual_size=hdr.capacity * SECTOR,
            subformat=subformat,
            cluster_size=hdr.grain_bytes,
            details=dict(details or {}),
        )

    async def close(self) -> None:
        if self._closer is not None:
            closer, self._closer = self._closer, None
            await closer.close()

    # -- grain tables
    async def _read_gt(self, gt_index: int, count: int) -> list[int]:
        assert self._gd is not None
        assert self._source is not None
        sector = self._gd[gt_index]
        return _u32_list(
            await read_exact_at(
                self._source, sector * SECTOR, count * 4, FMT, f"grain table {gt_index}"
            )
        )

    async def _tables(self) -> AsyncIterator[tuple[int, list[int] | None]]:
        """(first grain index, GT entries or None when the GT is absent) in order."""
        assert self._gd is not None
        hdr = self._hdr
        total = hdr.total_grains
        for gt_index in range(hdr.num_gts):
            first = gt_index * hdr.num_gtes_per_gt
            count = min(hdr.num_gtes_per_gt, total - first)
            if not self._gd[gt_index]:
                yield first, None
                continue
            yield first, await self._read_gt(gt_index, count)

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        if self._gd is None:
            return None
        gb = self._hdr.grain_bytes
        vsize = self.virtual_size
        ranges: list[tuple[int, int]] = []
        async for first, entries in self._tables():
            if entries is None:
                continue
            for j, gte in enumerate(entries):
                if gte <= 1:
                    continue
                off = (first + j) * gb
                length = min(gb, vsize - off)
                if ranges and ranges[-1][0] + ranges[-1][1] == off:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((off, length))
        return ranges

    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        if self._used:
            raise FormatError("extents() can be iterated once per reader", fmt=FMT)
        self._used = True
        if self._stream is not None:
            return walk_stream(self._stream, self._hdr, chunk_size)
        return self._table_extents(chunk_size)

    async def _table_extents(self, chunk_size: int) -> AsyncIterator[Extent]:
        hdr = self._hdr
        gb = hdr.grain_bytes
        vsize = self.virtual_size
        builder = ExtentBuilder(chunk_size)
        async for first, entries in self._tables():
            if entries is None:
                start = first * gb
                end = min((first + hdr.num_gtes_per_gt) * gb, vsize)
                for ext in builder.zero(start, end - start):
                    yield ext
                continue
            if hdr.compressed:
                gen = self._compressed_gt(builder, first, entries)
            else:
                gen = self._plain_gt(builder, first, entries, chunk_size)
            async for ext in gen:
                yield ext
        if builder.pos < vsize:  # pragma: no cover - tables cover the whole disk
            for ext in builder.zero(builder.pos, vsize - builder.pos):
                yield ext
        for ext in builder.finish():
            yield ext

    async def _plain_gt(
        self, builder: ExtentBuilder, first: int, entries: list[int], chunk_size: int
    ) -> AsyncIterator[Extent]:
        assert self._source is not None
        gs = self._hdr.grain_size
        gb = self._hdr.grain_bytes
        vsize = self.virtual_size
        run_max = max(1, chunk_size // gb)
        j = 0
        n = len(entries)
        while j < n:
            off = (first + j) * gb
            gte = entries[j]
            k = j + 1
            if gte <= 1:
                while k < n and entries[k] <= 1:
                    k += 1
                end = min((first + k) * gb, vsize)
                for ext in builder.zero(off, end - off):
                    yield ext
                j = k
                continue
            while k < n and k - j < run_max and entries[k] == entries[k - 1] + gs:
                k += 1
            end = min((first + k) * gb, vsize)
            data = await read_exact_at(
                self._source, gte * SECTOR, end - off, FMT, f"grain {first + j}"
            )
            for ext in builder.data(off, data):
                yield ext
            j = k

    async def _compressed_gt(
        self, builder: ExtentBuilder, first: int, entries: list[int]
    ) -> AsyncIterator[Extent]:
        assert self._source is not None
        hdr = self._hdr
        gb = hdr.grain_bytes
        vsize = self.virtual_size
        src_size = self._source.size
        max_comp = max_compressed_size(gb)
        starts = sorted(e * SECTOR for e in entries if e > 1)
        allocated = [(first + j, e) for j, e in enumerate(entries)]
        i = 0
        while i < len(allocated):
            index, gte = allocated[i]
            if gte <= 1:
                k = i + 1
                while k < len(allocated) and allocated[k][1] <= 1:
                    k += 1
                off = index * gb
                end = min(allocated[k - 1][0] * gb + gb, vsize)
                for ext in builder.zero(off, end - off):
                    yield ext
                i = k
                continue
            batch: list[tuple[int, int, int]] = []  # grain index, file offset, window end
            while i < len(allocated) and allocated[i][1] > 1 and len(batch) < BATCH_GRAINS:
                index, gte = allocated[i]
                start = gte * SECTOR
                nxt = bisect.bisect_right(starts, start)
                limit = start + GRAIN_MARKER_SIZE + max_comp
                end = min(starts[nxt] if nxt < len(starts) else limit, limit, src_size)
                batch.append((index, start, end))
                i += 1
            comps = await self._read_batch(batch)
            grains: list[Grain] = [
                (index * gb, comp, start)
                for comp, (index, start, _) in zip(comps, batch, strict=True)
            ]
            for ext in emit_runs(builder, await inflate_grains(grains, gb, vsize)):
                yield ext

    async def _read_batch(self, batch: list[tuple[int, int, int]]) -> list[bytes | memoryview]:
        """Compressed payloads of the grains in ``batch`` (validating their markers);
        views of one read of the span they lie in when it is not too large."""
        assert self._source is not None
        gs = self._hdr.grain_size
        max_comp = max_compressed_size(self._hdr.grain_bytes)
        lo = min(s for _, s, _ in batch)
        hi = max(e for _, _, e in batch)
        span: memoryview | None = None
        if hi - lo <= 16 * 1024 * 1024:
            span = memoryview(await self._source.read_at(lo, hi - lo))
        out: list[bytes | memoryview] = []
        for index, start, end in batch:
            window: bytes | memoryview
            if span is not None:
                window = span[start - lo : end - lo]
            else:
                window = await self._source.read_at(start, end - start)
            if len(window) < GRAIN_MARKER_SIZE:
                raise FormatError(f"grain {index} is past the end of the file", fmt=FMT,
                                  offset=start)  # fmt: skip
            lba, size = unpack_grain_marker(window)
            if lba != index * gs:
                raise FormatError(
                    f"grain marker says LBA {lba}, grain table says {index * gs}",
                    fmt=FMT,
                    offset=start,
                )
            if not 0 < size <= max_comp:
                raise FormatError(f"compressed grain size {size}", fmt=FMT, offset=start)
            if GRAIN_MARKER_SIZE + size > len(window):
                window = await read_exact_at(
                    self._source, start, GRAIN_MARKER_SIZE + size, FMT, f"grain {index}"
                )
            out.append(window[GRAIN_MARKER_SIZE : GRAIN_MARKER_SIZE + size])
        return out


async def _load_gd(source: RandomAccessSource, hdr: SparseHeader) -> list[int]:
    gd_offset = hdr.gd_offset
    if gd_offset == GD_AT_END:
        gd_offset = await _footer_gd(source, hdr)
    gd = _u32_list(
        await read_exact_at(source, gd_offset * SECTOR, hdr.num_gts * 4, FMT, "grain directory")
    )
    limit = source.size
    for i, sector in enumerate(gd):
        if sector and sector * SECTOR + hdr.gt_bytes > limit:
            raise FormatError(
                f"grain table {i} at sector {sector} lies past the end of the file",
                fmt=FMT,
                offset=gd_offset * SECTOR + 4 * i,
            )
    return gd


async def _footer_gd(source: RandomAccessSource, hdr: SparseHeader) -> int:
    """Grain directory offset from a streamOptimized footer (footer marker, footer, EOS)."""
    size = source.size
    if size < 3 * SECTOR or size % SECTOR:
        raise FormatError(
            "streamOptimized file does not end with footer and end-of-stream markers",
            fmt=FMT,
            offset=size,
        )
    tail = await read_exact_at(source, size - 3 * SECTOR, 3 * SECTOR, FMT, "footer")
    _, msize, mtype = unpack_meta_marker(tail, 0)
    eos = unpack_meta_marker(tail, 2 * SECTOR)
    if msize or mtype != MARKER_FOOTER or eos[1] or eos[2] != MARKER_EOS:
        raise FormatError(
            "streamOptimized file does not end with footer and end-of-stream markers "
            "(truncated?)",
            fmt=FMT,
            offset=size - 3 * SECTOR,
        )
    footer = SparseHeader.parse(
        tail[SECTOR : 2 * SECTOR],
        max_virtual_size=hdr.capacity * SECTOR,
        offset=size - 2 * SECTOR,
        what="footer",
    )
    if (footer.capacity, footer.grain_size, footer.num_gtes_per_gt) != (
        hdr.capacity,
        hdr.grain_size,
        hdr.num_gtes_per_gt,
    ):
        raise FormatError("footer disagrees with the header", fmt=FMT, offset=size - 2 * SECTOR)
    if footer.gd_offset == GD_AT_END:
        raise FormatError("footer has no grain directory offset", fmt=FMT, offset=size - 2 * SECTOR)
    return footer.gd_offset


class VmdkStreamReader(VmdkSparseReader):
    """streamOptimized: sequential marker walk, or grain tables on a random source."""

    needs_random_access: ClassVar[bool] = False


def _details(hdr: SparseHeader, desc: Descriptor) -> dict[str, str | int | bool]:
    details: dict[str, str | int | bool] = {
        "version": hdr.version,
        "create_type": desc.create_type,
        "unclean_shutdown": hdr.unclean_shutdown,
    }
    if "ddb.adapterType" in desc.values:
        details["adapter_type"] = desc.values["ddb.adapterType"]
    return details


async def _open_sparse_random(
    source: RandomAccessSource, head: bytes, max_virtual_size: int
) -> ImageReader:
    hdr = SparseHeader.parse(head, max_virtual_size=max_virtual_size)
    desc = await _read_embedded_descriptor(source, hdr)
    kind = _sparse_kind(hdr, desc)
    gd = await _load_gd(source, hdr)
    cls = VmdkStreamReader if kind == "streamOptimized" else VmdkSparseReader
    return cls(source, hdr, gd, kind, closer=source, details=_details(hdr, desc))


async def _open_stream(source: SequentialSource, max_virtual_size: int) -> ImageReader:
    rd = StreamReader(source, FMT)
    head = await rd.read_exact(SECTOR, "header")
    if not vmdk_sparse(head):
        if vmdk_descriptor(head):
            raise FormatError(
                "a VMDK descriptor file refers to extent files; open it from a local file",
                fmt=FMT,
                offset=0,
            )
        raise FormatError("not a VMDK sparse extent (bad magic)", fmt=FMT, offset=0)
    hdr = SparseHeader.parse(head, max_virtual_size=max_virtual_size)
    desc = await _read_embedded_descriptor(rd, hdr)
    kind = _sparse_kind(hdr, desc)
    if kind != "streamOptimized":
        raise FormatError(
            f"{kind} VMDKs need random access; only streamOptimized can be read as a stream",
            fmt=FMT,
        )
    return VmdkStreamReader(
        None, hdr, None, kind, stream=rd, closer=source, details=_details(hdr, desc)
    )


# --- module contract ------------------------------------------------------------------


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> ImageReader:
    """Open a VMDK (see the module docstring for what is supported)."""
    if isinstance(source, RandomAccessSource):
        head = await source.read_at(0, 4096)
        if vmdk_sparse(head):
            return await _open_sparse_random(source, head, max_virtual_size)
        if vmdk_descriptor(head):
            return await open_flat(source, max_virtual_size)
        raise FormatError("not a VMDK: no sparse extent magic and no descriptor", fmt=FMT, offset=0)
    return await _open_stream(source, max_virtual_size)


def create_writer(
    sink: SeekableSink | SequentialSink, virtual_size: int, options: WriterOptions
) -> ImageWriter:
    """A streamOptimized writer (the only VMDK subformat written)."""
    sub = options.subformat
    if sub not in (None, "streamOptimized"):
        raise FormatError(f"can only write streamOptimized VMDKs, not {sub!r}", fmt=FMT)
    return StreamOptimizedWriter(sink, virtual_size, options)
