"""VMDK: readers against qemu-img output, the streamOptimized writer against qemu-img,
sequential reading, refusals and hand-built damaged streams.

Also holds small helpers the VHD/VHDX/fuzz tests share.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.formats import registry, vmdk
from app.formats.base import Extent, FormatError, ImageReader, ImageWriter, WriterOptions
from app.formats.io import BytesSource, FileSink, FileSource, SequentialFileSource
from app.formats.vmdk_meta import (
    COMPRESS_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    GD_AT_END,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    NL_CHARS,
    SparseHeader,
    build_descriptor,
    pack_grain_marker,
    pack_meta_marker,
)
from app.formats.vmdk_stream import VmdkWriterOptions
from tests.formats import oracle

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# --- shared helpers -------------------------------------------------------------------


class ChunkySequentialSource:
    """A sequential source over bytes returning random short reads."""

    def __init__(self, data: bytes, seed: int = 0) -> None:
        self._data = data
        self._pos = 0
        self._rng = random.Random(seed)

    async def read(self, n: int) -> bytes:
        take = min(n, self._rng.randint(1, max(1, n)))
        out = self._data[self._pos : self._pos + take]
        self._pos += len(out)
        return out

    async def close(self) -> None:
        return None


class StreamOnlySink:
    """A sink with nothing but sequential writes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    async def write(self, data: bytes | memoryview) -> None:
        self.buffer += data

    async def close(self) -> None:
        return None


def extents_of(data: bytes, chunk: int = 256 * KiB) -> list[Extent]:
    """Extents of ``data``: all-zero chunks as zero extents (merged), the rest as data."""
    out: list[Extent] = []
    for off in range(0, len(data), chunk):
        piece = data[off : off + chunk]
        if piece.count(0) == len(piece):
            if out and out[-1].data is None:
                out[-1] = Extent(out[-1].offset, out[-1].length + len(piece))
            else:
                out.append(Extent(off, len(piece)))
        else:
            out.append(Extent(off, len(piece), piece))
    return out


async def file_extents(path: Path, chunk: int = 1 * MiB) -> AsyncIterator[Extent]:
    """Extents of a (sparse) raw file: holes as zero extents, data in chunks."""
    src = FileSource(path)
    try:
        pos = 0
        for off, length in await src.data_ranges() or [(0, src.size)]:
            if off > pos:
                yield Extent(pos, off - pos)
            end = off + length
            while off < end:
                n = min(chunk, end - off)
                yield Extent(off, n, await src.read_at(off, n))
                off += n
            pos = end
        if pos < src.size:
            yield Extent(pos, src.size - pos)
    finally:
        await src.close()


async def write_all(writer: ImageWriter, extents: list[Extent] | AsyncIterator[Extent]) -> None:
    if isinstance(extents, list):
        for ext in extents:
            await writer.write(ext)
    else:
        async for ext in extents:
            await writer.write(ext)
    await writer.finish()


async def read_and_close(reader: ImageReader, chunk: int = 1 * MiB) -> bytes:
    try:
        return await oracle.read_all(reader, chunk)
    finally:
        await reader.close()


def assert_same_content(a: Path, b: Path) -> None:
    """Same size and same bytes (qemu-img compare without -s: strict mode also compares
    allocation status, and readers legitimately return zero-filled parts of a grain or
    block as data)."""
    assert a.stat().st_size == b.stat().st_size
    proc = oracle.qemu_img("compare", "-f", "raw", "-F", "raw", a, b, check=False)
    assert proc.returncode == 0, f"{a} and {b} differ: {proc.stdout}{proc.stderr}"


def padded(data: bytes, multiple: int = 512) -> bytes:
    return data + bytes(-len(data) % multiple)


def make_raw(path: Path, size: int, layout: list[tuple[int, int]], seed: int = 0) -> bytes:
    oracle.make_sparse_raw(path, size, layout, seed)
    return path.read_bytes() if size <= 64 * MiB else b""


# --- hand-built streamOptimized files -------------------------------------------------


