"""qcow2 reader and writers against qemu-img as the oracle."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.formats import qcow2, raw
from app.formats import qcow2_layout as L
from app.formats.base import DEFAULT_MAX_VIRTUAL_SIZE, Extent, FormatError, GiB, WriterOptions
from app.formats.io import BytesSink, BytesSource, FileSink, FileSource
from tests.formats import oracle

KiB = 1024
MiB = 1024 * KiB

SMALL_SIZE = 3 * MiB + 12_345  # deliberately not a multiple of any block size


# --------------------------------------------------------------------------- helpers


class StreamSink:
    """A sequential-only sink (no write_at): forces the streaming qcow2 writer."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()

    async def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)

    async def close(self) -> None:
        self._f.close()


def compressible(rng: random.Random, n: int) -> bytes:
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(40)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def build_source(path: Path, size: int, seed: int) -> bytes:
    """Random and compressible data at unaligned offsets, holes, explicit zeros."""
    rng = random.Random(seed)
    buf = bytearray(size)
    for _ in range(12):
        off = rng.randrange(0, size)
        n = min(rng.randint(1, 300_000), size - off)
        kind = rng.random()
        if kind < 0.45:
            buf[off : off + n] = rng.randbytes(n)
        elif kind < 0.9:
            buf[off : off + n] = compressible(rng, n)
        else:
            buf[off : off + n] = bytes(n)
    buf[:700] = compressible(rng, 700)
    buf[-3:] = b"end"
    data = bytes(buf)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:  # keep all-zero 64 KiB blocks as holes
            n = min(64 * KiB, size - pos)
            if data[pos : pos + n].strip(b"\0"):
                f.seek(pos)
                f.write(data[pos : pos + n])
            pos += n
    return data


def pad512(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def qemu_convert(src: Path, dst: Path, *args: str, src_fmt: str = "raw") -> None:
    oracle.qemu_img("convert", "-f", src_fmt, "-O", "qcow2", *args, src, dst)


def qemu_to_raw(img: Path, dst: Path) -> bytes:
    oracle.qemu_img("convert", "-f", "qcow2", "-O", "raw", img, dst)
    return dst.read_bytes()


def qemu_data_ranges(img: Path) -> list[tuple[int, int]]:
    entries = json.loads(oracle.qemu_img("map", "--output=json", img).stdout)
    out: list[tuple[int, int]] = []
    for e in entries:
        if not e["data"]:
            continue
        if out and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["start"], e["length"]))
    return out


def qemu_check(img: Path) -> str:
    proc = oracle.qemu_img("check", "--output=json", img, check=False)
    info = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert info.get("corruptions", 0) == 0
    assert info.get("leaks", 0) == 0
    assert info.get("check-errors", 0) == 0
    return proc.stdout


async def read_image(path: Path, chunk: int = MiB) -> tuple[bytes, list[tuple[int, int]]]:
    reader = await qcow2.open_reader(FileSource(path))
    try:
        data = await oracle.read_all(reader, chunk)
        amap = await reader.allocation_map()
        assert amap is not None
        return data, amap
    finally:
        await reader.close()


def covered(amap: list[tuple[int, int]], data: bytes) -> None:
    """Every non-zero byte lies inside the allocation map."""
    pos = 0
    for off, n in amap:
        assert not data[pos:off].strip(b"\0"), f"non-zero data outside the map in [{pos}, {off})"
        pos = off + n
    assert not data[pos:].strip(b"\0")


async def write_image(
    data_source: raw.RawReader | qcow2.Qcow2Reader,
    dst: Path,
    options: WriterOptions,
    *,
    stream: bool = False,
    amap: list[tuple[int, int]] | None = None,
    chunk: int = MiB,
) -> None:
    sink: FileSink | StreamSink = StreamSink(dst) if stream else FileSink(dst)
    writer = qcow2.create_writer(sink, data_source.virtual_size, options)
    if stream:
        assert isinstance(writer, qcow2.Qcow2StreamWriter)
        assert writer.streamable
        assert writer.needs_allocation_map
        await writer.set_allocation_map(amap if amap is not None else [(0, writer.virtual_size)])
    async for ext in data_source.extents(chunk):
        await writer.write(ext)
    await writer.finish()
    await sink.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qcow2")


