"""VHD: the reader against qemu-img's vpc output, the writers against qemu-img, the size
rules (current_size vs CHS), sector bitmaps and refusals.

qemu decides the disk size from the CHS geometry unless the creator application is one
it knows to use current_size (``win ``, ``qem2``, ...). Images here are made with
``force_size=on`` (creator ``qem2``) or with geometry that covers the size exactly, and
where they differ the oracle is told ``force_size_calc=current_size``.
"""

from __future__ import annotations

import itertools
import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.dataplane.convert import convert
from app.formats import registry, vhd
from app.formats.base import Extent, FormatError, WriterOptions
from app.formats.io import BytesSink, BytesSource, FileSink, FileSource, SequentialFileSource
from app.formats.vdisk_common import HostHoles
from app.formats.vhd_meta import (
    DYN_CHECKSUM_AT,
    FOOTER_CHECKSUM_AT,
    UNUSED_BAT,
    Footer,
    bitmap_bytes,
    chs_geometry,
    vhd_checksum,
)
from app.formats.vhd_writer import VhdWriterOptions
from tests.formats import oracle
from tests.formats.test_vmdk import (
    StreamOnlySink,
    assert_same_content,
    extents_of,
    file_extents,
    make_raw,
    padded,
    read_and_close,
    write_all,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def qemu_vpc(src: Path, dst: Path, opts: str) -> None:
    oracle.qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", opts, src, dst)


def qemu_vpc_size(img: Path, *, current_size: bool = False) -> int:
    if current_size:
        spec = f"driver=vpc,force_size_calc=current_size,file.filename={img}"
        out = oracle.qemu_img("info", "--output=json", "--image-opts", spec).stdout
    else:
        out = oracle.qemu_img("info", "--output=json", "-f", "vpc", img).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


def refresh_footer_checksum(buf: bytearray, at: int) -> None:
    checksum = vhd_checksum(buf[at : at + 512], FOOTER_CHECKSUM_AT)
    struct.pack_into(">I", buf, at + FOOTER_CHECKSUM_AT, checksum)


CASES = {
    "one-sector": (512, [(0, 512)]),
    "odd-size": (5 * MiB + 3 * 512, [(0, 100), (2 * MiB - 10, 20), (3 * MiB + 7, 300_000),
                                     (5 * MiB + 3 * 512 - 700, 700)]),
    "no-data": (3 * MiB, []),
    "dense": (2 * MiB + 512, [(0, 2 * MiB + 512)]),
}  # fmt: skip


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_reader_matches_qemu(tmp_path: Path, subformat: str, case: str) -> None:
    size, layout = CASES[case]
    src = tmp_path / "src.raw"
    data = make_raw(src, size, layout)
    img = tmp_path / "disk.vhd"
    qemu_vpc(src, img, f"subformat={subformat},force_size=on")
    reader = await registry.open_reader(FileSource(img))
    assert reader.info.format == "vhd"
    assert reader.info.subformat == subformat
    assert reader.virtual_size == size == qemu_vpc_size(img)
    assert await read_and_close(reader, 64 * KiB) == data


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
async def test_reader_big_sparse_disk(tmp_path: Path, subformat: str) -> None:
    size = 5 * GiB + 512
    layout = [(0, MiB), (4 * GiB - 100, 200), (4 * GiB + 12345, 70_000), (size - 1000, 1000)]
    src = tmp_path / "src.raw"
    make_raw(src, size, layout, seed=4)
    img = tmp_path / "disk.vhd"
    qemu_vpc(src, img, f"subformat={subformat},force_size=on")
    reader = await vhd.open_reader(FileSource(img))
    if subformat == "dynamic":
        assert await reader.allocation_map() == [
            (0, 2 * MiB), (4 * GiB - 2 * MiB, 4 * MiB), (5 * GiB - 2 * MiB, 2 * MiB + 512)
        ]  # fmt: skip
    out = tmp_path / "out.raw"
    await oracle.read_to_file(reader, out)
    await reader.close()
    assert_same_content(src, out)


async def test_zero_size_images(tmp_path: Path) -> None:
    src = tmp_path / "empty.raw"
    src.write_bytes(b"")
    for sub in ("fixed", "dynamic"):
        img = tmp_path / f"{sub}.vhd"
        # qemu-img writes a zero-size fixed VHD (just a footer) but cannot reopen it.
        opts = f"subformat={sub},force_size=on"
        oracle.qemu_img(
            "convert", "-f", "raw", "-O", "vpc", "-o", opts, src, img, check=sub == "dynamic"
        )
        reader = await vhd.open_reader(FileSource(img))
        assert reader.virtual_size == 0
        assert await read_and_close(reader) == b""


async def test_chs_sizes_agree_with_qemu(tmp_path: Path) -> None:
    """Without force_size qemu rounds the size to the CHS geometry and stores that as
    current_size (creator 'qemu'); the reader's current_size matches qemu's CHS size."""
    src = tmp_path / "src.raw"
    data = make_raw(src, 10_000_000, [(0, 5000), (9_000_000, 1_000_000)])
    img = tmp_path / "chs.vhd"
    qemu_vpc(src, img, "subformat=dynamic")
    reader = await vhd.open_reader(FileSource(img))
    assert reader.info.details["creator_app"] == "qemu"
    assert reader.virtual_size == qemu_vpc_size(img) == reader.info.details["chs_size"]
    got = await read_and_close(reader)
    assert got[: len(data)] == data
    assert got[len(data) :].count(0) == len(got) - len(data)


async def test_current_size_wins_over_chs(tmp_path: Path) -> None:
    """An image whose creator makes qemu use CHS: we read current_size; qemu agrees once
    told force_size_calc=current_size."""
    size = 19_531 * 512
    data = random.Random(1).randbytes(size)
    img = tmp_path / "vpc.vhd"
    opts = VhdWriterOptions(subformat="dynamic", creator_app=b"vpc ")
    await write_all(vhd.create_writer(FileSink(img), size, opts), extents_of(data))
    cyl, heads, spt = chs_geometry(size // 512)
    assert cyl * heads * spt * 512 < size  # the geometry is smaller
    assert qemu_vpc_size(img) < size
    assert qemu_vpc_size(img, current_size=True) == size
    reader = await vhd.open_reader(FileSource(img))
    assert reader.virtual_size == size
    assert await read_and_close(reader) == data
    out = tmp_path / "out.raw"
    spec = f"driver=vpc,force_size_calc=current_size,file.filename={img}"
    oracle.qemu_img("convert", "--image-opts", spec, "-O", "raw", out)
    assert out.read_bytes() == data


async def test_sector_bitmap_is_honoured(tmp_path: Path) -> None:
    """Sectors whose bitmap bit is 0 read as zeros even though the block holds bytes
    there (qemu ignores the bitmap; the specification does not)."""
    size = 4 * MiB
    data = random.Random(2).randbytes(size)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    img = tmp_path / "d.vhd"
    qemu_vpc(src, img, "subformat=dynamic,force_size=on")
    buf = bytearray(img.read_bytes())
    bat_off = struct.unpack_from(">Q", buf, 512 + 16)[0]
    block0, block1 = struct.unpack_from(">II", buf, bat_off)
    buf[block0 * 512] = 0x0F  # sectors 0-3 absent
    buf[block0 * 512 + 100] = 0b10110000  # sectors 800..807: only 800, 802, 803 present
    buf[block1 * 512 : block1 * 512 + 512] = bytes(512)  # whole second block absent
    img.write_bytes(bytes(buf))
    expected = bytearray(data)
    expected[0:2048] = bytes(2048)
    for s in (801, 804, 805, 806, 807):
        expected[s * 512 : s * 512 + 512] = bytes(512)
    expected[2 * MiB :] = bytes(2 * MiB)
    reader = await vhd.open_reader(FileSource(img))
    assert await read_and_close(reader, 4096) == bytes(expected)


def write_holey(path: Path, buf: bytes | bytearray, granule: int = 64 * KiB) -> None:
    """Write ``buf`` to ``path`` leaving every all-zero ``granule`` as a hole in the file."""
    with open(path, "wb") as f:
        f.truncate(len(buf))
        for off in range(0, len(buf), granule):
            piece = buf[off : off + granule]
            if any(piece):
                f.seek(off)
                f.write(piece)


async def test_dynamic_reader_does_not_read_holes_in_the_file(tmp_path: Path) -> None:
    """qemu-img allocates whole blocks but writes only the data it was given, so the
    rest of a block is a hole in the file: the reader emits it as zeros unread (as
    qemu-img does). A block whose bitmap lies in a hole reads as absent, and a partly
    present block with holes still honours its bitmap."""
    size = 8 * MiB
    layout = [(0, 256 * KiB), (2 * MiB + 1 * MiB, 100_000), (4 * MiB, 300 * KiB),
              (6 * MiB + 256 * KiB, 4096), (7 * MiB, 4096)]  # fmt: skip
    src = tmp_path / "src.raw"
    data = make_raw(src, size, layout, seed=7)
    img = tmp_path / "d.vhd"
    qemu_vpc(src, img, "subformat=dynamic,force_size=on")
    buf = bytearray(img.read_bytes())
    bat_off = struct.unpack_from(">Q", buf, 512 + 16)[0]
    blocks = struct.unpack_from(">4I", buf, bat_off)
    assert UNUSED_BAT not in blocks
    expected = bytearray(data)
    # Block 2: bitmap and all its data become a hole (the bitmap reads as zeros).
    b2 = blocks[2] * 512
    buf[b2 : b2 + 512 + 2 * MiB] = bytes(512 + 2 * MiB)
    expected[4 * MiB : 6 * MiB] = bytes(2 * MiB)
    # Block 3: sectors 1024.. absent (its data at 256 KiB stays, the data at 1 MiB goes).
    b3 = blocks[3] * 512
    buf[b3 + 128 : b3 + 512] = bytes(384)
    expected[6 * MiB + 512 * KiB : 8 * MiB] = bytes(1536 * KiB)
    holey = tmp_path / "holey.vhd"
    write_holey(holey, buf)
    file_ranges = FileSource(holey).data_ranges_sync()
    assert file_ranges is not None
    stored = sum(n for _, n in file_ranges)
    assert stored < len(buf) - 4 * MiB, "the file system kept no holes: test is moot"
    source = oracle.RecordingSource(holey)
    reader = await vhd.open_reader(source)
    assert await read_and_close(reader, 1 * MiB) == bytes(expected)
    # Nothing read outside the file's data (64 KiB-granular holes here).
    source.assert_read_only(file_ranges)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    block=st.sampled_from([64 * KiB, 512 * KiB, 2 * MiB]),
    chunk=st.sampled_from([4 * KiB, 64 * KiB, 1 * MiB]),
)
async def test_holes_change_nothing_but_the_reads(
    tmp_path: Path, seed: int, block: int, chunk: int
) -> None:
    """Differential: the same VHD bytes read from a file with holes (the reader skips
    them) and from memory (the reader cannot know them) give the same disk, whatever
    the data layout, block size, sector bitmaps and holes (64 KiB granules that happen
    to be zero, including ones over bitmaps)."""
    rng = random.Random(seed)
    size = rng.choice([3 * MiB + 512, 4 * MiB, 5 * MiB - 1536])
    data = bytearray(size)
    for _ in range(rng.randint(0, 6)):
        off = rng.randrange(size)
        n = min(rng.choice([512, 70_000, 300 * KiB, MiB]), size - off)
        data[off : off + n] = rng.randbytes(n)
    img = tmp_path / f"d{seed}.vhd"
    sink = FileSink(img)
    writer = vhd.create_writer(sink, size, WriterOptions(cluster_size=block))
    await write_all(writer, extents_of(bytes(data)))
    buf = bytearray(img.read_bytes())
    bat_off = struct.unpack_from(">Q", buf, 512 + 16)[0]
    nblocks = -(-size // block)
    for entry in struct.unpack_from(f">{nblocks}I", buf, bat_off):
        if entry == UNUSED_BAT or rng.random() < 0.5:
            continue
        at = entry * 512
        for _ in range(rng.randint(1, 4)):  # clear some bitmap bits, or all of them
            i = rng.randrange(bitmap_bytes(block))
            buf[at + i] = 0 if rng.random() < 0.5 else buf[at + i] & rng.randrange(256)
        if rng.random() < 0.3:  # and wipe a data range (becomes a hole where 64 KiB-wide)
            lo = at + rng.randrange(bitmap_bytes(block) + block)
            hi = min(lo + rng.choice([4 * KiB, 64 * KiB, 200 * KiB]), len(buf) - 512)
            buf[lo:hi] = bytes(max(hi - lo, 0))
    assert len(buf) == img.stat().st_size
    holey = tmp_path / f"h{seed}.vhd"
    write_holey(holey, buf)
    from_file = await read_and_close(await vhd.open_reader(FileSource(holey)), chunk)
    in_memory = await read_and_close(await vhd.open_reader(BytesSource(bytes(buf))), chunk)
    assert from_file == in_memory


@settings(max_examples=200, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 300)), max_size=8),
    offset=st.integers(0, 4200),
    length=st.integers(0, 1000),
    min_hole=st.integers(1, 200),
)
def test_host_holes_split(
    ranges: list[tuple[int, int]], offset: int, length: int, min_hole: int
) -> None:
    """HostHoles.split against a byte map: the runs are consecutive and cover the range,
    and a byte is in a hole run exactly when it is not stored and its gap is at least
    ``min_hole`` long or lies before all or after all stored bytes."""
    stored = [False] * 5400
    for off, n in ranges:
        for i in range(off, off + n):
            stored[i] = True
    hole = [not b for b in stored]
    i = 0
    while i < len(stored):  # inner gaps shorter than min_hole count as data
        if stored[i]:
            i += 1
            continue
        j = i
        while j < len(stored) and not stored[j]:
            j += 1
        if i > 0 and j < len(stored) and j - i < min_hole:
            hole[i:j] = [False] * (j - i)
        i = j
    runs = HostHoles(ranges, min_hole=min_hole).split(offset, length)
    pos = offset
    for off, n, is_data in runs:
        assert off == pos
        assert n > 0
        assert all(hole[k] != is_data for k in range(off, off + n)), (off, n, is_data)
        pos += n
    assert pos == offset + length
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs))
    assert HostHoles(None).split(offset, length) == ([(offset, length, True)] if length else [])