def build_stream(
    capacity: int,
    grains: list[tuple[int, bytes]],
    *,
    grain_sectors: int = 8,
    footer: bool = True,
    eos: bool = True,
    gts: bool = True,
) -> bytes:
    """A VMware-layout streamOptimized file; ``grains`` are (lba, zlib payload) in file
    order (not necessarily LBA order)."""
    hdr = SparseHeader(
        version=3,
        flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity=capacity,
        grain_size=grain_sectors,
        descriptor_offset=1,
        descriptor_size=20,
        num_gtes_per_gt=512,
        rgd_offset=0,
        gd_offset=GD_AT_END,
        overhead=128,
        unclean_shutdown=False,
        nl_chars=NL_CHARS,
        compress_algorithm=COMPRESS_DEFLATE,
    )
    out = bytearray(hdr.pack())
    out += build_descriptor(capacity=capacity, filename="x.vmdk").ljust(20 * 512, b"\0")
    out += bytes(128 * 512 - len(out))
    gt_entries: dict[int, int] = {}
    for lba, payload in grains:
        gt_entries[lba // grain_sectors] = len(out) // 512
        out += pack_grain_marker(lba, len(payload)) + payload
        out += bytes(-len(out) % 512)
    total_grains = -(-capacity // grain_sectors)
    num_gts = -(-total_grains // 512)
    gd = [0] * num_gts
    if gts:
        for t in range(num_gts):
            entries = [gt_entries.get(t * 512 + j, 0) for j in range(512)]
            if any(entries):
                out += pack_meta_marker(4, MARKER_GT)
                gd[t] = len(out) // 512
                out += struct.pack("<512I", *entries)
    out += pack_meta_marker(-(-num_gts * 4 // 512), MARKER_GD)
    gd_sector = len(out) // 512
    out += struct.pack(f"<{num_gts}I", *gd)
    out += bytes(-len(out) % 512)
    if footer:
        out += pack_meta_marker(1, MARKER_FOOTER) + hdr.with_gd(gd_sector).pack()
    if eos:
        out += pack_meta_marker(0, MARKER_EOS)
    return bytes(out)


# --- readers against qemu-img ---------------------------------------------------------

CASES = {
    "one-sector": (512, [(0, 512)]),
    "odd-size": (5 * MiB + 3 * 512, [(0, 100), (64 * KiB - 10, 20), (3 * MiB + 7, 300_000),
                                     (5 * MiB + 3 * 512 - 700, 700)]),
    "no-data": (3 * MiB, []),
    "dense": (2 * MiB + 512, [(0, 2 * MiB + 512)]),
}  # fmt: skip


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse", "monolithicFlat"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_reader_matches_qemu(tmp_path: Path, subformat: str, case: str) -> None:
    size, layout = CASES[case]
    src = tmp_path / "src.raw"
    data = make_raw(src, size, layout)
    img = tmp_path / "disk.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src, img)
    reader = await registry.open_reader(FileSource(img))
    assert reader.info.subformat == subformat
    assert reader.virtual_size == size
    assert await read_and_close(reader, 64 * KiB) == data
    if subformat == "streamOptimized":
        seq = await registry.open_reader(SequentialFileSource(img), "vmdk")
        assert not seq.needs_random_access
        assert await read_and_close(seq) == data
        chunky = await vmdk.open_reader(ChunkySequentialSource(img.read_bytes(), seed=size))
        assert await read_and_close(chunky, 3 * 512) == data


@pytest.mark.parametrize("subformat", ["streamOptimized", "monolithicSparse"])
async def test_reader_big_sparse_disk(tmp_path: Path, subformat: str) -> None:
    size = 5 * GiB + 64 * KiB + 512
    layout = [(0, MiB), (4 * GiB - 100, 200), (4 * GiB + 12345, 70_000), (size - 1000, 1000)]
    src = tmp_path / "src.raw"
    make_raw(src, size, layout, seed=3)
    img = tmp_path / "disk.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", src, img)
    out = tmp_path / "out.raw"
    reader = await vmdk.open_reader(FileSource(img))
    assert await reader.allocation_map() == [
        (0, MiB), (4 * GiB - 64 * KiB, 192 * KiB), (5 * GiB, 64 * KiB + 512)
    ]  # fmt: skip
    await oracle.read_to_file(reader, out)
    await reader.close()
    assert_same_content(src, out)
    if subformat == "streamOptimized":
        reader = await vmdk.open_reader(SequentialFileSource(img))
        await oracle.read_to_file(reader, out)
        await reader.close()
        assert_same_content(src, out)


async def test_qemu_empty_stream_reads_as_zero_size(tmp_path: Path) -> None:
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    img = tmp_path / "empty.vmdk"
    # qemu-img writes the file but cannot open a zero-capacity VMDK itself.
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    src, img, check=False)  # fmt: skip
    reader = await vmdk.open_reader(FileSource(img))
    assert reader.virtual_size == 0
    assert await read_and_close(reader) == b""


# --- writer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "layout", "grain"),
    [
        (1000, [(0, 1000)], None),  # not a whole sector: rounded up
        (512, [], None),
        (7 * MiB + 3 * 512, [(5, 3000), (MiB - 1, 2), (2 * MiB, 2 * MiB + 17), (7 * MiB, 1536)],
         None),
        (3 * MiB + 4096, [(0, 3 * MiB + 4096)], 4 * KiB),
        (5 * MiB, [(100, 10), (4 * MiB + 1, 5000)], 1 * MiB),
    ],
)  # fmt: skip
async def test_writer_qemu_agrees(
    tmp_path: Path, size: int, layout: list[tuple[int, int]], grain: int | None
) -> None:
    src = tmp_path / "src.raw"
    data = make_raw(src, size, layout)
    img = tmp_path / "out.vmdk"
    writer = vmdk.create_writer(FileSink(img), size, WriterOptions(cluster_size=grain))
    assert writer.streamable
    await write_all(writer, file_extents(src))
    oracle.qemu_img("check", img)
    info = oracle.qemu_info(img)
    assert info["virtual-size"] == -(-size // 512) * 512
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    padded_src = tmp_path / "padded.raw"
    padded_src.write_bytes(padded(data))
    oracle.qemu_img("compare", "-f", "vmdk", "-F", "raw", img, padded_src)
    # And our readers, random and sequential, agree.
    assert await read_and_close(await vmdk.open_reader(FileSource(img))) == padded(data)
    assert await read_and_close(await vmdk.open_reader(SequentialFileSource(img))) == padded(data)


async def test_writer_streams_and_skips_zeros(tmp_path: Path) -> None:
    size = 40 * MiB  # more than one grain table (32 MiB with 64 KiB grains)
    rng = random.Random(5)
    buf = bytearray(size)
    buf[0:4096] = rng.randbytes(4096)
    buf[33 * MiB : 33 * MiB + 200_000] = rng.randbytes(200_000)
    data = bytes(buf)
    sink = StreamOnlySink()
    opts = VmdkWriterOptions(adapter_type="pvscsi", hw_version="14")
    writer = vmdk.create_writer(sink, size, opts)
    # Zero data chunks are handed over as data: the writer must still not store them.
    await write_all(writer, [Extent(o, MiB, data[o : o + MiB]) for o in range(0, size, MiB)])
    out = bytes(sink.buffer)
    assert len(out) < 600 * KiB
    assert out[:4] == b"KDMV"
    assert struct.unpack_from("<I", out, 4)[0] == 3  # ESXi wants version 3
    assert out[-512:] == bytes(512)  # EOS marker
    text = out[512 : 21 * 512].rstrip(b"\0").decode()
    for needle in ('createType="streamOptimized"', 'ddb.adapterType = "pvscsi"',
                   'ddb.virtualHWVersion = "14"', "ddb.toolsVersion", "parentCID=ffffffff",
                   "ddb.geometry.cylinders"):  # fmt: skip
        assert needle in text
    img = tmp_path / "s.vmdk"
    img.write_bytes(out)
    oracle.qemu_img("check", img)
    assert await read_and_close(await vmdk.open_reader(FileSource(img))) == data
    assert await read_and_close(await vmdk.open_reader(ChunkySequentialSource(out))) == data


async def test_writer_rejects_bad_input() -> None:
    with pytest.raises(FormatError):
        vmdk.create_writer(StreamOnlySink(), 10 * MiB, WriterOptions(subformat="monolithicFlat"))
    with pytest.raises(FormatError):
        vmdk.create_writer(StreamOnlySink(), 10 * MiB, WriterOptions(cluster_size=3000))
    with pytest.raises(FormatError):
        vmdk.create_writer(StreamOnlySink(), 10 * MiB, VmdkWriterOptions(adapter_type="scsi?"))
    writer = vmdk.create_writer(StreamOnlySink(), MiB, WriterOptions())
    await writer.write(Extent(4096, 10, b"x" * 10))
    with pytest.raises(FormatError):
        await writer.write(Extent(0, 10, b"y" * 10))
    with pytest.raises(FormatError):
        await writer.write(Extent(MiB - 5, 10, b"y" * 10))


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=3 * MiB),
    spans=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 200_000)), max_size=6),
    chunk=st.sampled_from([4 * KiB, 64 * KiB, 1 * MiB]),
    grain=st.sampled_from([4 * KiB, 64 * KiB]),
)
async def test_roundtrip_property(
    tmp_path: Path, size: int, spans: list[tuple[float, int]], chunk: int, grain: int
) -> None:
    rng = random.Random(size)
    buf = bytearray(size)
    for frac, length in spans:
        off = min(int(frac * size), size - 1)
        n = min(length, size - off)
        buf[off : off + n] = rng.randbytes(n)
    data = bytes(buf)
    sink = StreamOnlySink()
    await write_all(
        vmdk.create_writer(sink, size, WriterOptions(cluster_size=grain)), extents_of(data, chunk)
    )
    out = bytes(sink.buffer)
    for source in (BytesSource(out), ChunkySequentialSource(out, seed=size)):
        reader = await vmdk.open_reader(source)
        got = await read_and_close(reader, chunk)
        assert got == padded(data)