@pytest.fixture(scope="module")
def small_source(workdir: Path) -> tuple[Path, bytes]:
    path = workdir / "small.raw"
    return path, build_source(path, SMALL_SIZE, seed=42)


# --------------------------------------------------------------------------- reader


QEMU_VARIANTS = {
    "64k-v3": ["-o", "cluster_size=64k"],
    "64k-v2": ["-o", "compat=0.10"],
    "512": ["-o", "cluster_size=512"],
    "4k-v2": ["-o", "cluster_size=4k,compat=0.10"],
    "2M": ["-o", "cluster_size=2M"],
    "zlib": ["-c"],
    "zlib-v2": ["-c", "-o", "compat=0.10"],
    "zlib-512": ["-c", "-o", "cluster_size=512"],
    "zlib-2M": ["-c", "-o", "cluster_size=2M"],
    "zstd": ["-c", "-o", "compression_type=zstd"],
    "zstd-4k": ["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    "extl2": ["-o", "extended_l2=on"],
    "extl2-2M-zstd": ["-c", "-o", "extended_l2=on,cluster_size=2M,compression_type=zstd"],
    "refcount1": ["-o", "refcount_bits=1"],
    "refcount64-lazy": ["-o", "refcount_bits=64,lazy_refcounts=on"],
    "prealloc": ["-o", "preallocation=metadata"],
}


@pytest.mark.parametrize("variant", sorted(QEMU_VARIANTS))
async def test_reads_qemu_images(
    variant: str, workdir: Path, small_source: tuple[Path, bytes]
) -> None:
    src, data = small_source
    img = workdir / f"q-{variant}.qcow2"
    qemu_convert(src, img, *QEMU_VARIANTS[variant])
    got, amap = await read_image(img)
    assert got == pad512(data)
    covered(amap, got)
    if variant != "prealloc":
        assert amap == qemu_data_ranges(img)
    # Small chunks exercise splitting of large clusters and compressed groups.
    got_small, _ = await read_image(img, chunk=4 * KiB)
    assert got_small == got


@pytest.mark.parametrize("size", [0, 1, 512, 1000, 65_536 + 512])
async def test_reads_tiny_qemu_images(workdir: Path, size: int) -> None:
    src = workdir / f"tiny-{size}.raw"
    src.write_bytes(random.Random(size).randbytes(size))
    for args in ([], ["-c"], ["-o", "cluster_size=512,compat=0.10"]):
        img = workdir / f"tiny-{size}.qcow2"
        qemu_convert(src, img, *args)
        got, _ = await read_image(img)
        assert got == pad512(src.read_bytes())


async def test_zero_flags_and_subclusters(workdir: Path) -> None:
    zf = workdir / "zero-flags.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", zf, "1M")
    ops = ["write -P 1 0 256k", "write -z 64k 64k", "write -z -u 128k 64k", "write -z 512k 64k"]
    ext = workdir / "subclusters.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", ext, "1M")
    ext_ops = [
        "write -P 0x5a 4k 4k",
        "write -P 0x33 100k 2k",
        "write -P 0x11 256k 128k",
        "write -z 260k 4k",
        "write -P 0x22 1046528 2k",
    ]
    # The last host cluster is only written up to its allocated subcluster.
    tail = workdir / "subcluster-tail.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on", tail, "1M")
    for img, cmds in ((zf, ops), (ext, ext_ops), (tail, ["write -P 7 0 2k"])):
        args: list[str] = []
        for cmd in cmds:
            args += ["-c", cmd]
        proc = subprocess.run(
            ["qemu-io", "-f", "qcow2", *args, str(img)], capture_output=True, check=False
        )
        assert proc.returncode == 0, proc.stderr
        expected = qemu_to_raw(img, workdir / "expected.raw")
        got, amap = await read_image(img)
        assert got == expected
        assert amap == qemu_data_ranges(img)
    reader = await qcow2.open_reader(FileSource(ext))
    assert reader.info.details["extended_l2"] is True


