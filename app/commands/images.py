"""``vmigrate convert`` and ``vmigrate info``: disk images on local files, no service needed.

``convert IN OUT --to FMT`` streams ``IN`` through the extent pipeline into a temporary
file next to ``OUT`` and renames it over ``OUT`` only when the image is complete, so a
failed or interrupted conversion never leaves a partial ``OUT``. ``info IMAGE`` prints
what the headers say (and, with ``--digest``, the ``vmd1`` digest of the virtual disk).

Sizes (``--cluster-size``, ``--throttle``) take binary suffixes like qemu-img:
``64K`` = 65536, ``10M`` = 10 MiB; ``k``/``KiB``/``KB`` all mean 1024.

Exit status: 0 on success, 2 for a malformed or unsupported image (and for usage
errors), 1 for any other failure, 130 when interrupted. Errors are one line on stderr.

Run standalone with ``python -m app.commands.images convert ...``.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from app.dataplane.convert import ConvertOptions, convert, tune_allocator
from app.dataplane.core import PipelineError, TransferProgress
from app.errors import AppError
from app.formats import registry
from app.formats.base import FORMATS, FormatError, ImageReader, WriterOptions
from app.formats.digest import ParallelDigest
from app.formats.io import FileSink, FileSource

T = TypeVar("T")

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*(?:/s)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"64K"`` -> 65536, ``"1.5M"`` -> 1572864, ``"10MiB/s"`` -> 10485760 (binary units)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 65536, 64K, 10M, 1G)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"size must be at least 1 byte: {text!r}")
    return int(value)


class SizeParam(click.ParamType[int]):
    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def progress_line(p: TransferProgress) -> str:
    """One status line: percentage (when the total is known), bytes and rate."""
    done = human_size(p.bytes_done)
    rate = f"{human_size(p.rate)}/s"
    if p.bytes_total:
        pct = 100.0 * p.bytes_done / p.bytes_total
        return f"{pct:5.1f}%  {done} / {human_size(p.bytes_total)}  {rate}"
    return f"{done}  {rate}"


class _TtyProgress:
    """Rewrites one line on a terminal with ``\\r``; finished with a newline."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._width = 0

    def __call__(self, p: TransferProgress) -> None:
        line = progress_line(p)
        pad = " " * max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write(f"\r{line}{pad}")
        self.stream.flush()

    def close(self) -> None:
        if self._width:
            self.stream.write("\n")
            self.stream.flush()


#: Set when an image command has done all it will do (output published, files closed,
#: no task or thread busy): :func:`app.cli.run` may then end the process at once.
finished = False


def _finished() -> None:
    global finished
    finished = True


def _fail(message: str, code: int) -> NoReturn:
    one_line = " ".join(message.split())
    click.echo(f"vmigrate: error: {one_line}", err=True)
    raise click.exceptions.Exit(code)