async def test_footer_copy_is_used_when_the_footer_is_damaged(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = make_raw(src, 3 * MiB, [(0, 3 * MiB)])
    img = tmp_path / "d.vhd"
    qemu_vpc(src, img, "subformat=dynamic,force_size=on")
    buf = bytearray(img.read_bytes())
    buf[-512 + 70] ^= 0xFF
    img.write_bytes(bytes(buf))
    reader = await vhd.open_reader(FileSource(img))
    assert reader.info.details["footer_copy_used"] is True
    assert await read_and_close(reader) == data
    # Without the trailing footer at all (a truncated copy) the blocks are still there.
    img.write_bytes(bytes(buf[:-512]))
    assert await read_and_close(await vhd.open_reader(FileSource(img))) == data


async def test_refusals(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_raw(src, 3 * MiB, [(0, 3 * MiB)])
    dyn_img = tmp_path / "d.vhd"
    qemu_vpc(src, dyn_img, "subformat=dynamic,force_size=on")
    fixed_img = tmp_path / "f.vhd"
    qemu_vpc(src, fixed_img, "subformat=fixed,force_size=on")
    dyn = dyn_img.read_bytes()
    fixed = fixed_img.read_bytes()
    bat_off = struct.unpack_from(">Q", dyn, 512 + 16)[0]

    def dyn_patch(offset: int, fmt: str, value: int, *, header: bool = False) -> bytes:
        buf = bytearray(dyn)
        struct.pack_into(fmt, buf, offset, value)
        if header:
            struct.pack_into(">I", buf, 512 + DYN_CHECKSUM_AT,
                             vhd_checksum(buf[512:1536], DYN_CHECKSUM_AT))  # fmt: skip
        return bytes(buf)

    def both_footers(offset: int, fmt: str, value: int, base: bytes) -> bytes:
        buf = bytearray(base)
        for at in ([0, len(buf) - 512] if base is dyn else [len(buf) - 512]):
            struct.pack_into(fmt, buf, at + offset, value)
            refresh_footer_checksum(buf, at)
        return bytes(buf)

    cases = {
        "differencing": (both_footers(60, ">I", 4, dyn), "differencing"),
        "unknown-type": (both_footers(60, ">I", 9, dyn), "disk type"),
        "bad-cookie": (b"x" + fixed[1:-512] + b"x" + fixed[-511:], "cookie|VHD"),
        "bad-checksum": (fixed[:-1] + b"\x01", "checksum"),
        "fixed-short": (both_footers(48, ">Q", 4 * MiB, fixed), "data bytes"),
        "huge": (both_footers(48, ">Q", 1 << 60, fixed), "exceeds"),
        "bat-past-eof": (dyn_patch(512 + 16, ">Q", 1 << 40, header=True), "past the end"),
        "block-outside": (dyn_patch(bat_off, ">I", 0x7FFFFFF0), "outside"),
        "block-size": (dyn_patch(512 + 32, ">I", 3 * MiB, header=True), "block size"),
        "small-bat": (dyn_patch(512 + 28, ">I", 1, header=True), "BAT has"),
        "header-checksum": (dyn_patch(512 + 32, ">I", 4 * MiB), "checksum"),
        "header-offset": (both_footers(16, ">Q", 1 << 50, dyn), "outside the file"),
        "tiny": (b"conectix", "too small"),
    }
    for name, (img, pattern) in cases.items():
        with pytest.raises(FormatError, match=pattern):
            await read_and_close(await vhd.open_reader(BytesSource(img)))
        assert name
    with pytest.raises(FormatError, match="random access"):
        await vhd.open_reader(SequentialFileSource(dyn_img))


# --- writers --------------------------------------------------------------------------

SIZES = [
    (512, [(0, 512)]),
    (1000, [(0, 1000)]),  # not a whole sector: rounded up to 1024
    (10_000_000 - 3, [(5, 3000), (MiB - 1, 2), (2 * MiB, 2 * MiB + 17), (9_999_000, 997)]),
    (6 * MiB, [(0, 6 * MiB)]),
    (5 * MiB + 512, []),
]


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize(("size", "layout"), SIZES)
async def test_writer_qemu_agrees(
    tmp_path: Path, subformat: str, size: int, layout: list[tuple[int, int]]
) -> None:
    src = tmp_path / "src.raw"
    data = make_raw(src, size, layout, seed=size)
    img = tmp_path / "out.vhd"
    writer = vhd.create_writer(FileSink(img), size, WriterOptions(subformat=subformat))
    await write_all(writer, file_extents(src))
    expected_size = -(-size // 512) * 512
    assert qemu_vpc_size(img) == expected_size
    if subformat == "fixed":
        assert img.stat().st_size == expected_size + 512
    padded_src = tmp_path / "padded.raw"
    padded_src.write_bytes(padded(data))
    oracle.qemu_img("compare", "-f", "vpc", "-F", "raw", img, padded_src)
    reader = await vhd.open_reader(FileSource(img))
    assert reader.virtual_size == expected_size
    assert await read_and_close(reader) == padded(data)


@pytest.mark.parametrize("block", [64 * KiB, 512 * KiB, 2 * MiB, 8 * MiB])
async def test_dynamic_block_sizes(tmp_path: Path, block: int) -> None:
    size = 9 * MiB + 1536
    src = tmp_path / "src.raw"
    data = make_raw(src, size, [(100, 70_000), (4 * MiB - 3, 6), (9 * MiB, 1536)], seed=block)
    img = tmp_path / "out.vhd"
    writer = vhd.create_writer(FileSink(img), size, WriterOptions(cluster_size=block))
    await write_all(writer, file_extents(src))
    oracle.qemu_img("compare", "-f", "vpc", "-F", "raw", img, src)
    reader = await vhd.open_reader(FileSource(img))
    assert reader.info.cluster_size == block
    assert await read_and_close(reader) == data


async def test_large_blocks_stream_piece_by_piece(tmp_path: Path) -> None:
    """A 64 MiB block is not gathered whole before its data goes out: the first extent
    comes after a few chunk-sized reads, so memory stays at the reads in flight."""
    block = 64 * MiB
    size = block + 3 * MiB
    data = random.Random(5).randbytes(size)
    img = tmp_path / "big-blocks.vhd"
    writer = vhd.create_writer(FileSink(img), size, WriterOptions(cluster_size=block))
    await write_all(writer, extents_of(data))
    source = oracle.RecordingSource(img)
    reader = await vhd.open_reader(source)
    assert reader.info.cluster_size == block
    opened = len(source.reads)  # footer, header, BAT
    got = bytearray()
    reads_at_first_extent = None
    async for ext in reader.extents(1 * MiB):
        if reads_at_first_extent is None:
            reads_at_first_extent = len(source.reads) - opened
        got += ext.data if ext.data is not None else bytes(ext.length)
    await reader.close()
    assert bytes(got) == data
    assert reads_at_first_extent is not None
    assert reads_at_first_extent <= 4, reads_at_first_extent  # of 67 reads in all
    assert len(source.reads) >= 64


async def test_fixed_azure_alignment_and_streaming(tmp_path: Path) -> None:
    size = 30 * MiB + 4096 + 512
    data = bytearray(size)
    data[MiB : MiB + 5000] = random.Random(3).randbytes(5000)
    opts = VhdWriterOptions(subformat="fixed", alignment=MiB)
    sink = StreamOnlySink()
    writer = vhd.create_writer(sink, size, opts)
    assert writer.streamable
    await write_all(writer, extents_of(bytes(data)))
    out = bytes(sink.buffer)
    assert len(out) == 31 * MiB + 512
    footer = Footer.parse(out[-512:], offset=len(out) - 512)
    assert footer.current_size == footer.original_size == 31 * MiB
    assert footer.creator_app == b"win "
    img = tmp_path / "azure.vhd"
    img.write_bytes(out)
    assert qemu_vpc_size(img) == 31 * MiB
    reader = await vhd.open_reader(FileSource(img))
    assert await read_and_close(reader) == bytes(data) + bytes(31 * MiB - size)


async def test_fixed_writer_overwrites_when_target_not_zeroed(tmp_path: Path) -> None:
    size = 3 * MiB
    img = tmp_path / "dev.vhd"
    img.write_bytes(b"\xaa" * (size + 512))
    data = bytearray(size)
    data[MiB : MiB + 10] = b"0123456789"
    sink = FileSink(img, create=False)
    opts = WriterOptions(subformat="fixed", target_zeroed=False)
    await write_all(vhd.create_writer(sink, size, opts), extents_of(bytes(data)))
    await sink.close()
    assert await read_and_close(await vhd.open_reader(FileSource(img))) == bytes(data)


async def test_dynamic_streaming_with_allocation_map(tmp_path: Path) -> None:
    size = 9 * MiB
    rng = random.Random(4)
    data = bytearray(size)
    data[100:200] = rng.randbytes(100)
    data[6 * MiB : 6 * MiB + MiB] = rng.randbytes(MiB)
    writer = vhd.create_writer(StreamOnlySink(), size, WriterOptions(subformat="dynamic"))
    assert writer.needs_allocation_map
    assert writer.streamable
    with pytest.raises(FormatError, match="set_allocation_map"):
        await writer.write(Extent(0, 512, b"x" * 512))
    sink = StreamOnlySink()
    writer = vhd.create_writer(sink, size, WriterOptions(subformat="dynamic"))
    # A superset: block 1 (2-4 MiB) is declared but gets no data.
    await writer.set_allocation_map([(0, 200), (3 * MiB, 10), (6 * MiB, MiB)])
    await write_all(writer, extents_of(bytes(data)))
    img = tmp_path / "s.vhd"
    img.write_bytes(bytes(sink.buffer))
    oracle.qemu_img("compare", "-f", "vpc", "-F", "raw", img, _raw(tmp_path, data))
    reader = await vhd.open_reader(FileSource(img))
    assert await reader.allocation_map() == [(0, 4 * MiB), (6 * MiB, 2 * MiB)]
    assert await read_and_close(reader) == bytes(data)
    # Data outside the declared map is refused.
    writer = vhd.create_writer(StreamOnlySink(), size, WriterOptions(subformat="dynamic"))
    await writer.set_allocation_map([(0, 512)])
    with pytest.raises(FormatError, match="outside"):
        await write_all(writer, [Extent(5 * MiB, 512, b"y" * 512)])


def _raw(tmp_path: Path, data: bytes | bytearray) -> Path:
    path = tmp_path / "expected.raw"
    path.write_bytes(bytes(data))
    return path


async def test_writer_refusals() -> None:
    with pytest.raises(FormatError, match="2040"):
        vhd.create_writer(BytesSink(), 3000 * GiB, WriterOptions(subformat="dynamic"))
    with pytest.raises(FormatError):
        vhd.create_writer(BytesSink(), MiB, WriterOptions(subformat="differencing"))
    with pytest.raises(FormatError):
        vhd.create_writer(BytesSink(), MiB, WriterOptions(cluster_size=3 * MiB))
    with pytest.raises(FormatError):
        vhd.create_writer(BytesSink(), MiB, VhdWriterOptions(alignment=1000))
    writer = vhd.create_writer(BytesSink(), MiB, WriterOptions(subformat="fixed"))
    await writer.write(Extent(4096, 10, b"x" * 10))
    with pytest.raises(FormatError):
        await writer.write(Extent(0, 10, b"x" * 10))
    # A large fixed disk is fine (only the CHS geometry saturates).
    big = vhd.create_writer(BytesSink(), 3000 * GiB, WriterOptions(subformat="fixed"))
    assert isinstance(big, vhd.VhdFixedWriter)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=1, max_value=5 * MiB),
    spans=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 300_000)), max_size=6),
    subformat=st.sampled_from(["fixed", "dynamic"]),
    block=st.sampled_from([64 * KiB, 2 * MiB]),
)
async def test_roundtrip_property(
    size: int, spans: list[tuple[float, int]], subformat: str, block: int
) -> None:
    rng = random.Random(size)
    buf = bytearray(size)
    for frac, length in spans:
        off = min(int(frac * size), size - 1)
        n = min(length, size - off)
        buf[off : off + n] = rng.randbytes(n)
    data = bytes(buf)
    sink = BytesSink()
    opts = WriterOptions(subformat=subformat, cluster_size=block)
    await write_all(vhd.create_writer(sink, size, opts), extents_of(data, 100_000))
    reader = await vhd.open_reader(BytesSource(bytes(sink.buffer)))
    assert reader.virtual_size == -(-size // 512) * 512
    assert await read_and_close(reader, 64 * KiB) == padded(data)


async def test_probe() -> None:
    sink = BytesSink()
    await write_all(vhd.create_writer(sink, MiB, WriterOptions(subformat="fixed")), [])
    image = bytes(sink.buffer)
    assert vhd.probe(image[:4096], image[-512:])
    assert registry.probe(image[:4096], image[-512:]) == "vhd"
    assert not vhd.probe(bytes(4096), bytes(512))


async def test_vhd_to_raw_allocates_only_the_data(tmp_path: Path) -> None:
    """qemu-img writes a block's data only as far as it goes, so a data run in the VHD
    file ends in zeros up to the next page (here 1.5 KiB after the last 512 data
    bytes), and the reader's last piece of the run crosses a 64 KiB boundary. Those
    zeros must not cost the raw output a block: it holds exactly the 1 MiB of data."""
    size = 16 * MiB
    src = tmp_path / "src.raw"
    make_raw(src, size, [(6 * MiB, MiB)], seed=11)
    img = tmp_path / "in.vhd"
    oracle.qemu_img(
        "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", src, img
    )
    out = tmp_path / "out.raw"
    reader = await vhd.open_reader(FileSource(img))
    writer = registry.create_writer("raw", FileSink(out), reader.virtual_size, WriterOptions())
    await convert(reader, writer)
    await reader.close()
    oracle.assert_identical(out, src)
    assert out.stat().st_blocks * 512 == MiB