async def test_internal_snapshots_read_the_active_state(
    workdir: Path, small_source: tuple[Path, bytes]
) -> None:
    img = workdir / "snap.qcow2"
    qemu_convert(small_source[0], img)
    oracle.qemu_img("snapshot", "-c", "before", img)
    proc = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 64k 192k", "-c", "write -z 1M 64k",
         str(img)],
        capture_output=True,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got, amap = await read_image(img)
    assert got == qemu_to_raw(img, workdir / "snap.raw")
    assert amap == qemu_data_ranges(img)
    reader = await qcow2.open_reader(FileSource(img))
    assert reader.info.details["snapshots"] == 1


BIG_SIZE = 5 * GiB + 1536


@pytest.fixture(scope="module")
def big_source(workdir: Path) -> Path:
    path = workdir / "big.raw"
    two = 2 * MiB
    layout = [(0, two), (4 * GiB - two, 2 * two), (BIG_SIZE - 1536 - two, two + 1536)]
    oracle.make_sparse_raw(path, BIG_SIZE, layout, seed=5)
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "cluster_size=64k"],
        ["-c", "-o", "compression_type=zstd"],
        ["-o", "compat=0.10,cluster_size=2M"],
        ["-o", "cluster_size=512"],
    ],
    ids=["64k", "zstd", "v2-2M", "512"],
)
async def test_reads_big_sparse_image(workdir: Path, big_source: Path, args: list[str]) -> None:
    img = workdir / "big.qcow2"
    qemu_convert(big_source, img, *args)
    reader = await qcow2.open_reader(FileSource(img))
    assert reader.virtual_size == BIG_SIZE
    out = workdir / "big-back.raw"
    await oracle.read_to_file(reader, out)
    await reader.close()
    oracle.assert_identical(big_source, out)


# --------------------------------------------------------------------------- writer


WRITER_MATRIX = [
    (sub, compress, cs)
    for sub in ("v3", "v2")
    for compress in (False, True)
    for cs in (512, 4096, 65536, 2 * MiB)
]


@pytest.mark.parametrize(("sub", "compress", "cluster"), WRITER_MATRIX)
async def test_writer_qemu_check_and_compare(
    workdir: Path,
    small_source: tuple[Path, bytes],
    sub: str,
    compress: bool,
    cluster: int,
) -> None:
    src, data = small_source
    img = workdir / f"w-{sub}-{compress}-{cluster}.qcow2"
    options = WriterOptions(subformat=sub, compress=compress, cluster_size=cluster)
    await write_image(await raw.open_reader(FileSource(src)), img, options)
    report = qemu_check(img)
    oracle.qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img)
    info = oracle.qemu_info(img)
    assert info["cluster-size"] == cluster
    assert info["format-specific"]["data"]["compat"] == ("1.1" if sub == "v3" else "0.10")
    assert info["virtual-size"] == len(pad512(data))
    fragmented = json.loads(report)
    if compress:
        assert fragmented["compressed-clusters"] > 0
    else:
        assert fragmented.get("compressed-clusters", 0) == 0
    got, _ = await read_image(img)
    assert got == pad512(data)


@pytest.mark.parametrize("level", [1, 3, 9])
async def test_writer_compression_levels(workdir: Path, level: int) -> None:
    rng = random.Random(level)
    data = compressible(rng, 2 * MiB) + rng.randbytes(300_000) + bytes(MiB)
    img = workdir / f"level-{level}.qcow2"
    options = WriterOptions(compress=True, compression_level=level)
    await write_image(await raw.open_reader(BytesSource(data)), img, options)
    qemu_check(img)
    assert img.stat().st_size < len(data) // 2
    assert qemu_to_raw(img, workdir / f"level-{level}.raw") == pad512(data)


