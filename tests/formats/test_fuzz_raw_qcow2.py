"""Bounded mutation fuzzing of the raw and qcow2 readers.

Small valid images (made by qemu-img and by our writers) are mutated with a fixed
seed: bit flips and interesting values in the header and the L1/L2 tables, random
bytes anywhere, truncation. Reading a mutant must either succeed or raise
:class:`FormatError`, within a time bound; nothing else may escape.
"""

from __future__ import annotations

import asyncio
import random
import struct
from dataclasses import dataclass

import pytest

from app.formats import qcow2, raw
from app.formats import qcow2_layout as L
from app.formats.base import FormatError, WriterOptions
from app.formats.io import BytesSink, BytesSource
from tests.formats import oracle

KiB = 1024
SEED = 20240611
ITERATIONS_PER_IMAGE = 200
TIME_LIMIT = 10.0  # seconds per mutant (generous: CI machines are slow)


@dataclass
class Seed:
    name: str
    data: bytes
    regions: list[tuple[int, int]]  # metadata ranges worth aiming at


def source_bytes() -> bytes:
    rng = random.Random(1)
    buf = bytearray(300 * KiB + 123)
    buf[0:5000] = rng.randbytes(5000)
    buf[70 * KiB : 150 * KiB] = (b"fuzzing qcow2 " * 10_000)[: 80 * KiB]
    buf[200 * KiB : 203 * KiB] = rng.randbytes(3 * KiB)
    buf[-100:] = rng.randbytes(100)
    return bytes(buf)


def metadata_regions(image: bytes) -> list[tuple[int, int]]:
    """Header, L1 table and L2 tables of a (valid) image."""
    hdr = L.Header.parse(image[:112])
    cs = hdr.cluster_size
    regions = [(0, min(cs, 512)), (hdr.l1_table_offset, max(8, hdr.l1_size * 8))]
    extl2 = bool(hdr.incompatible_features & L.INCOMPAT_EXTL2)
    for i in range(hdr.l1_size):
        entry = struct.unpack_from(">Q", image, hdr.l1_table_offset + i * 8)[0]
        off = entry & L.OFFSET_MASK
        if off:
            used = min(cs, L.div_round_up(hdr.size, cs) * (16 if extl2 else 8))
            regions.append((off, used))
    regions.append((hdr.refcount_table_offset, 64))
    return regions


async def our_image(data: bytes, options: WriterOptions) -> bytes:
    sink = BytesSink()
    writer = qcow2.create_writer(sink, len(data), options)
    async for ext in (await raw.open_reader(BytesSource(data))).extents(64 * KiB):
        await writer.write(ext)
    await writer.finish()
    return bytes(sink.buffer)


QEMU_SEEDS = {
    "plain-64k": ["-o", "cluster_size=64k"],
    "v2-512": ["-o", "compat=0.10,cluster_size=512"],
    "zlib-4k": ["-c", "-o", "cluster_size=4k"],
    "zstd-4k": ["-c", "-o", "cluster_size=4k,compression_type=zstd"],
    "extl2-16k": ["-o", "extended_l2=on,cluster_size=16k"],
}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Seed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    src = tmp / "src.raw"
    data = source_bytes()
    src.write_bytes(data)
    out: list[Seed] = []
    for name, args in QEMU_SEEDS.items():
        img = tmp / f"{name}.qcow2"
        oracle.qemu_img("convert", "-f", "raw", "-O", "qcow2", *args, src, img)
        image = img.read_bytes()
        out.append(Seed(name, image, metadata_regions(image)))
    return out


INTERESTING_64 = [
    0,
    1,
    L.OFLAG_COPIED,
    L.OFLAG_COMPRESSED,
    L.OFLAG_COPIED | 512,
    L.OFLAG_COPIED | 65536,
    (1 << 64) - 1,
    1 << 55,
    1 << 40,
    0x7FFF_FFFF_FFFF_FE00,
]
INTERESTING_32 = [0, 1, 8, 9, 16, 21, 22, 64, 72, 104, 112, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 20]


