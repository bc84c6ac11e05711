"""Format detection and the one place that maps a format name to its module.

Every format module (``app/formats/<name>.py``) exposes:

- ``probe(head: bytes, tail: bytes) -> bool``: do these bytes look like this format?
  ``head`` is the first :data:`~app.formats.base.PROBE_SIZE` bytes, ``tail`` the last
  512 (VHD fixed keeps its only footer at the end). The probes are defined in
  :mod:`app.formats.probes`, which :func:`probe` uses without importing the modules.
- ``async open_reader(source, *, max_virtual_size) -> ImageReader``
- ``create_writer(sink, virtual_size, options) -> ImageWriter``
"""

from __future__ import annotations

import importlib
from types import ModuleType

from app.formats.base import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    FORMATS,
    PROBE_SIZE,
    FormatError,
    ImageReader,
    ImageWriter,
    RandomAccessSource,
    SeekableSink,
    SequentialSink,
    SequentialSource,
    WriterOptions,
)
from app.formats.probes import PROBES


def format_module(fmt: str) -> ModuleType:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return importlib.import_module(f"app.formats.{fmt}")


def probe(head: bytes, tail: bytes = b"") -> str:
    """Name the format of an image from its first and last bytes ('raw' if none match).
    Only the signatures are looked at (:mod:`app.formats.probes`): no format module is
    imported until one is opened."""
    for fmt, looks_like in PROBES.items():
        if looks_like(head, tail):
            return fmt
    return "raw"


async def probe_source(source: RandomAccessSource) -> str:
    head = await source.read_at(0, PROBE_SIZE)
    tail = await source.read_at(max(source.size - 512, 0), 512) if source.size >= 512 else b""
    return probe(head, tail)


async def open_reader(
    source: RandomAccessSource | SequentialSource,
    fmt: str | None = None,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    virtual_size: int | None = None,
) -> ImageReader:
    """Open an image reader, detecting the format from the bytes when possible.

    A declared ``fmt`` that disagrees with what the bytes say is a :class:`FormatError`.
    A sequential source needs a declared format (it cannot be probed without consuming
    it), and a raw one its ``virtual_size`` (raw bytes carry no header saying it).
    """
    if isinstance(source, RandomAccessSource):
        detected = await probe_source(source)
        if fmt is not None and fmt != detected:
            raise FormatError(f"declared format {fmt!r} but the image looks like {detected!r}")
        fmt = detected
    elif fmt is None:
        raise FormatError("a sequential source needs a declared format")
    if fmt == "raw" and virtual_size is not None:
        from app.formats import raw

        return await raw.open_reader(source, max_virtual_size=max_virtual_size,
                                     virtual_size=virtual_size)
    reader: ImageReader = await format_module(fmt).open_reader(
        source, max_virtual_size=max_virtual_size
    )
    return reader


def create_writer(
    fmt: str,
    sink: SeekableSink | SequentialSink,
    virtual_size: int,
    options: WriterOptions | None = None,
) -> ImageWriter:
    writer: ImageWriter = format_module(fmt).create_writer(
        sink, virtual_size, options or WriterOptions()
    )
    return writer
