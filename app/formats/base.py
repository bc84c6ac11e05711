"""Shared vocabulary of the disk image formats: extents, byte sources and sinks,
reader and writer interfaces, and :class:`FormatError`.

A disk is a sequence of :class:`Extent` values that together cover
``[0, virtual_size)`` in increasing offset order without gaps or overlaps. An extent
either carries its bytes (``data``) or is a zero run (``data is None``). Zero runs are
never materialised as bytes anywhere in the data path.

Readers turn bytes in some container format into extents; writers turn extents into
bytes of some container format. Both are async, so the same code reads a local file,
an HTTP response or an SSH channel.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from app.errors import AppError

SECTOR = 512
MiB = 1024 * 1024
GiB = 1024 * MiB

#: Default size of the data chunks readers emit. Large enough to amortise per-chunk
#: overhead, small enough that queue depth x chunk size stays a few MiB.
DEFAULT_CHUNK = 1 * MiB

#: Largest virtual size any reader accepts unless told otherwise (64 TiB). Headers that
#: declare more are treated as malformed rather than trusted.
DEFAULT_MAX_VIRTUAL_SIZE = 64 * 1024 * GiB

FORMATS = ("raw", "qcow2", "vmdk", "vhd", "vhdx")


class FormatError(AppError):
    """Malformed, unsupported or mismatching image data.

    ``what`` says what is wrong, ``offset`` (when known) where in the container file.
    """

    status = 422
    code = "format-error"
    title = "Invalid disk image"

    def __init__(self, what: str, *, fmt: str | None = None, offset: int | None = None) -> None:
        where = f" at byte {offset}" if offset is not None else ""
        prefix = f"{fmt}: " if fmt else ""
        super().__init__(f"{prefix}{what}{where}")
        self.what = what
        self.fmt = fmt
        self.offset = offset


def immutable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` as a buffer nobody can change under a writer that still holds it (write-
    behind): ``bytes`` and read-only views (of bytes, of a read-only file mapping) as
    they are, without a copy; a ``bytearray`` or writable view is copied."""
    if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly):
        return data
    return bytes(data)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the virtual disk: ``length`` bytes at ``offset``; ``data`` is None for zeros.

    ``data`` must not change once the extent exists: writers keep writes in flight
    after ``write`` returns. Producers with reusable buffers pass them through
    :func:`immutable`.
    """

    offset: int
    length: int
    data: bytes | memoryview | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_zero(self) -> bool:
        return self.data is None

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length <= 0:
            raise ValueError(f"bad extent offset={self.offset} length={self.length}")
        if self.data is not None and len(self.data) != self.length:
            raise ValueError(f"extent data is {len(self.data)} bytes, length says {self.length}")


@runtime_checkable
class RandomAccessSource(Protocol):
    """Bytes that can be read at any offset (a file, an HTTP resource with Range)."""

    @property
    def size(self) -> int:
        """Total size in bytes."""
        ...

    def read_at(self, offset: int, length: int) -> Awaitable[bytes]:
        """Read up to ``length`` bytes at ``offset``; shorter only at end of data."""
        ...

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        """``(offset, length)`` of the ranges that may hold data, or None if unknown.

        Files answer with SEEK_DATA/SEEK_HOLE; anything else may return None.
        """
        ...

    async def close(self) -> None: ...


@runtime_checkable
class SequentialSource(Protocol):
    """Bytes that can only be read in order (a pipe, an HTTP body, an SSH channel)."""

    async def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes; ``b""`` at end of stream."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class SequentialSink(Protocol):
    """A byte stream written in order."""

    async def write(self, data: bytes | memoryview) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class SeekableSink(Protocol):
    """A byte target written at arbitrary offsets (a file, a block device)."""

    def write_at(self, offset: int, data: bytes | memoryview) -> Awaitable[None]:
        """Write ``data`` at ``offset``. An ``async def`` implements this; so does a
        method that starts the write at once and returns a future (the file sink)."""
        ...

    async def truncate(self, size: int) -> None:
        """Set the size; growing leaves a hole that reads back as zeros."""
        ...

    async def flush(self) -> None:
        """Make everything written so far durable (fsync)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class ImageInfo:
    """What a reader learned from the headers."""

    format: str
    virtual_size: int
    subformat: str | None = None
    cluster_size: int | None = None
    details: dict[str, str | int | bool] = field(default_factory=dict)


