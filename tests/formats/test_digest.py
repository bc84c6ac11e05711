"""The vmd1 disk digest: definition, independence from extent splitting, sparse speed,
and the stdlib-only standalone form."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.formats import digest as digest_module
from app.formats.base import Extent, GiB, MiB
from app.formats.digest import (
    BLOCK_SIZE,
    ZERO_BLOCK_HASH,
    DigestError,
    DiskDigest,
    ParallelDigest,
    block_hashes,
    digest_bytes,
    digest_extents,
    digest_file,
    parse_digest,
)
from app.formats.io import FileSource
from app.formats.raw import open_reader
from tests.formats.oracle import make_sparse_raw


def reference_digest(disk: bytes) -> str:
    """The definition in docs/digest.md, written as plainly as possible."""
    outer = hashlib.sha256(len(disk).to_bytes(8, "big"))
    for start in range(0, len(disk), 1024 * 1024):
        outer.update(hashlib.sha256(disk[start : start + 1024 * 1024]).digest())
    return "vmd1:" + outer.hexdigest()


def sample_disk(size: int, seed: int = 1) -> bytes:
    """Random data with zero regions, some block-aligned, some not."""
    rng = random.Random(seed)
    buf = bytearray(size)
    pos = 0
    while pos < size:
        length = min(rng.choice([1, 511, 4096, 70_000, MiB, 3 * MiB // 2]), size - pos)
        if rng.random() < 0.5:
            buf[pos : pos + length] = rng.randbytes(length)
        pos += length
    return bytes(buf)


DISK = sample_disk(5 * MiB + 12345)


def test_constants() -> None:
    assert BLOCK_SIZE == 1024 * 1024
    assert hashlib.sha256(bytes(MiB)).digest() == ZERO_BLOCK_HASH
    assert digest_bytes(b"") == "vmd1:" + hashlib.sha256(bytes(8)).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 511, MiB - 1, MiB, MiB + 1, 3 * MiB, 5 * MiB + 12345])
def test_matches_the_definition(size: int) -> None:
    disk = DISK[:size]
    assert digest_bytes(disk) == reference_digest(disk)


def test_all_zero_disk_needs_no_data() -> None:
    d = DiskDigest(3 * MiB + 7)
    d.update_zeros(3 * MiB + 7)
    assert d.hexdigest() == reference_digest(bytes(3 * MiB + 7))


def feed_split(disk: bytes, cuts: list[int], as_zero_runs: bool) -> str:
    """Feed ``disk`` cut at ``cuts``; all-zero pieces as zero runs when ``as_zero_runs``."""
    d = DiskDigest(len(disk))
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(disk)}), len(disk)]
    for start, end in itertools.pairwise(bounds):
        piece = disk[start:end]
        if as_zero_runs and not any(piece):
            d.feed(start, end - start, None)
        else:
            d.feed(start, end - start, memoryview(piece))
    return d.hexdigest()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=len(DISK) - 1), max_size=40),
    as_zero_runs=st.booleans(),
)
def test_any_splitting_gives_the_same_digest(cuts: list[int], as_zero_runs: bool) -> None:
    assert feed_split(DISK, cuts, as_zero_runs) == reference_digest(DISK)


def test_zero_runs_inside_partial_blocks() -> None:
    # A disk whose zero regions start and end mid-block, fed as explicit zero runs.
    size = 4 * MiB + 100
    disk = bytearray(size)
    disk[10:20] = b"x" * 10
    disk[MiB + 5 : MiB + 9] = b"abcd"
    disk[size - 3 :] = b"end"
    d = DiskDigest(size)
    d.feed(0, 10, None)
    d.feed(10, 10, bytes(disk[10:20]))
    d.feed(20, MiB + 5 - 20, None)
    d.feed(MiB + 5, 4, b"abcd")
    d.feed(MiB + 9, size - 3 - (MiB + 9), None)
    d.feed(size - 3, 3, b"end")
    assert d.hexdigest() == reference_digest(bytes(disk))


@pytest.mark.parametrize("position", [0, 1, MiB - 1, MiB, 2 * MiB + 777, len(DISK) - 1])
def test_one_flipped_byte_changes_the_digest(position: int) -> None:
    flipped = bytearray(DISK)
    flipped[position] ^= 0x01
    assert digest_bytes(bytes(flipped)) != digest_bytes(DISK)


def test_size_is_part_of_the_digest() -> None:
    # The same bytes plus trailing zeros are a different disk.
    assert digest_bytes(bytes(MiB)) != digest_bytes(bytes(MiB + 1))
    assert digest_bytes(bytes(2 * MiB)) != digest_bytes(bytes(MiB))


def test_misuse_is_an_error() -> None:
    d = DiskDigest(10)
    with pytest.raises(DigestError):
        d.update(b"abc", offset=1)  # not at the position
    d.update(b"abc")
    with pytest.raises(DigestError):
        d.hexdigest()  # incomplete
    with pytest.raises(DigestError):
        d.update_zeros(8)  # past the end
    with pytest.raises(DigestError):
        d.feed(3, 4, b"ab")  # data does not match length
    d.update_zeros(7, offset=3)
    assert d.hexdigest() == reference_digest(b"abc" + bytes(7))
    with pytest.raises(DigestError):
        DiskDigest(-1)


def test_blocks_hashed_apart_and_fed_by_their_hashes() -> None:
    """Whole blocks hashed on their own (as the pipeline does, in parallel) and fed by
    their hashes give the same digest; hashes fed inside a block, or bytes that are not
    whole blocks, are errors."""
    disk = DISK
    d = DiskDigest(len(disk))
    d.update(disk[:100])
    d.update(disk[100:BLOCK_SIZE])
    d.update_hashed(block_hashes(disk[BLOCK_SIZE : 3 * BLOCK_SIZE]), offset=BLOCK_SIZE)
    d.update_hashed(b"")
    d.update(disk[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + 5])
    with pytest.raises(DigestError, match="inside a block"):
        d.update_hashed(block_hashes(bytes(BLOCK_SIZE)))
    d.update(disk[3 * BLOCK_SIZE + 5 :])
    assert d.hexdigest() == reference_digest(disk)
    assert block_hashes(bytes(2 * BLOCK_SIZE)) == ZERO_BLOCK_HASH * 2
    with pytest.raises(DigestError, match="whole"):
        block_hashes(bytes(BLOCK_SIZE + 1))
    with pytest.raises(DigestError, match="whole block hashes"):
        DiskDigest(BLOCK_SIZE).update_hashed(bytes(31))
    with pytest.raises(DigestError, match="past virtual size"):
        DiskDigest(BLOCK_SIZE).update_hashed(ZERO_BLOCK_HASH * 2)


async def test_parallel_digest_refuses_an_extent_whose_data_is_not_its_length() -> None:
    """`Extent` checks its length itself; any other extent-like object is checked here."""
    digest = ParallelDigest(2 * BLOCK_SIZE, None, depth=2)
    with pytest.raises(DigestError, match="length says"):
        await digest.feed(SimpleNamespace(offset=0, length=BLOCK_SIZE, data=bytes(10)))
    await digest.feed(Extent(0, BLOCK_SIZE, bytes(BLOCK_SIZE)))
    await digest.feed(Extent(BLOCK_SIZE, BLOCK_SIZE))
    assert await digest.hexdigest() == reference_digest(bytes(2 * BLOCK_SIZE))


def test_parse_digest() -> None:
    text = digest_bytes(b"abc")
    assert len(parse_digest(text)) == 32
    for bad in ("", "vmd1:", "vmd2:" + "0" * 64, "vmd1:" + "0" * 63, "vmd1:" + "x" * 64):
        with pytest.raises(DigestError):
            parse_digest(bad)


def test_digest_file_matches_bytes(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(DISK)
    assert digest_file(path) == reference_digest(DISK)
    assert digest_file(path, size=MiB + 3) == reference_digest(DISK[: MiB + 3])
    with pytest.raises(DigestError):
        digest_file(path, size=len(DISK) + 1)


def test_sparse_32gib_file_is_hashed_from_its_data_only(tmp_path: Path) -> None:
    size = 32 * GiB
    layout = [(0, 4096), (5 * GiB + 123, 3 * MiB), (size - 1000, 1000)]
    path = tmp_path / "sparse.raw"
    make_sparse_raw(path, size, layout, seed=7)
    progress: list[int] = []
    text = digest_file(path, progress=lambda done, total: progress.append(done))
    # Only the data ranges were read (a few MiB, not 32 GiB).
    assert len(progress) < 20
    # Independent computation from the known layout: zero blocks are the constant.
    expected = DiskDigest(size)
    with open(path, "rb") as f:
        pos = 0
        for off, length in layout:
            expected.update_zeros(off - pos)
            f.seek(off)
            expected.update(f.read(length))
            pos = off + length
    assert pos == size
    assert text == expected.hexdigest()


def test_all_zero_sparse_disk_is_the_zero_block_constant(tmp_path: Path) -> None:
    size = 32 * GiB
    path = tmp_path / "empty.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    outer = hashlib.sha256(size.to_bytes(8, "big") + ZERO_BLOCK_HASH * (size // MiB))
    assert digest_file(path) == "vmd1:" + outer.hexdigest()


async def test_digest_extents_from_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    make_sparse_raw(path, 9 * MiB + 17, [(100, 2 * MiB), (5 * MiB + 1, 300_000)], seed=3)
    reader = await open_reader(FileSource(path))
    try:
        text = await digest_extents(reader.extents(256 * 1024), reader.virtual_size)
    finally:
        await reader.close()
    assert text == digest_file(path) == reference_digest(path.read_bytes())


async def test_digest_extents_of_extent_objects() -> None:
    async def stream() -> AsyncIterator[Extent]:
        yield Extent(0, 3, b"abc")
        yield Extent(3, 2 * MiB)
        yield Extent(3 + 2 * MiB, 2, b"yz")

    text = await digest_extents(stream(), 2 * MiB + 5)
    assert text == reference_digest(b"abc" + bytes(2 * MiB) + b"yz")


def test_standalone_script_needs_only_the_stdlib(tmp_path: Path) -> None:
    """The module runs as a plain script in isolated mode (no app package, no site)."""
    path = tmp_path / "disk.raw"
    path.write_bytes(DISK)
    script = tmp_path / "digest.py"
    script.write_bytes(Path(digest_module.__file__).read_bytes())
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), str(path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == reference_digest(DISK)
    bad = subprocess.run(
        [sys.executable, "-I", "-S", str(script), str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("digest: ")