@pytest.mark.parametrize("size", [0, 1, 511, 512, 4096 + 7])
@pytest.mark.parametrize("compress", [False, True])
async def test_writer_tiny_sizes(workdir: Path, size: int, compress: bool) -> None:
    data = random.Random(size).randbytes(size)
    src = workdir / f"wt-{size}.raw"
    src.write_bytes(data)
    img = workdir / f"wt-{size}-{compress}.qcow2"
    await write_image(await raw.open_reader(FileSource(src)), img, WriterOptions(compress=compress))
    qemu_check(img)
    oracle.qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img)
    got, _ = await read_image(img)
    assert got == pad512(data)


@pytest.mark.parametrize("compress", [False, True])
async def test_writer_big_sparse(workdir: Path, big_source: Path, compress: bool) -> None:
    img = workdir / "wbig.qcow2"
    options = WriterOptions(compress=compress, cluster_size=65536)
    await write_image(await raw.open_reader(FileSource(big_source)), img, options)
    qemu_check(img)
    oracle.qemu_img("compare", "-f", "raw", "-F", "qcow2", big_source, img)
    assert img.stat().st_size < 32 * MiB


async def test_writer_refcount_blocks_streamed_with_tiny_clusters(workdir: Path) -> None:
    # 512-byte clusters: one refcount block covers 128 KiB, so many are written early.
    rng = random.Random(9)
    data = rng.randbytes(3 * MiB) + compressible(rng, MiB)
    for compress in (False, True):
        img = workdir / f"rc-{compress}.qcow2"
        options = WriterOptions(cluster_size=512, compress=compress)
        await write_image(await raw.open_reader(BytesSource(data)), img, options, chunk=100_000)
        qemu_check(img)
        got, _ = await read_image(img)
        assert got == data


async def test_writer_rejects_bad_input() -> None:
    sink = BytesSink()
    with pytest.raises(FormatError, match="power of two"):
        qcow2.create_writer(sink, MiB, WriterOptions(cluster_size=3000))
    with pytest.raises(FormatError, match="subformat"):
        qcow2.create_writer(sink, MiB, WriterOptions(subformat="v4"))
    with pytest.raises(FormatError, match="L1 table over 32 MiB"):
        qcow2.create_writer(sink, 1 << 50, WriterOptions(cluster_size=512))
    writer = qcow2.create_writer(sink, MiB, WriterOptions())
    await writer.write(Extent(1000, 10, bytes(range(10))))
    with pytest.raises(FormatError, match="out of order"):
        await writer.write(Extent(0, 10, bytes(10)))
    with pytest.raises(FormatError, match="past the virtual size"):
        await writer.write(Extent(MiB - 5, 10, bytes(10)))


async def test_writer_abort_drops_work_in_flight() -> None:
    rng = random.Random(4)
    sink = BytesSink()
    writer = qcow2.create_writer(sink, 8 * MiB, WriterOptions(compress=True))
    assert isinstance(writer, qcow2.Qcow2Writer)
    for i in range(4):
        await writer.write(Extent(i * MiB, MiB, compressible(rng, MiB)))
    await writer.abort()
    assert not writer._jobs


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(
    ("sub", "cluster"), [("v3", 65536), ("v2", 65536), ("v3", 512), ("v3", 2 * MiB)]
)
async def test_streaming_writer(
    workdir: Path, small_source: tuple[Path, bytes], sub: str, cluster: int
) -> None:
    src, data = small_source
    img = workdir / f"s-{sub}-{cluster}.qcow2"
    reader = await raw.open_reader(FileSource(src))
    amap = await reader.allocation_map()
    assert amap is not None
    options = WriterOptions(subformat=sub, cluster_size=cluster)
    await write_image(reader, img, options, stream=True, amap=amap)
    qemu_check(img)
    oracle.qemu_img("compare", "-f", "raw", "-F", "qcow2", src, img)
    got, got_map = await read_image(img)
    assert got == pad512(data)
    covered(got_map, got)