# --- sequential reading details ---------------------------------------------------------


def _grain(data: bytes) -> bytes:
    return zlib.compress(data)


async def test_stream_out_of_order_grains_need_random_access() -> None:
    g0, g1 = os.urandom(4096), os.urandom(4096)
    img = build_stream(64, [(8, _grain(g1)), (0, _grain(g0))])
    expected = g0 + g1 + bytes(64 * 512 - 8192)
    assert await read_and_close(await vmdk.open_reader(BytesSource(img))) == expected
    with pytest.raises(FormatError, match="out of order"):
        await read_and_close(await vmdk.open_reader(ChunkySequentialSource(img)))


@pytest.mark.parametrize("chunk", [512, 4096, MiB])
async def test_stream_hand_built_reads(chunk: int) -> None:
    g = [os.urandom(4096) for _ in range(3)]
    img = build_stream(5000, [(0, _grain(g[0])), (16, _grain(g[1])), (4992, _grain(g[2][:4096]))])
    expected = bytearray(5000 * 512)
    expected[0:4096] = g[0]
    expected[16 * 512 : 16 * 512 + 4096] = g[1]
    expected[4992 * 512 :] = g[2]
    for source in (BytesSource(img), ChunkySequentialSource(img, seed=chunk)):
        assert await read_and_close(await vmdk.open_reader(source), chunk) == bytes(expected)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("bomb", "inflates beyond"),
        ("truncated", "end-of-stream|truncated|footer"),
        ("no-footer", "footer"),
        ("bad-lba", "past the end"),
        ("corrupt", "corrupt|truncated"),
        ("unaligned", "grain aligned"),
        ("huge-size", "larger than allowed"),
        ("unknown-marker", "unknown marker"),
    ],
)
async def test_stream_damage_is_a_format_error(damage: str, pattern: str) -> None:
    good = _grain(os.urandom(4096))
    grains = [(0, good)]
    kw: dict[str, bool] = {}
    if damage == "bomb":
        grains = [(0, zlib.compress(bytes(4096 * 64)))]
    elif damage == "bad-lba":
        grains = [(0, good), (64, good)]
    elif damage == "corrupt":
        grains = [(0, good[:10] + bytes(20) + good[30:])]
    elif damage == "unaligned":
        grains = [(3, good)]
    elif damage == "no-footer":
        kw = {"footer": False}
    img = bytearray(build_stream(64, grains, **kw))
    if damage == "truncated":
        img = img[: 128 * 512 + 600]
    elif damage == "huge-size":
        struct.pack_into("<I", img, 128 * 512 + 8, 10 * MiB)
    elif damage == "unknown-marker":
        img[-512:] = pack_meta_marker(0, 9)
    seq = ChunkySequentialSource(bytes(img))
    with pytest.raises(FormatError, match=pattern):
        await read_and_close(await vmdk.open_reader(seq))
    if damage in ("bad-lba", "no-footer-tables"):
        return  # the grain tables never reference that grain: random access ignores it
    with pytest.raises(FormatError):
        await read_and_close(await vmdk.open_reader(BytesSource(bytes(img))))