class ImageReader(abc.ABC):
    """Bytes in a container format -> extents of the virtual disk.

    Build one with the format's ``open`` coroutine; it parses and validates headers
    before returning, so a malformed image fails before any extent is produced.
    """

    format: ClassVar[str]
    #: True when the reader needs :class:`RandomAccessSource` (read_at); False when it
    #: can work on a :class:`SequentialSource` alone.
    needs_random_access: ClassVar[bool]

    info: ImageInfo

    @property
    def virtual_size(self) -> int:
        return self.info.virtual_size

    @abc.abstractmethod
    def extents(self, chunk_size: int = DEFAULT_CHUNK) -> AsyncIterator[Extent]:
        """Yield extents covering ``[0, virtual_size)`` in order.

        Data extents are at most ``chunk_size`` bytes; zero extents may be any length
        (adjacent zero runs should be merged). Raises :class:`FormatError` on malformed
        data found while reading.
        """

    async def allocation_map(self) -> list[tuple[int, int]] | None:
        """``(offset, length)`` of virtual ranges that may hold non-zero data, if the
        format knows it without reading the data (qcow2 L2 tables, VHD BAT, ...)."""
        return None

    def skip_below(self, offset: int) -> bool:
        """The consumer drops everything below ``offset`` (a conversion resumed there):
        the reader may report that part as zeros without reading its data. Call before
        :meth:`extents`. True when this reader does skip; the default reads as usual."""
        return False

    async def close(self) -> None:  # noqa: B027
        """Release the underlying source."""


class ImageWriter(abc.ABC):
    """Extents of a virtual disk -> bytes in a container format.

    ``write`` takes extents in increasing offset order (gaps are zeros); ``finish``
    writes trailing metadata and makes the result complete. A writer never writes
    the bytes of a zero extent if the format can express a hole.
    """

    format: ClassVar[str]
    #: True when the writer can produce its output as a pure sequential stream.
    streamable: ClassVar[bool]
    #: True when streaming output needs :meth:`set_allocation_map` before data.
    needs_allocation_map: ClassVar[bool] = False

    def __init__(self, virtual_size: int) -> None:
        if virtual_size < 0:
            raise FormatError("negative virtual size", fmt=self.format)
        self.virtual_size = virtual_size

    async def set_allocation_map(self, ranges: list[tuple[int, int]]) -> None:  # noqa: B027
        """Tell the writer which virtual ranges will carry data (may be a superset)."""

    @abc.abstractmethod
    async def write(self, extent: Extent) -> None:
        """Consume the next extent."""

    @abc.abstractmethod
    async def finish(self) -> None:
        """Write trailing metadata, flush, and leave a complete image."""

    def durable_offset(self) -> int:
        """Highest virtual offset below which everything written is durable.

        Writers that cannot resume return 0.
        """
        return 0


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """Format-specific knobs for writers; a writer ignores what does not apply to it.

    - ``subformat``: vhd ``fixed``/``dynamic``; vmdk ``streamOptimized``; qcow2 ``v2``/``v3``.
    - ``compress``: compress clusters/grains where the format allows it.
    - ``cluster_size``: qcow2 cluster size / vhd block size / vmdk grain size, in bytes.
    - ``compression_level``: zlib level 1-9.
    - ``target_zeroed``: the destination reads back as zeros where nothing is written
      (a new file); False for a device that may hold old data, so zero runs must be
      written explicitly.
    """

    subformat: str | None = None
    compress: bool = False
    cluster_size: int | None = None
    compression_level: int = 6
    target_zeroed: bool = True


#: Bytes read from the start (and, for formats with a footer, the end) of an image for
#: :func:`app.formats.registry.probe`.
PROBE_SIZE = 64 * 1024
