"""monolithicFlat / ESXi vmfs VMDKs: a text descriptor naming one flat extent file.

The descriptor must come from a :class:`~app.formats.io.FileSource`; the extent is
resolved relative to the descriptor's directory and must stay inside it (absolute paths
and ``..`` leading elsewhere, including through symlinks, are refused).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from app.formats.base import (
    DEFAULT_CHUNK,
    SECTOR,
    Extent,
    FormatError,
    ImageInfo,
    ImageReader,
    RandomAccessSource,
)
from app.formats.io import FileSource
from app.formats.vdisk_common import ExtentBuilder, read_exact_at
from app.formats.vmdk_meta import (
    FLAT_TYPES,
    FMT,
    MAX_DESCRIPTOR_BYTES,
    Descriptor,
    check_create_type,
    parse_descriptor,
)


def resolve_extent_path(descriptor_path: Path, name: str) -> Path:
    """The extent file ``name`` names, which must be inside the descriptor's directory."""
    if not name or "\0" in name:
        raise FormatError("descriptor has an empty or invalid extent file name", fmt=FMT)
    base = descriptor_path.parent
    candidate = Path(name) if os.path.isabs(name) else base / name
    base_real = os.path.realpath(base)
    real = os.path.realpath(candidate)
    if os.path.commonpath([base_real, real]) != base_real or real == base_real:
        raise FormatError(
            f"extent file {name!r} resolves outside the descriptor's directory; refusing",
            fmt=FMT,
        )
    return Path(real)


class VmdkFlatReader(ImageReader):
    """A single FLAT/VMFS extent described by a text descriptor."""

    format: ClassVar[str] = "vmdk"
    needs_random_access: ClassVar[bool] = True

    def __init__(
        self,
        descriptor_source: RandomAccessSource,
        extent: RandomAccessSource,
        start: int,
        virtual_size: int,
        desc: Descriptor,
        extent_path: Path,
    ) -> None:
        self._desc_source = descriptor_source
        self._extent = extent
        self._start = start
        self._used = False
        self.info = ImageInfo(
            format=FMT,
            virtual_size=virtual_size,
            subformat=desc.create_type or "monolithicFlat",
            details={"extent_file": str(extent_path), "extent_offset": start},
        )

    async def close(self) -> None:
        await self._extent.close()
        await self._desc_source.close()

    async def _data_ranges(self) -> list[tuple[int, int]]:
        """Virtual ranges that may hold data, from the extent file's holes if known."""
        vsize = self.virtual_size
        ranges = await self._extent.data_ranges()
        if ranges is None:
            return [(0, vsize)] if vsize else []
        out: list[tuple[int, int]] = []
        for off, length in ranges:
            lo = max(off - self._start, 0)
            hi = min(off + length - self._start, vsize)
            if hi > lo:
                out.append((lo, hi - lo))
        return out

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        return await self._data_ranges()

    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        if self._used:
            raise FormatError("extents() can be iterated once per reader", fmt=FMT)
        self._used = True
        return self._flat_extents(chunk_size)

    async def _flat_extents(self, chunk_size: int) -> AsyncIterator[Extent]:
        builder = ExtentBuilder(chunk_size)
        vsize = self.virtual_size
        for off, length in await self._data_ranges():
            for ext in builder.zero(builder.pos, off - builder.pos):
                yield ext
            pos = off
            end = off + length
            while pos < end:
                n = min(chunk_size, end - pos)
                data = await read_exact_at(
                    self._extent, self._start + pos, n, FMT, "flat extent data"
                )
                for ext in builder.data(pos, data):
                    yield ext
                pos += n
        for ext in builder.zero(builder.pos, vsize - builder.pos):
            yield ext
        for ext in builder.finish():
            yield ext


async def open_flat(source: RandomAccessSource, max_virtual_size: int) -> ImageReader:
    if source.size > MAX_DESCRIPTOR_BYTES:
        raise FormatError("descriptor file is too large", fmt=FMT, offset=0)
    desc = parse_descriptor(await read_exact_at(source, 0, source.size, FMT, "descriptor"))
    low = check_create_type(desc, 0)
    ext = desc.extents[0]
    if low not in FLAT_TYPES or ext.kind not in ("FLAT", "VMFS"):
        raise FormatError(
            f"descriptor-only disk of type {desc.create_type!r} with a {ext.kind} extent is not "
            "supported (expected monolithicFlat/vmfs with one FLAT/VMFS extent)",
            fmt=FMT,
            offset=0,
        )
    if ext.access == "NOACCESS":
        raise FormatError("extent is marked NOACCESS", fmt=FMT, offset=0)
    vsize = ext.sectors * SECTOR
    if vsize > max_virtual_size:
        raise FormatError(
            f"virtual size {vsize} exceeds the limit of {max_virtual_size} bytes", fmt=FMT
        )
    path = getattr(source, "path", None)
    if not isinstance(source, FileSource) or not isinstance(path, Path):
        raise FormatError(
            "a monolithicFlat descriptor refers to an extent file; open it from a local file",
            fmt=FMT,
        )
    extent_path = resolve_extent_path(path, ext.filename or "")
    extent = FileSource(extent_path)
    start = ext.offset * SECTOR
    if extent.size < start + vsize:
        await extent.close()
        raise FormatError(
            f"extent file {extent_path.name} holds {extent.size} bytes, the descriptor needs "
            f"{start + vsize}",
            fmt=FMT,
        )
    return VmdkFlatReader(source, extent, start, vsize, desc, extent_path)
