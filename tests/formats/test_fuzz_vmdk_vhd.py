"""Bounded mutation fuzzing of the VMDK, VHD and VHDX readers.

Small valid images are mutated (bit flips, interesting values in metadata, truncation,
sector copies and wipes, appended junk); checksums are sometimes recomputed so the
mutation reaches the code behind them. Every iteration opens and reads the whole image
under a timeout with a low ``max_virtual_size``: the only exception allowed out is
:class:`FormatError`; anything else, or a hang, fails with the seed to replay it.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.formats import vhd, vhdx, vmdk
from app.formats.base import Extent, FormatError, ImageReader, WriterOptions
from app.formats.io import BytesSink, BytesSource
from app.formats.vdisk_common import crc32c
from app.formats.vhd_meta import DYN_CHECKSUM_AT, FOOTER_CHECKSUM_AT, vhd_checksum
from tests.formats import oracle
from tests.formats.test_vmdk import ChunkySequentialSource, StreamOnlySink, write_all

KiB = 1024
MiB = 1024 * KiB
ITERATIONS = 250
MAX_VSIZE = 64 * MiB
TIMEOUT = 10.0

INTERESTING_32 = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
                  0xFFFFFFFF]  # fmt: skip
INTERESTING_64 = [*INTERESTING_32, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


@dataclass
class Target:
    name: str
    image: bytes
    #: Byte ranges worth mutating more often (headers, tables).
    hot: list[tuple[int, int]]
    #: Recompute checksums after mutating (sometimes), so damage gets past them.
    fix: Callable[[bytearray], None]
    open: Callable[[bytes], Awaitable[ImageReader]]


def _data(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    buf = bytearray(size)
    for off in range(0, size, 256 * KiB):
        if rng.random() < 0.5:
            n = rng.randint(1, 200 * KiB)
            buf[off : off + n] = rng.randbytes(min(n, size - off))
    return bytes(buf)


def _extents(data: bytes) -> list[Extent]:
    return [Extent(o, min(64 * KiB, len(data) - o), data[o : o + 64 * KiB])
            for o in range(0, len(data), 64 * KiB)]  # fmt: skip


def _no_fix(buf: bytearray) -> None:
    return None


def _fix_vhd(buf: bytearray) -> None:
    for at in (0, len(buf) - 512):
        if at >= 0 and buf[at : at + 8] == b"conectix":
            struct.pack_into(">I", buf, at + FOOTER_CHECKSUM_AT,
                             vhd_checksum(buf[at : at + 512], FOOTER_CHECKSUM_AT))  # fmt: skip
    if buf[512:520] == b"cxsparse":
        struct.pack_into(">I", buf, 512 + DYN_CHECKSUM_AT,
                         vhd_checksum(buf[512:1536], DYN_CHECKSUM_AT))  # fmt: skip


def _fix_vhdx(buf: bytearray) -> None:
    for at, length in ((64 * KiB, 4 * KiB), (128 * KiB, 4 * KiB), (192 * KiB, 64 * KiB),
                       (256 * KiB, 64 * KiB)):  # fmt: skip
        if len(buf) >= at + length:
            struct.pack_into("<I", buf, at + 4, 0)
            struct.pack_into("<I", buf, at + 4, crc32c(bytes(buf[at : at + length])))


async def _open_random(module: object, image: bytes) -> ImageReader:
    reader: ImageReader = await module.open_reader(  # type: ignore[attr-defined]
        BytesSource(image), max_virtual_size=MAX_VSIZE
    )
    return reader


async def _open_vmdk_seq(image: bytes) -> ImageReader:
    return await vmdk.open_reader(ChunkySequentialSource(image), max_virtual_size=MAX_VSIZE)


async def _targets(tmp: Path) -> list[Target]:
    data = _data(2 * MiB + 3 * 512, 1)
    src = tmp / "src.raw"
    src.write_bytes(data)

    ours = StreamOnlySink()
    await write_all(vmdk.create_writer(ours, len(data), WriterOptions(cluster_size=8 * KiB)),
                    _extents(data))  # fmt: skip
    ours_img = bytes(ours.buffer)

    def qemu(fmt: str, opts: str) -> bytes:
        out = tmp / f"q.{fmt}"
        oracle.qemu_img("convert", "-f", "raw", "-O", fmt, "-o", opts, src, out)
        return out.read_bytes()

    qemu_stream = qemu("vmdk", "subformat=streamOptimized")
    qemu_sparse = qemu("vmdk", "subformat=monolithicSparse")
    dyn_sink = BytesSink()
    await write_all(
        vhd.create_writer(dyn_sink, len(data), WriterOptions(subformat="dynamic",
                                                              cluster_size=64 * KiB)),
        _extents(data),
    )  # fmt: skip
    vhd_dyn = bytes(dyn_sink.buffer)
    fixed_sink = BytesSink()
    await write_all(vhd.create_writer(fixed_sink, 256 * KiB, WriterOptions(subformat="fixed")),
                    _extents(data[: 256 * KiB]))  # fmt: skip
    vhd_fixed = bytes(fixed_sink.buffer)
    small = tmp / "small.raw"
    small.write_bytes(data[: MiB + 512])
    vhdx_out = tmp / "x.vhdx"
    oracle.qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", small, vhdx_out)
    vhdx_img = vhdx_out.read_bytes()
    ours_vhdx = BytesSink()
    await write_all(vhdx.create_writer(ours_vhdx, MiB + 512, WriterOptions(cluster_size=MiB)),
                    _extents(data[: MiB + 512]))  # fmt: skip
    vhdx_ours = bytes(ours_vhdx.buffer)

    def tail(image: bytes, n: int) -> tuple[int, int]:
        return (max(len(image) - n, 0), len(image))

    async def open_vmdk(b: bytes) -> ImageReader:
        return await _open_random(vmdk, b)

    async def open_vhd(b: bytes) -> ImageReader:
        return await _open_random(vhd, b)

    async def open_vhdx(b: bytes) -> ImageReader:
        return await _open_random(vhdx, b)

    return [
        Target("vmdk-stream-ours", ours_img, [(0, 1024), (64 * KiB, 66 * KiB),
               tail(ours_img, 8 * KiB)], _no_fix, open_vmdk),
        Target("vmdk-stream-ours-seq", ours_img, [(0, 1024), (64 * KiB, 80 * KiB),
               tail(ours_img, 8 * KiB)], _no_fix, _open_vmdk_seq),
        Target("vmdk-stream-qemu", qemu_stream, [(0, 66 * KiB)], _no_fix, open_vmdk),
        Target("vmdk-stream-qemu-seq", qemu_stream, [(0, 70 * KiB)], _no_fix, _open_vmdk_seq),
        Target("vmdk-sparse-qemu", qemu_sparse, [(0, 66 * KiB)], _no_fix, open_vmdk),
        Target("vhd-dynamic", vhd_dyn, [(0, 4 * KiB), tail(vhd_dyn, 512)], _fix_vhd, open_vhd),
        Target("vhd-fixed", vhd_fixed, [tail(vhd_fixed, 512)], _fix_vhd, open_vhd),
        Target("vhdx", vhdx_img, [(0, 320 * KiB), (MiB, 64 * KiB), (2 * MiB, 64 * KiB),
               (3 * MiB, 66 * KiB)], _fix_vhdx, open_vhdx),
        Target("vhdx-ours", vhdx_ours, [(0, 320 * KiB), (2 * MiB, 66 * KiB),
               (3 * MiB, 4 * KiB)], _fix_vhdx, open_vhdx),
    ]  # fmt: skip


def mutate(image: bytes, target: Target, rng: random.Random) -> bytes:
    buf = bytearray(image)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5])):
        if not buf:
            break
        if target.hot and rng.random() < 0.75:
            lo, hi = rng.choice(target.hot)
            hi = min(hi, len(buf))
            lo = min(lo, max(hi - 1, 0))
        else:
            lo, hi = 0, len(buf)
        pos = rng.randrange(lo, max(hi, lo + 1)) if hi > lo else 0
        op = rng.random()
        if op < 0.35:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op < 0.55:
            pos -= pos % 4
            if pos + 4 <= len(buf):
                fmt = rng.choice("<>")
                struct.pack_into(f"{fmt}I", buf, pos, rng.choice(INTERESTING_32))
        elif op < 0.7:
            pos -= pos % 8
            if pos + 8 <= len(buf):
                fmt = rng.choice("<>")
                struct.pack_into(f"{fmt}Q", buf, pos, rng.choice(INTERESTING_64))
        elif op < 0.78:
            del buf[rng.randrange(0, len(buf)) :]
        elif op < 0.86:
            pos -= pos % 512
            buf[pos : pos + 512] = bytes(len(buf[pos : pos + 512]))
        elif op < 0.93 and len(buf) >= 1024:
            a = rng.randrange(0, len(buf) // 512) * 512
            b = rng.randrange(0, len(buf) // 512) * 512
            buf[b : b + 512] = buf[a : a + 512]
        else:
            buf += rng.randbytes(rng.randint(1, 2048))
    if rng.random() < 0.5:
        target.fix(buf)
    return bytes(buf)


async def _consume(target: Target, image: bytes) -> None:
    reader = await target.open(image)
    try:
        expected = 0
        async for ext in reader.extents(rng_chunk(image)):
            assert ext.offset == expected
            expected = ext.end
        assert expected == reader.virtual_size
        await reader.allocation_map()
    finally:
        await reader.close()


def rng_chunk(image: bytes) -> int:
    return [4 * KiB, 64 * KiB, MiB][len(image) % 3]


@pytest.fixture(scope="module")
async def targets(tmp_path_factory: pytest.TempPathFactory) -> list[Target]:
    return await _targets(tmp_path_factory.mktemp("fuzz"))


TARGET_NAMES = ["vmdk-stream-ours", "vmdk-stream-ours-seq", "vmdk-stream-qemu",
                "vmdk-stream-qemu-seq", "vmdk-sparse-qemu", "vhd-dynamic", "vhd-fixed",
                "vhdx", "vhdx-ours"]  # fmt: skip


@pytest.mark.parametrize("name", TARGET_NAMES)
async def test_fuzz_reader(targets: list[Target], name: str) -> None:
    target = next(t for t in targets if t.name == name)
    await asyncio.wait_for(_consume(target, target.image), TIMEOUT)  # the base image is valid
    seed = sum(map(ord, name))
    rng = random.Random(seed)
    errors = 0
    for i in range(ITERATIONS):
        image = mutate(target.image, target, rng)
        try:
            await asyncio.wait_for(_consume(target, image), TIMEOUT)
        except FormatError:
            errors += 1
        except TimeoutError:
            pytest.fail(f"{name}: iteration {i} (seed {seed}) hung")
        except Exception as exc:
            raise AssertionError(f"{name}: iteration {i} (seed {seed}) raised {exc!r}") from exc
    # The mutations must actually exercise the error paths (and not all fail early).
    assert 0 < errors < ITERATIONS