async def test_streaming_from_qcow2_allocation_map(workdir: Path, big_source: Path) -> None:
    qimg = workdir / "stream-src.qcow2"
    qemu_convert(big_source, qimg, "-c")
    reader = await qcow2.open_reader(FileSource(qimg))
    amap = await reader.allocation_map()
    out = workdir / "stream-dst.qcow2"
    await write_image(reader, out, WriterOptions(), stream=True, amap=amap)
    qemu_check(out)
    oracle.qemu_img("compare", "-f", "raw", "-F", "qcow2", big_source, out)


async def test_streaming_superset_map_and_edge_cases(workdir: Path) -> None:
    data = bytes(100_000) + b"x" * 5000 + bytes(200_000)
    img = workdir / "superset.qcow2"
    # A superset map: mapped clusters that turn out zero are written as zeros.
    await write_image(await raw.open_reader(BytesSource(data)), img, WriterOptions(), stream=True)
    qemu_check(img)
    assert qemu_to_raw(img, workdir / "superset.raw") == pad512(data)
    # Zero-size disk.
    empty = workdir / "empty-stream.qcow2"
    await write_image(await raw.open_reader(BytesSource(b"")), empty, WriterOptions(), stream=True)
    qemu_check(empty)
    # Data outside the map.
    writer = qcow2.create_writer(StreamSink(workdir / "bad.qcow2"), len(data), WriterOptions())
    await writer.set_allocation_map([(0, 65536)])
    await writer.write(Extent(100_000, 5000, b"x" * 5000))
    with pytest.raises(FormatError, match="outside the allocation map"):
        await writer.finish()  # the partial cluster is only checked once complete
    # No map, compression.
    writer = qcow2.create_writer(StreamSink(workdir / "bad.qcow2"), len(data), WriterOptions())
    with pytest.raises(FormatError, match="set_allocation_map"):
        await writer.write(Extent(0, 10, b"0123456789"))
    with pytest.raises(FormatError, match="cannot be streamed"):
        qcow2.create_writer(StreamSink(workdir / "bad.qcow2"), 10, WriterOptions(compress=True))


# --------------------------------------------------------------------------- property


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.integers(min_value=0, max_value=2 * MiB),
    spans=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 200_000), st.booleans()), max_size=6),
    cluster=st.sampled_from([512, 4096, 65536]),
    sub=st.sampled_from(["v2", "v3"]),
    mode=st.sampled_from(["plain", "compress", "stream"]),
    chunk=st.sampled_from([4096, 65536, MiB]),
)
async def test_roundtrip_property(
    tmp_path: Path,
    size: int,
    spans: list[tuple[float, int, bool]],
    cluster: int,
    sub: str,
    mode: str,
    chunk: int,
) -> None:
    rng = random.Random(size ^ cluster)
    buf = bytearray(size)
    for frac, length, text in spans:
        off = int(frac * size)
        n = min(length, size - off)
        buf[off : off + n] = compressible(rng, n) if text else rng.randbytes(n)
    data = bytes(buf)
    img = tmp_path / f"prop-{size}-{cluster}-{sub}-{mode}.qcow2"
    options = WriterOptions(subformat=sub, cluster_size=cluster, compress=mode == "compress")
    reader = await raw.open_reader(BytesSource(data))
    amap = _nonzero_ranges(data)
    await write_image(reader, img, options, stream=mode == "stream", amap=amap, chunk=chunk)
    qemu_check(img)
    got, got_map = await read_image(img, chunk)
    assert got == pad512(data)
    covered(got_map, got)


