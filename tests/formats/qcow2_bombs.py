"""Hand-built qcow2 images that claim far more than they hold (decompression bombs and
their variants), for the reader's and the upload's tests.

Layout (64 KiB clusters): header, refcount table, refcount block, L1 table, the L2
tables, then the data clusters. Refcounts are right for every cluster the image uses
unless a test asks otherwise.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

from app.formats import qcow2_layout as L

CS_BITS = 16
CS = 1 << CS_BITS
GiB = 1 << 30

#: An L2 entry given the host offsets of the data blobs (None: unallocated).
Entry = Callable[[list[int]], int] | None


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def build(virtual_size: int, entries: list[Entry], data: list[bytes], *,
          refcount: int = 1, unreferenced: set[int] | None = None) -> bytes:
    """An image of ``virtual_size`` whose L2 entries are ``entries`` (guest cluster
    order; see :func:`data_entry` and :func:`compressed_entry`) and whose data clusters
    hold ``data``. ``refcount`` is stored for every used cluster; clusters in
    ``unreferenced`` (host cluster numbers) get 0."""
    per_l2 = CS // 8
    l1_entries = L.l1_entries_needed(virtual_size, CS)
    l2_tables = L.div_round_up(len(entries), per_l2) if entries else 0
    l1_clusters = L.div_round_up(l1_entries * 8, CS)
    first_l2 = 3 + l1_clusters
    first_data = first_l2 + l2_tables
    data_clusters = sum(L.div_round_up(len(d), CS) for d in data)
    total = first_data + data_clusters
    assert total <= CS // 2, "one refcount block covers this test image"

    out = bytearray(total * CS)
    hdr = L.Header(version=3, cluster_bits=CS_BITS, size=virtual_size, l1_size=l1_entries,
                   l1_table_offset=3 * CS, refcount_table_offset=CS,
                   refcount_table_clusters=1, refcount_order=4,
                   header_length=L.V3_MIN_HEADER_LENGTH + 8)
    raw = hdr.pack()
    out[: len(raw)] = raw
    struct.pack_into(">Q", out, CS, 2 * CS)  # refcount table -> block at cluster 2
    for c in range(total):
        value = 0 if unreferenced and c in unreferenced else refcount
        struct.pack_into(">H", out, 2 * CS + 2 * c, value)
    for t in range(l2_tables):
        struct.pack_into(">Q", out, 3 * CS + 8 * t, (first_l2 + t) * CS | L.OFLAG_COPIED)
    offsets = []
    pos = first_data * CS
    for d in data:
        out[pos : pos + len(d)] = d
        offsets.append(pos)
        pos += L.div_round_up(len(d), CS) * CS
    for i, entry in enumerate(entries):
        if entry is None:
            continue
        struct.pack_into(">Q", out, first_l2 * CS + 8 * i, entry(offsets))
    return bytes(out)


def data_entry(index: int) -> Entry:
    """A standard cluster: the blob ``data[index]``."""
    return lambda offsets: offsets[index] | L.OFLAG_COPIED


def compressed_entry(index: int, length: int, within: int = 0) -> Entry:
    """A compressed cluster: ``length`` bytes at ``within`` in the blob ``data[index]``."""
    return lambda offsets: L.encode_compressed(offsets[index] + within, length, CS_BITS)


def compressed_bomb(virtual_size: int = 64 * GiB) -> bytes:
    """Every L2 entry of a ``virtual_size`` disk points at one compressed cluster (of
    zeros), whose refcount is the largest 16-bit value: about 8 MiB for 64 GiB."""
    stream = _deflate(bytes(CS))
    entry = compressed_entry(0, len(stream))
    return build(virtual_size, [entry] * (virtual_size // CS), [stream], refcount=0xFFFF)


def spread_bomb(clusters: int = 64, per_cluster: int = 400) -> bytes:
    """Distinct compressed streams, each referenced once and counted right, packed
    ``per_cluster`` to a host cluster: a valid image that inflates ~1000:1."""
    stream = _deflate(bytes(CS))
    assert len(stream) * per_cluster <= CS
    packed = [b"".join([stream] * per_cluster) for _ in range(clusters)]
    entries = [compressed_entry(c, len(stream), k * len(stream))
               for c in range(clusters) for k in range(per_cluster)]
    return build(len(entries) * CS, entries, packed, refcount=per_cluster)


def shared_data_cluster(virtual_size: int = 4 * GiB) -> bytes:
    """Every L2 entry points at the same standard data cluster."""
    block = random.Random(1).randbytes(CS)
    return build(virtual_size, [data_entry(0)] * (virtual_size // CS), [block],
                 refcount=0xFFFF)


def zlib_overflow() -> bytes:
    """One compressed cluster whose stream inflates to more than a cluster."""
    stream = _deflate(bytes(4 * CS))
    return build(CS, [compressed_entry(0, min(len(stream), CS))], [stream])


def refcount_disagrees() -> tuple[bytes, int]:
    """A small honest image whose refcount for its one data cluster is 0; returns the
    image and that host cluster's number."""
    block = random.Random(2).randbytes(CS)
    image = build(CS * 4, [data_entry(0), None, None, None], [block])
    data_cluster = len(image) // CS - 1
    return build(CS * 4, [data_entry(0), None, None, None], [block],
                 unreferenced={data_cluster}), data_cluster


def honest(clusters: int = 8, compressed: bool = True) -> tuple[bytes, bytes]:
    """A valid image (every other cluster compressed) and its raw contents."""
    rng = random.Random(3)
    raw = b"".join(bytes(CS // 2) + rng.randbytes(CS // 2) for _ in range(clusters))
    data: list[bytes] = []
    entries: list[Entry] = []
    for i in range(clusters):
        block = raw[i * CS : (i + 1) * CS]
        if compressed and i % 2:
            stream = _deflate(block)
            data.append(stream)
            entries.append(compressed_entry(len(data) - 1, len(stream)))
        else:
            data.append(block)
            entries.append(data_entry(len(data) - 1))
    return build(clusters * CS, entries, data), raw