def _event_loop_run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed (it comes with uvicorn[standard], and
    the API runs on it too), else on asyncio's own loop. uvloop's cheaper loop
    iterations and wake-ups took about 10 % off the wall time of the benchmark's raw ->
    qcow2 and raw -> vhd conversions (6 alternating runs each)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; translate every error into one line on stderr and an exit code."""
    try:
        return _event_loop_run(make())
    except PipelineError as exc:
        _fail(str(exc), 2 if isinstance(exc.cause, FormatError) else 1)
    except FormatError as exc:
        _fail(str(exc), 2)
    except AppError as exc:
        _fail(str(exc), 1)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:  # a bug: still one line, but say what it was
        if os.environ.get("VMIGRATE_DEBUG"):
            raise
        _fail(f"unexpected {type(exc).__name__}: {exc} (VMIGRATE_DEBUG=1 for a traceback)", 1)


# --------------------------------------------------------------------------- convert


@dataclass(frozen=True, slots=True)
class ConvertRequest:
    src: Path
    dst: Path
    to_fmt: str
    from_fmt: str | None
    options: WriterOptions
    throttle: int | None
    digest: bool
    sync: bool = False


class _DeferredSyncSink(FileSink):
    """A :class:`FileSink` whose ``flush`` does nothing: writers flush for resumable
    checkpoints, which a one-shot CLI conversion does not need. The command makes the
    result durable once at the end when asked (``--sync``), like ``qemu-img convert``
    whose default destination cache mode (``unsafe``) never flushes."""

    async def flush(self) -> None:
        return None

    async def sync(self) -> None:
        await super().flush()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.{os.urandom(6).hex()}.part")


async def convert_file(
    req: ConvertRequest, on_progress: Callable[[TransferProgress], None] | None = None
) -> str | None:
    """Convert ``req.src`` to ``req.dst`` atomically; returns the digest when asked for."""
    source = FileSource(req.src)
    reader: ImageReader | None = None
    try:
        reader = await registry.open_reader(source, req.from_fmt)
        tmp = _temp_path(req.dst)
        sink = _DeferredSyncSink(tmp)
        try:
            writer = registry.create_writer(req.to_fmt, sink, reader.virtual_size, req.options)
            options = ConvertOptions(
                throttle_bps=req.throttle,
                on_progress=on_progress,
                progress_hz=4.0,
                digest=req.digest,
            )
            result = await convert(reader, writer, options)
            if req.sync:
                await sink.sync()
            await sink.close()
            os.replace(tmp, req.dst)
            if req.sync:
                await asyncio.to_thread(_fsync_dir, req.dst.parent)
        except BaseException:
            await sink.close()
            tmp.unlink(missing_ok=True)
            raise
        return result.digest
    finally:
        if reader is not None:
            await reader.close()
        await source.close()


@click.command("convert")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "to_fmt", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option(
    "--from", "from_fmt", type=click.Choice(FORMATS), help="Input format (default: probe)."
)
@click.option("--subformat", help="vhd: fixed|dynamic; vmdk: streamOptimized; qcow2: v2|v3.")
@click.option("--compress", is_flag=True, help="Compress clusters/grains where the format can.")
@click.option(
    "--compression-level",
    type=click.IntRange(1, 9),
    default=3,
    show_default=True,
    help="1-3: fast (ISA-L where the writer has it), 4-9: zlib, smaller and much slower.",
)
@click.option("--cluster-size", type=SIZE, help="qcow2 cluster / vhd block / vmdk grain size.")
@click.option("--throttle", type=SIZE, metavar="BYTES/s", help="Limit data bytes per second.")
@click.option("--digest", is_flag=True, help="Print the vmd1 digest of the disk when done.")
@click.option(
    "--sync", is_flag=True, help="fsync OUT before it replaces the old one (default: page cache)."
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress line (default: when stdout is a TTY)."
)
def convert_command(
    src: Path,
    dst: Path,
    to_fmt: str,
    from_fmt: str | None,
    subformat: str | None,
    compress: bool,
    compression_level: int,
    cluster_size: int | None,
    throttle: int | None,
    digest: bool,
    sync: bool,
    progress: bool | None,
) -> None:
    """Convert disk image IN into OUT in another format (OUT appears only when complete)."""
    req = ConvertRequest(
        src=src,
        dst=dst,
        to_fmt=to_fmt,
        from_fmt=from_fmt,
        options=WriterOptions(
            subformat=subformat,
            compress=compress,
            cluster_size=cluster_size,
            compression_level=compression_level,
        ),
        throttle=throttle,
        digest=digest,
        sync=sync,
    )
    tune_allocator()
    show = sys.stdout.isatty() if progress is None else progress
    bar = _TtyProgress(sys.stdout) if show else None
    try:
        result = _run(lambda: convert_file(req, bar))
    finally:
        if bar is not None:
            bar.close()
    if result is not None:
        click.echo(result)
    _finished()


# --------------------------------------------------------------------------- info


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, ln in sorted(ranges):
        if ln <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + ln) - start)
        else:
            out.append((off, ln))
    return out


async def _scan(reader: ImageReader, digest: bool) -> tuple[list[tuple[int, int]], str | None]:
    """Read every extent: the data ranges, and the digest when asked for (hashed on
    every core, :class:`~app.formats.digest.ParallelDigest`)."""
    d = ParallelDigest(reader.virtual_size) if digest else None
    ranges: list[tuple[int, int]] = []
    try:
        async for ext in reader.extents():
            if d is not None:
                await d.feed(ext)
            if ext.data is None:
                continue
            if ranges and ranges[-1][0] + ranges[-1][1] == ext.offset:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + ext.length)
            else:
                ranges.append((ext.offset, ext.length))
        return ranges, (await d.hexdigest() if d is not None else None)
    finally:
        if d is not None:
            d.cancel()


async def image_info(path: Path, fmt: str | None = None, *, digest: bool = False) -> dict[str, Any]:
    """What ``info`` prints, as a JSON-ready dict."""
    source = FileSource(path)
    reader: ImageReader | None = None
    try:
        reader = await registry.open_reader(source, fmt)
        info = reader.info
        allocation = await reader.allocation_map()
        how = "map"
        text_digest = None
        if allocation is None or digest:
            scanned, text_digest = await _scan(reader, digest)
            if allocation is None:
                allocation, how = scanned, "scan"
        merged = _merge(allocation)
        out: dict[str, Any] = {
            "filename": str(path),
            "format": info.format,
            "subformat": info.subformat,
            "virtual_size": info.virtual_size,
            "file_size": source.size,
            "cluster_size": info.cluster_size,
            "allocated_ranges": len(merged),
            "allocated_bytes": sum(ln for _, ln in merged),
            "allocation_from": how,
            "details": dict(info.details),
        }
        if text_digest is not None:
            out["digest"] = text_digest
        return out
    finally:
        if reader is not None:
            await reader.close()
        await source.close()


def _render_info(info: dict[str, Any]) -> str:
    fmt = info["format"] + (f" ({info['subformat']})" if info["subformat"] else "")
    lines = [
        f"image: {info['filename']}",
        f"format: {fmt}",
        f"virtual size: {human_size(info['virtual_size'])} ({info['virtual_size']} bytes)",
        f"file size: {human_size(info['file_size'])} ({info['file_size']} bytes)",
    ]
    if info["cluster_size"]:
        lines.append(f"cluster size: {info['cluster_size']}")
    lines.append(
        f"allocated: {info['allocated_ranges']} ranges, {human_size(info['allocated_bytes'])}"
        f" ({info['allocation_from']})"
    )
    lines.extend(f"{key}: {value}" for key, value in sorted(info["details"].items()))
    if "digest" in info:
        lines.append(f"digest: {info['digest']}")
    return "\n".join(lines)


@click.command("info")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_fmt", type=click.Choice(FORMATS), help="Format (default: probe).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--digest", is_flag=True, help="Read the whole disk and add its vmd1 digest.")
def info_command(image: Path, from_fmt: str | None, as_json: bool, digest: bool) -> None:
    """Show format, virtual size and allocation of a disk image."""
    tune_allocator()  # a scan reads the whole disk, a fresh 1 MiB buffer per read
    info = _run(lambda: image_info(image, from_fmt, digest=digest))
    if as_json:
        import json  # here only: the image commands import what they use (start-up)

        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(_render_info(info))
    _finished()


images_commands: list[click.Command] = [convert_command, info_command]


@click.group()
def main() -> None:
    """Disk image tools (the same commands as ``vmigrate convert`` / ``vmigrate info``)."""


for _command in images_commands:
    main.add_command(_command)


if __name__ == "__main__":
    main()