def _nonzero_ranges(data: bytes) -> list[tuple[int, int]]:
    return [(a, b - a) for a, b, zero in raw.split_zero_blocks(data, 0, 4096) if not zero]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def plain_image(workdir: Path, small_source: tuple[Path, bytes]) -> bytes:
    img = workdir / "plain.qcow2"
    qemu_convert(small_source[0], img)
    return img.read_bytes()


async def open_bytes(data: bytes, max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
                     ) -> qcow2.Qcow2Reader:
    return await qcow2.open_reader(BytesSource(data), max_virtual_size=max_virtual_size)


async def read_bytes(data: bytes) -> bytes:
    reader = await open_bytes(data)
    return await oracle.read_all(reader)


def patched(image: bytes, offset: int, fmt: str, *values: int) -> bytes:
    buf = bytearray(image)
    struct.pack_into(fmt, buf, offset, *values)
    return bytes(buf)


def l1_offset(image: bytes) -> int:
    offset: int = struct.unpack_from(">Q", image, 40)[0]
    return offset


async def test_probe(plain_image: bytes) -> None:
    assert qcow2.probe(plain_image[:4096], b"")
    assert qcow2.probe(b"QFI\xfb\0\0\0\x01", b"")  # claimed, then refused by open_reader
    with pytest.raises(FormatError, match="unsupported qcow2 version 1"):
        await open_bytes(patched(plain_image, 4, ">I", 1))
    assert not qcow2.probe(b"QFI\xfa\0\0\0\x03", b"")
    assert not qcow2.probe(b"", b"")


async def test_refuses_backing_file(workdir: Path) -> None:
    base = workdir / "base.qcow2"
    over = workdir / "overlay.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", base, "1M")
    oracle.qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", over)
    with pytest.raises(FormatError, match=r"backing file 'base.qcow2': flatten the chain"):
        await qcow2.open_reader(FileSource(over))


async def test_refuses_encryption_and_external_data(workdir: Path, plain_image: bytes) -> None:
    # crypt_method 1 = AES, 2 = LUKS (creating a real LUKS image costs seconds of PBKDF).
    for method, name in ((1, "AES"), (2, "LUKS")):
        with pytest.raises(FormatError, match=f"encrypted images \\({name}\\)"):
            await open_bytes(patched(plain_image, 32, ">I", method))
    ext = workdir / "ext.qcow2"
    oracle.qemu_img("create", "-f", "qcow2", "-o", f"data_file={workdir / 'ext.raw'}", ext, "1M")
    with pytest.raises(FormatError, match="external data file"):
        await qcow2.open_reader(FileSource(ext))


async def test_refuses_feature_bits(plain_image: bytes) -> None:
    with pytest.raises(FormatError, match="dirty"):
        await open_bytes(patched(plain_image, 72, ">Q", L.INCOMPAT_DIRTY))
    with pytest.raises(FormatError, match="corrupt"):
        await open_bytes(patched(plain_image, 72, ">Q", L.INCOMPAT_CORRUPT))
    with pytest.raises(FormatError, match="bit 10"):
        await open_bytes(patched(plain_image, 72, ">Q", 1 << 10))
    with pytest.raises(FormatError, match="disagree"):
        await open_bytes(patched(plain_image, 72, ">Q", L.INCOMPAT_COMPRESSION))
    with pytest.raises(FormatError, match="compression type 7"):
        await open_bytes(patched(plain_image, 104, ">B", 7))


async def test_refuses_bad_magic_truncation_and_sequential(plain_image: bytes) -> None:
    with pytest.raises(FormatError, match="bad magic"):
        await open_bytes(b"QFI\xfa" + plain_image[4:])
    with pytest.raises(FormatError, match="version"):
        await open_bytes(patched(plain_image, 4, ">I", 4))
    for cut in (0, 40, 71, 100):
        with pytest.raises(FormatError, match="truncated"):
            await open_bytes(plain_image[:cut])
    # Cut inside the metadata or the data: open or read fails cleanly.
    for cut in (70_000, 200_000, 300_000, 400_000):
        with pytest.raises(FormatError):
            await read_bytes(plain_image[:cut])
    with pytest.raises(FormatError, match="random access"):
        await qcow2.open_reader(_Seq())


