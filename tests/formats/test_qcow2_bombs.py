"""qcow2 images that claim more than they hold are refused fast, before their data is
read: one compressed cluster referenced by every L2 entry (64 GiB from 8 MiB),
distinct streams packed ~1000:1, a standard cluster shared by every entry, a zlib
stream that inflates past its cluster, and a refcount table that disagrees. An honest
image of the same shapes still reads, and ``qemu-img`` agrees with our reading."""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from app.formats import qcow2
from app.formats.base import FormatError
from app.formats.io import BytesSource
from tests.formats import oracle
from tests.formats.qcow2_bombs import (
    CS,
    compressed_bomb,
    honest,
    refcount_disagrees,
    shared_data_cluster,
    spread_bomb,
    zlib_overflow,
)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _read_all(image: bytes) -> bytes:
    reader = await qcow2.open_reader(BytesSource(image))
    try:
        return await oracle.read_all(reader)
    finally:
        await reader.close()


async def _refused(image: bytes, match: str) -> float:
    """CPU seconds spent refusing ``image`` (reading it to the end must fail)."""
    start = _cpu()
    with pytest.raises(FormatError, match=match):
        await _read_all(image)
    return _cpu() - start


async def test_compressed_cluster_bomb_is_refused_at_once() -> None:
    image = compressed_bomb()
    assert len(image) < 9 * 1024 * 1024
    spent = await _refused(image, "decompression bomb")
    assert spent < 2.0, spent


async def test_bomb_also_refused_by_the_allocation_map() -> None:
    reader = await qcow2.open_reader(BytesSource(compressed_bomb()))
    with pytest.raises(FormatError, match="decompression bomb"):
        await reader.allocation_map()


async def test_packed_distinct_streams_are_refused_by_the_ratio() -> None:
    spent = await _refused(spread_bomb(), "more than 256:1")
    assert spent < 2.0, spent


async def test_one_standard_cluster_shared_by_every_entry_is_refused() -> None:
    spent = await _refused(shared_data_cluster(), "also holds another guest cluster")
    assert spent < 2.0, spent


async def test_zlib_stream_larger_than_its_cluster_is_refused() -> None:
    await _refused(zlib_overflow(), "inflates beyond the cluster size")


async def test_refcount_table_that_disagrees_is_refused(tmp_path: Path) -> None:
    image, cluster = refcount_disagrees()
    await _refused(image, f"host cluster {cluster * CS:#x} is in use but its refcount is 0")
    path = tmp_path / "bad.qcow2"
    path.write_bytes(image)
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode != 0  # QEMU sees the same corruption


async def test_honest_image_of_the_same_making_reads(tmp_path: Path) -> None:
    image, raw = honest()
    assert await _read_all(image) == raw
    path = tmp_path / "honest.qcow2"
    path.write_bytes(image)
    subprocess.run(["qemu-img", "check", str(path)], check=True, capture_output=True)
    out = tmp_path / "honest.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True)
    assert out.read_bytes() == raw


async def test_ratio_is_a_parameter() -> None:
    image, _ = honest(clusters=8)
    reader = await qcow2.open_reader(BytesSource(image), max_compression_ratio=0.01)
    with pytest.raises(FormatError, match="decompression bomb"):
        await oracle.read_all(reader)