async def test_truncated_qemu_stream_is_detected(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_raw(src, 4 * MiB, [(0, 3 * MiB)], seed=9)
    img = tmp_path / "q.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    src, img)  # fmt: skip
    whole = img.read_bytes()
    # Cut right after the 20th grain marker: qemu's layout has its tables at the front.
    pos, count = 128 * 512, 0
    while count < 20:
        _, size = struct.unpack_from("<QI", whole, pos)
        pos += -(-(12 + size) // 512) * 512
        count += 1
    with pytest.raises(FormatError, match="truncated"):
        await read_and_close(await vmdk.open_reader(ChunkySequentialSource(whole[:pos])))
    with pytest.raises(FormatError):
        await read_and_close(await vmdk.open_reader(BytesSource(whole[:pos])))


async def test_text_mode_transfer_damage_is_named() -> None:
    img = bytearray(build_stream(64, [(0, _grain(b"a" * 4096))]))
    img[73:77] = b"\n \n\n"
    with pytest.raises(FormatError, match="text"):
        await vmdk.open_reader(BytesSource(bytes(img)))


# --- refusals -------------------------------------------------------------------------


async def test_monolithic_sparse_needs_random_access(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_raw(src, MiB, [(0, 100)])
    img = tmp_path / "m.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", src, img)
    with pytest.raises(FormatError, match="random access"):
        await vmdk.open_reader(SequentialFileSource(img))


async def _flat_disk(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "src.raw"
    data = make_raw(src, 2 * MiB, [(10, 5000), (MiB, 1000)])
    img = tmp_path / "flat.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", src,
                    img)  # fmt: skip
    return img, data


async def test_flat_extent_paths(tmp_path: Path) -> None:
    img, data = await _flat_disk(tmp_path)
    original = img.read_text()
    flat = tmp_path / "flat-flat.vmdk"

    def point_to(name: str) -> None:
        img.write_text(original.replace('"flat-flat.vmdk"', f'"{name}"'))

    # An absolute path inside the descriptor's directory is fine.
    point_to(str(flat))
    assert await read_and_close(await vmdk.open_reader(FileSource(img))) == data
    # A sequential source or a source without a path cannot follow the reference.
    with pytest.raises(FormatError, match="local file"):
        await vmdk.open_reader(SequentialFileSource(img))
    with pytest.raises(FormatError, match="local file"):
        await vmdk.open_reader(BytesSource(img.read_bytes()))

    outside = tmp_path.parent / f"{tmp_path.name}-outside-flat.vmdk"
    outside.write_bytes(flat.read_bytes())
    try:
        for name in (f"../{outside.name}", str(outside), "/etc/passwd", "", "sub/../../x", "."):
            point_to(name)
            with pytest.raises(FormatError):
                await vmdk.open_reader(FileSource(img))
        link = tmp_path / "link-flat.vmdk"
        link.symlink_to(outside)
        point_to("link-flat.vmdk")
        with pytest.raises(FormatError, match="outside"):
            await vmdk.open_reader(FileSource(img))
    finally:
        outside.unlink()


async def test_flat_refusals(tmp_path: Path) -> None:
    img, _ = await _flat_disk(tmp_path)
    original = img.read_text()
    cases = {
        "multi": original.replace(
            'RW 4096 FLAT "flat-flat.vmdk" 0',
            'RW 2048 FLAT "flat-flat.vmdk" 0\nRW 2048 FLAT "flat-flat.vmdk" 2048',
        ),
        "delta": original.replace("parentCID=ffffffff", "parentCID=12345678"),
        "short": original.replace("RW 4096 FLAT", "RW 999999 FLAT"),
        "zero-extent": original.replace('RW 4096 FLAT "flat-flat.vmdk" 0', "RW 4096 ZERO"),
        "rdm": original.replace("monolithicFlat", "vmfsRawDeviceMap"),
    }
    for name, text in cases.items():
        assert text != original, name
        img.write_text(text)
        with pytest.raises(FormatError):
            await vmdk.open_reader(FileSource(img))
    img.write_text(original.replace("monolithicFlat", "vmfs"))
    reader = await vmdk.open_reader(FileSource(img))
    assert reader.virtual_size == 2 * MiB
    await reader.close()
    img.write_text(original)
    with pytest.raises(FormatError, match="exceeds"):
        await vmdk.open_reader(FileSource(img), max_virtual_size=MiB)


async def test_split_disks_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_raw(src, MiB, [(0, 100)])
    img = tmp_path / "split.vmdk"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
                    src, img)  # fmt: skip
    with pytest.raises(FormatError, match="split"):
        await vmdk.open_reader(FileSource(img))
    with pytest.raises(FormatError, match="split"):
        await vmdk.open_reader(FileSource(tmp_path / "split-s001.vmdk"))


async def test_header_refusals(tmp_path: Path) -> None:
    base = build_stream(64, [(0, _grain(b"a" * 4096))])

    def patched(offset: int, fmt: str, value: int) -> bytes:
        img = bytearray(base)
        struct.pack_into(fmt, img, offset, value)
        return bytes(img)

    bad = {
        "magic": patched(0, "<I", 0x12345678),
        "version": patched(4, "<I", 7),
        "grain": patched(20, "<Q", 3),
        "capacity": patched(12, "<Q", 1 << 62),
        "gtes": patched(44, "<I", 0),
        "algorithm": patched(77, "<H", 5),
        "markers-only": patched(8, "<I", FLAG_NL_DETECT | FLAG_MARKERS),
        "no-descriptor": patched(28, "<Q", 0),
        "cowd": b"COWD" + base[4:],
        "delta": base.replace(b"parentCID=ffffffff", b"parentCID=0000abcd"),
    }
    for name, img in bad.items():
        with pytest.raises(FormatError):
            await read_and_close(await vmdk.open_reader(BytesSource(img)))
        with pytest.raises(FormatError):
            await read_and_close(await vmdk.open_reader(ChunkySequentialSource(img)))
        assert name


async def test_probe() -> None:
    stream = build_stream(64, [(0, _grain(b"a" * 4096))])
    assert vmdk.probe(stream[:65536])
    assert registry.probe(stream[:65536], stream[-512:]) == "vmdk"
    assert vmdk.probe(b"# Disk DescriptorFile\nversion=1\n")
    assert vmdk.probe(b'\n\ncreateType="monolithicFlat"\nRW 8 FLAT "a" 0\n')
    assert not vmdk.probe(bytes(4096))
    assert not vmdk.probe(b"createType is a word in this text but nothing else\n")