def mutate(rng: random.Random, seed: Seed) -> bytes:
    buf = bytearray(seed.data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if seed.regions and op < 0.45:  # flip bits inside metadata
            off, length = rng.choice(seed.regions)
            pos = off + rng.randrange(max(1, length))
            if pos < len(buf):
                buf[pos] ^= 1 << rng.randrange(8)
        elif seed.regions and op < 0.65:  # interesting 64-bit word in metadata
            off, length = rng.choice(seed.regions)
            pos = off + rng.randrange(max(1, length // 8)) * 8
            if pos + 8 <= len(buf):
                value = rng.choice([*INTERESTING_64, rng.getrandbits(64), len(buf), len(buf) - 512])
                struct.pack_into(">Q", buf, pos, value & ((1 << 64) - 1))
        elif op < 0.8:  # interesting 32-bit header field
            pos = rng.randrange(0, 112, 4)
            if pos + 4 <= len(buf):
                struct.pack_into(">I", buf, pos, rng.choice(INTERESTING_32))
        elif op < 0.92:  # random bytes anywhere (compressed data, tables, data)
            pos = rng.randrange(len(buf))
            n = rng.randint(1, 64)
            buf[pos : pos + n] = rng.randbytes(min(n, len(buf) - pos))
        else:  # truncate
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf)


async def exercise_qcow2(image: bytes) -> int:
    """Open, map and read a qcow2 image completely; returns the bytes seen."""
    reader = await qcow2.open_reader(BytesSource(image), max_virtual_size=1 << 40)
    seen = 0
    await reader.allocation_map()
    async for ext in reader.extents(64 * KiB):
        seen += ext.length
    assert seen == reader.virtual_size
    return seen


async def fuzz_seed(seed: Seed, iterations: int, rng: random.Random) -> tuple[int, int]:
    ok = refused = 0
    for i in range(iterations):
        mutant = mutate(rng, seed)
        try:
            await asyncio.wait_for(exercise_qcow2(mutant), TIME_LIMIT)
            ok += 1
        except FormatError:
            refused += 1
        except TimeoutError:  # pragma: no cover - a failure
            pytest.fail(f"{seed.name} mutant {i} took over {TIME_LIMIT}s")
        except Exception as exc:  # pragma: no cover - a failure
            raise AssertionError(f"{seed.name} mutant {i}: {type(exc).__name__}: {exc}") from exc
    return ok, refused


async def test_fuzz_qemu_images(seeds: list[Seed]) -> None:
    rng = random.Random(SEED)
    totals = [0, 0]
    for seed in seeds:
        await exercise_qcow2(seed.data)  # the unmutated seed reads fine
        ok, refused = await fuzz_seed(seed, ITERATIONS_PER_IMAGE, rng)
        totals[0] += ok
        totals[1] += refused
    # The mutations must hit both outcomes, or the fuzzer is not doing its job.
    assert totals[0] > 50
    assert totals[1] > 300


async def test_fuzz_our_images() -> None:
    rng = random.Random(SEED + 1)
    data = source_bytes()
    for name, options in (
        ("ours-zlib-4k", WriterOptions(compress=True, cluster_size=4096)),
        ("ours-v2-512", WriterOptions(subformat="v2", cluster_size=512)),
    ):
        image = await our_image(data, options)
        seed = Seed(name, image, metadata_regions(image))
        await exercise_qcow2(image)
        ok, refused = await fuzz_seed(seed, ITERATIONS_PER_IMAGE, rng)
        assert ok > 0
        assert refused > 0


class ChunkySource:
    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data = data
        self._pos = 0
        self._rng = rng
        self.size = len(data)

    async def read(self, n: int) -> bytes:
        take = self._rng.randint(1, max(1, n))
        out = self._data[self._pos : self._pos + min(n, take)]
        self._pos += len(out)
        return out

    async def close(self) -> None:
        return None


async def test_fuzz_raw_reader() -> None:
    """Raw accepts any bytes: whatever the content and read pattern, it is reproduced."""
    rng = random.Random(SEED + 2)
    base = source_bytes()
    for i in range(150):
        cut = rng.randrange(len(base))
        data = bytearray(base[:cut])
        for _ in range(rng.randint(0, 8)):
            if data:
                pos = rng.randrange(len(data))
                n = min(512, len(data) - pos)
                data[pos : pos + n] = bytes(n) if rng.random() < 0.5 else rng.randbytes(n)
        payload = bytes(data)
        chunk = rng.choice([512, 4096, 65536, 100_000])
        source = ChunkySource(payload, rng) if i % 2 else BytesSource(payload)
        reader = await raw.open_reader(source)
        got = await asyncio.wait_for(oracle.read_all(reader, chunk), TIME_LIMIT)
        assert got == payload


def test_regions_cover_tables(seeds: list[Seed]) -> None:
    for seed in seeds:
        assert len(seed.regions) >= 3, seed.name