class _Seq:
    async def read(self, n: int) -> bytes:
        return b""

    async def close(self) -> None:
        return None


async def test_refuses_absurd_geometry(plain_image: bytes) -> None:
    with pytest.raises(FormatError, match="exceeds the limit"):
        await open_bytes(plain_image, max_virtual_size=MiB)
    with pytest.raises(FormatError, match="too small"):
        await open_bytes(patched(plain_image, 36, ">I", 0))
    with pytest.raises(FormatError, match="absurd"):
        await open_bytes(patched(plain_image, 36, ">I", 0x7FFF_FFFF))
    with pytest.raises(FormatError, match="cluster_bits"):
        await open_bytes(patched(plain_image, 20, ">I", 30))
    for length in (13, 96, 1 << 30):
        with pytest.raises(FormatError, match="header_length"):
            await open_bytes(patched(plain_image, 100, ">I", length))
    with pytest.raises(FormatError, match="L1 table offset"):
        await open_bytes(patched(plain_image, 40, ">Q", 12345))
    with pytest.raises(FormatError, match="refcount table"):
        await open_bytes(patched(plain_image, 48, ">Q", 0))
    # A header extension claiming more bytes than the header cluster holds.
    with pytest.raises(FormatError, match="header extension"):
        await open_bytes(patched(plain_image, 112, ">II", 0x1234, 1 << 20))


async def test_refuses_bad_tables(plain_image: bytes) -> None:
    l1 = l1_offset(plain_image)
    l2 = struct.unpack_from(">Q", plain_image, l1)[0] & L.OFFSET_MASK
    with pytest.raises(FormatError, match="past the end"):
        await open_bytes(patched(plain_image, l1, ">Q", (1 << 40) | L.OFLAG_COPIED))
    with pytest.raises(FormatError, match="metadata structures overlap"):
        await open_bytes(patched(plain_image, l1, ">Q", l1 | L.OFLAG_COPIED))

    with pytest.raises(FormatError, match="reserved"):
        await open_bytes(patched(plain_image, l1, ">Q", l2 | 0x10))
    # An L2 entry pointing at the L1 table, past EOF, misaligned, reserved bits.
    first = next(i for i in range(0, 65536, 8) if struct.unpack_from(">Q", plain_image, l2 + i)[0])
    for entry, msg in (
        (l1 | L.OFLAG_COPIED, "overlaps"),
        ((1 << 45) | L.OFLAG_COPIED, "past the end"),
        ((l2 + 65536 + 512) | L.OFLAG_COPIED, "not cluster-aligned"),
        (l2 | 0x2, "reserved"),
    ):
        with pytest.raises(FormatError, match=msg):
            await read_bytes(patched(plain_image, l2 + first, ">Q", entry))


async def test_refuses_shared_l2_table(workdir: Path, small_source: tuple[Path, bytes]) -> None:
    img = workdir / "two-l2.qcow2"
    qemu_convert(small_source[0], img, "-o", "cluster_size=4k")  # one L2 covers 2 MiB
    image = img.read_bytes()
    l1 = l1_offset(image)
    first = struct.unpack_from(">Q", image, l1)[0]
    assert struct.unpack_from(">Q", image, l1 + 8)[0]
    await read_bytes(image)
    with pytest.raises(FormatError, match="metadata structures overlap"):
        await open_bytes(patched(image, l1 + 8, ">Q", first))


