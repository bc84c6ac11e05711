"""Shared buffer helpers: zero detection, the first-byte fast path, and the extent
builder's zero-copy rules (checked against brute force with hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.formats.base import Extent, immutable
from app.formats.buffers import first_bytes_nonzero, is_zero, zeros
from app.formats.vdisk_common import ExtentBuilder

KiB = 1024


@st.composite
def sparse_buffers(draw: st.DrawFn) -> bytearray:
    """Mostly zero buffers with a few non-zero bytes anywhere (including the ends)."""
    n = draw(st.integers(0, 5 * 64 * KiB))
    buf = bytearray(n)
    for pos in draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=4)) if n else []:
        buf[pos] = draw(st.integers(1, 255))
    return buf


@settings(max_examples=300, deadline=None)
@given(sparse_buffers(), st.data())
def test_is_zero_matches_brute_force(buf: bytearray, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(buf)))
    end = data.draw(st.integers(start, len(buf)))
    expected = not any(buf[start:end])
    for form in (bytes(buf), buf, memoryview(bytes(buf))):
        assert is_zero(form, start, end) is expected
    assert is_zero(bytes(buf)) is (not any(buf))


def test_is_zero_beyond_the_shared_zeros() -> None:
    big = bytearray(9 * 1024 * KiB)
    assert is_zero(big)
    big[-2] = 1  # not one of the three bytes looked at first
    assert not is_zero(big)
    assert is_zero(big, 0, len(big) - 2)
    assert bytes(zeros(5 * 1024 * KiB)) == bytes(5 * 1024 * KiB)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=1, max_size=64),
    st.integers(0, 3 * 4096),
    st.sampled_from([1, 7, 512, 4096]),
)
def test_first_bytes_nonzero_matches_brute_force(pattern: bytes, offset: int, granule: int) -> None:
    data = (pattern * (3 * 4096 // len(pattern) + 1))[: 3 * 4096]
    starts = [0, *range(granule - offset % granule, len(data), granule)]
    expected = all(data[i] for i in starts)
    assert first_bytes_nonzero(data, offset, granule) is expected
    assert first_bytes_nonzero(memoryview(data), offset, granule) is expected


def _check_contract(extents: list[Extent], chunk: int, total: int) -> None:
    pos = 0
    for ext in extents:
        assert ext.offset == pos
        if ext.data is not None:
            assert ext.length <= chunk
        pos = ext.end
    assert pos == total


def test_builder_passes_large_pieces_through_without_copying() -> None:
    chunk = 1024 * KiB
    big = bytes(range(256)) * (3 * chunk // 256 + 3)  # 3 chunks and a bit
    b = ExtentBuilder(chunk)
    out = b.data(0, big) + b.finish()
    _check_contract(out, chunk, len(big))
    assert [e.length for e in out] == [chunk, chunk, chunk, len(big) - 3 * chunk]
    for ext in out:
        assert isinstance(ext.data, memoryview)
        assert ext.data.obj is big  # a view of the caller's bytes, not a copy
    assert b"".join(bytes(e.data or b"") for e in out) == big
    # A piece of exactly a quarter chunk or more is its own extent, as it is.
    quarter = b"\x01" * (chunk // 4)
    b2 = ExtentBuilder(chunk)
    (only,) = b2.data(0, quarter) + b2.finish()
    assert only.data is quarter


def test_builder_joins_small_pieces_up_to_a_chunk() -> None:
    chunk = 256 * KiB
    grain = b"\x07" * (16 * KiB)
    b = ExtentBuilder(chunk)
    out: list[Extent] = []
    for i in range(40):  # 640 KiB in 16 KiB pieces
        out += b.data(i * len(grain), grain)
    out += b.finish()
    _check_contract(out, chunk, 40 * len(grain))
    assert [e.length for e in out] == [chunk, chunk, 128 * KiB]
    # Zero pieces become zero runs and split the data.
    b3 = ExtentBuilder(chunk)
    out3 = (
        b3.data(0, grain) + b3.data(len(grain), bytes(len(grain))) + b3.data(2 * len(grain), grain)
    )
    out3 += b3.finish()
    runs = [(e.length, e.is_zero) for e in out3]
    assert runs == [(len(grain), False), (len(grain), True), (len(grain), False)]


@pytest.mark.parametrize("size", [4 * KiB, 512 * KiB])
def test_builder_and_immutable_copy_writable_buffers(size: int) -> None:
    buf = bytearray(b"\x05" * size)
    b = ExtentBuilder(256 * KiB)
    out = b.data(0, buf) + b.finish()
    buf[:] = b"\x09" * size  # the producer reuses its buffer
    assert b"".join(bytes(e.data or b"") for e in out) == b"\x05" * size
    # immutable(): read-only things pass as they are, writable ones are copied.
    ro = memoryview(b"abc")
    assert immutable(ro) is ro
    raw = b"xyz"
    assert immutable(raw) is raw
    rw = memoryview(bytearray(b"abc"))
    frozen = immutable(rw)
    rw[0] = ord("z")
    assert frozen == b"abc"