async def test_refuses_compressed_bombs_and_garbage(workdir: Path) -> None:
    rng = random.Random(2)
    data = compressible(rng, 256 * KiB)
    for ctype in ("zlib", "zstd"):
        src = workdir / "bomb.raw"
        src.write_bytes(data)
        img = workdir / f"bomb-{ctype}.qcow2"
        qemu_convert(src, img, "-c", "-o", f"compression_type={ctype},cluster_size=64k")
        image = img.read_bytes()
        l2 = struct.unpack_from(">Q", image, l1_offset(image))[0] & L.OFFSET_MASK
        entry = struct.unpack_from(">Q", image, l2)[0]
        assert entry & L.OFLAG_COMPRESSED
        host, clen = L.decode_compressed(entry, 16)
        if ctype == "zlib":
            co = zlib.compressobj(9, zlib.DEFLATED, -15)
            bomb = co.compress(bytes(8 * MiB)) + co.flush()
            too_long = "beyond|expected"
        else:
            import zstandard

            bomb = zstandard.ZstdCompressor().compress(bytes(128 * KiB))
            too_long = "declares"
        assert len(bomb) <= clen
        with pytest.raises(FormatError, match=too_long):
            await read_bytes(image[:host] + bomb + image[host + len(bomb) :])
        garbage = image[:host] + rng.randbytes(clen) + image[host + clen :]
        with pytest.raises(FormatError):
            await read_bytes(garbage)


async def test_l2_runs_match_entry_by_entry_reading(plain_image: bytes) -> None:
    """The reader takes runs of L2 entries whole; a table mixing every kind of entry
    must still read as each entry says, and a bad entry inside a run is named."""
    l2 = struct.unpack_from(">Q", plain_image, l1_offset(plain_image))[0] & L.OFFSET_MASK
    vsize = struct.unpack_from(">Q", plain_image, 24)[0]  # rounded up to 512 bytes
    clusters = L.div_round_up(vsize, 64 * KiB)
    entries = struct.unpack_from(f">{clusters}Q", plain_image, l2)
    hosts = sorted(e & L.OFFSET_MASK for e in entries if e & L.OFFSET_MASK)
    a, b, c = hosts[:3]
    assert c == b + 64 * KiB == a + 128 * KiB  # qemu-img allocates clusters in order
    cop = L.OFLAG_COPIED
    table = [0] * clusters
    table[0:2] = [a | cop, b | cop]  # a run
    table[2] = c  # continues the run without the COPIED flag
    table[5] = L.OFLAG_ZERO  # zero flag between unallocated entries
    table[8:10] = [b | cop, b | cop]  # one cluster mapped twice
    table[10:12] = [b, a]  # going backwards
    table[-3:] = [a, b, c]  # a run ending in the disk's partial last cluster
    image = bytearray(plain_image)
    struct.pack_into(f">{clusters}Q", image, l2, *table)

    expected = bytearray()
    for index, entry in enumerate(table):
        length = min(64 * KiB, vsize - index * 64 * KiB)
        host = entry & L.OFFSET_MASK
        expected += plain_image[host : host + length] if host else bytes(length)
    # Mapping a cluster twice is refused by the allocation guard (test_qcow2_bombs.py);
    # the run parser itself is tested here, so the guard is off.
    unguarded = await qcow2.open_reader(BytesSource(bytes(image)), check_allocation=False)
    assert await oracle.read_all(unguarded) == expected
    with pytest.raises(FormatError, match="also holds another guest cluster"):
        await read_bytes(bytes(image))

    # The third entry of a run points past the end of the file.
    end = L.div_round_up(len(plain_image), 64 * KiB) * 64 * KiB
    run = [(end - 2 * 64 * KiB) | cop, (end - 64 * KiB) | cop, end | cop]
    struct.pack_into(">3Q", image, l2 + 16 * 8, *run)
    with pytest.raises(FormatError, match="past the end") as caught:
        await read_bytes(bytes(image))
    assert caught.value.offset == l2 + 18 * 8
