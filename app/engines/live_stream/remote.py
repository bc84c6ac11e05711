"""vmigrate live-stream helper: the program the service runs on the source and the
destination host of a live stream. Standard library only, Python 3.6 or newer.

It is not installed anywhere: the service sends this file's text over the SSH session
and runs it with a bootstrap that reads exactly the script from stdin, so the rest of
stdin stays free for data (see :func:`bootstrap_command`)::

    python3 -c 'import sys;exec(compile(sys.stdin.buffer.read(N),"vmls","exec"))' N MODE ...

Why not ship :mod:`app.formats.digest`: that module needs Python 3.10, and the hosts
this must run on include Python 3.6 (RHEL 8's platform python, Ubuntu 18.04). The small
``vmd1`` implementation below is checked against it by the tests.

Modes (``docs/live-stream.md`` has the wire format):

``read DEV SIZE START DIGEST GRANULARITY``
    Sends ``[START, SIZE)`` of DEV as frames on stdout: data frames for blocks (of
    GRANULARITY bytes, aligned on the disk) holding any non-zero byte, zero-run frames
    for the rest, so zero blocks never cross the network. With DIGEST=1 it also computes
    the ``vmd1`` digest of ``[0, SIZE)`` (reading ``[0, START)`` locally, unsent) and
    puts it in the end frame. Reads drop their pages from the cache as they go.
``read ... COMPARE``
    With COMPARE=1 (warm mode), stdin carries the destination's block hashes (see
    ``hashes``) and only blocks whose SHA-256 differs are sent; the digest is always
    computed (the hashes are needed anyway) and START must be block-aligned.
``read ... 0 ZSTD``
    With ZSTD=1 (the service found ``zstd`` on the destination, and the destination
    reads this helper's output as is) the helper may switch to compressing the rest of
    the stream with ``zstd -1``, once, after the first second and 8 MiB of data: when
    this host has ``zstd``, the data went slower than 250 MB/s (the link, or the far
    end, is the bottleneck), and a sample of the volume (non-zero pieces of a few
    blocks spread over it) shrinks to at most 80 % and compresses at least twice as
    fast as the data went. A ``C`` frame marks the switch.
``write DEV SIZE START EXCL SYNC_BYTES [SPARSE [DIRECT]]``
    Receives frames on stdin and writes them to DEV from START on. A zero run is
    deallocated where the device can do that without writing (``fallocate`` punching
    a hole: the kernel's write-zeroes without fallback, which a loop device, a thin
    volume or an SSD with deterministic zeroing offer; needs ctypes), else written only
    where DEV does not already read as zeros (read first, compare, then ``BLKZEROOUT``
    or explicit zeros), so a fresh or thin device stays unallocated and old data never
    survives. Every SYNC_BYTES written (and at least every 2 s, and on a sync frame) it
    runs fdatasync and prints ``DURABLE <offset>``: every byte below is on stable
    storage. EXCL=1 opens the device with O_EXCL (the kernel refuses a mounted device).
    Prints ``READY {...}`` first and ``DONE {...}`` after the end frame. With SPARSE=1
    frames may skip ahead over blocks that need no writing. With DIRECT=1 stdin is the
    reader's output as is (the service piped one host's ``ssh`` into the other's): it
    starts with the reader's greeting, and the end frame's JSON is printed back as
    ``SOURCE {...}`` before ``DONE``; after a ``C`` frame the rest is a zstd stream,
    decompressed with this host's ``zstd -d``.
``hashes DEV SIZE START``
    SHA-256 of each 1 MiB block from START (block-aligned), 32 raw bytes each.
``digest DEV SIZE``
    Prints the ``vmd1`` digest of the first SIZE bytes of DEV, read from the device
    (clean cached pages are dropped first).

Errors go to stderr as one line ``vmls-error {"kind": ..., "message": ...}`` and the
exit status is 3; a closed stdout/stdin (the service went away) exits 4.
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, cast

MAGIC = b"VMLS1\n"
#: Frame header: type, u64 a, u64 b (big-endian). D: offset, length + data; Z: offset,
#: length (zeros); S: sync request; E: end offset, length of the JSON that follows.
HEAD = struct.Struct(">cQQ")
DATA = b"D"
ZERO = b"Z"
SYNC = b"S"
END = b"E"
COMPRESSED = b"C"  # the rest of the stream is one zstd stream (DIRECT writers only)
MAX_FRAME = 16 * 1024 * 1024
READ_SIZE = 4 * 1024 * 1024
FRAME_DATA = 1024 * 1024
PIPE_SIZE = 1024 * 1024
#: Compression (read ZSTD=1): zstd's fastest level, decided once after this much...
ZSTD_LEVEL = "-1"
ZSTD_WATCH_SECONDS = 1.0
ZSTD_WATCH_BYTES = 8 * 1024 * 1024
ZSTD_MAX_RATE = 250e6  # bytes/s of data: faster than one zstd -1 keeps up with, twice
ZSTD_PAYS = 0.8  # a sample must shrink to at most this...
ZSTD_SPEEDUP = 2.0  # ...and compress this many times as fast as the data went
ZSTD_SAMPLES = 8  # blocks of BLOCK bytes, spread over the volume
DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: a multiple of any logical block size
BLOCK = 1024 * 1024  # vmd1 block size
ZEROS = bytes(READ_SIZE)
ZERO_BLOCK_HASH = hashlib.sha256(ZEROS[:BLOCK]).digest()
BLKZEROOUT = 0x127F  # _IO(0x12, 127)
#: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: on a block device, write-zeroes that may
#: unmap and never falls back to writing zero pages (EOPNOTSUPP instead).
PUNCH_HOLE = 0x02 | 0x01
SYNC_SECONDS = 2.0


class HelperError(Exception):
    def __init__(self, kind: str, message: str, **extra: object) -> None:
        Exception.__init__(self, message)
        self.kind = kind
        self.extra = extra


class Vmd1:
    """The ``vmd1`` disk digest (see app/formats/digest.py), fed in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.outer = hashlib.sha256(size.to_bytes(8, "big"))
        self.buf = bytearray()
        self.pos = 0

    def update(self, data: "bytes | memoryview") -> None:
        view = memoryview(data)
        self.pos += len(view)
        if self.buf:
            take = min(BLOCK - len(self.buf), len(view))
            self.buf += view[:take]
            view = view[take:]
            if len(self.buf) == BLOCK:
                self.outer.update(_block_hash(self.buf))
                self.buf = bytearray()
        while len(view) >= BLOCK:
            self.outer.update(_block_hash(view[:BLOCK]))
            view = view[BLOCK:]
        if len(view):
            self.buf += view

    def add(self, block_hash: bytes, length: int) -> None:
        """Feed the hash of the next whole block (or the short last one)."""
        if self.buf:
            raise HelperError("internal", "block hash fed mid-block")
        self.outer.update(block_hash)
        self.pos += length

    def hexdigest(self) -> str:
        if self.pos != self.size:
            raise HelperError("internal", f"digest read at {self.pos} of {self.size}")
        outer = self.outer.copy()
        if self.buf:
            outer.update(hashlib.sha256(self.buf).digest())
        return "vmd1:" + outer.hexdigest()


def _json(value: object) -> str:
    """JSON for flat dicts of str/int/float/bool/None (Debian's python3-minimal, a
    common python3 on servers, ships without the json module)."""
    if isinstance(value, dict):
        return "{" + ", ".join(_json(str(k)) + ": " + _json(v) for k, v in value.items()) + "}"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):  # a tuple, not int | float: Python 3.6
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in text) + '"'


def _block_hash(block: "bytes | bytearray | memoryview") -> bytes:
    if len(block) == BLOCK and ZEROS.startswith(block):
        return ZERO_BLOCK_HASH
    return hashlib.sha256(block).digest()


def _device_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def _drop_cache(fd: int, offset: int, length: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise HelperError("short-read", f"device ended at {offset + got}, expected "
                              f"{offset + length} bytes", offset=offset + got)
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class DeviceReader:
    """Reads a device past the page cache: ``O_DIRECT`` into one page-aligned buffer
    (mmap) where the device, the alignment and the Python (``os.preadv``, 3.7+; ``mmap``,
    not in python3-minimal) allow, else buffered reads whose pages are dropped after.
    Either way nothing of a disk-sized read stays cached, and a direct read costs the
    host one copy less. What :meth:`read` returns is valid until the next call."""

    def __init__(self, path: str, fd: int) -> None:
        self.fd = fd
        self.direct_fd = -1
        self.direct_bytes = 0
        self.buf: memoryview | None = None
        if not hasattr(os, "preadv") or not hasattr(os, "O_DIRECT"):
            return
        try:
            import mmap

            self.buf = memoryview(mmap.mmap(-1, READ_SIZE))
            self.direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT
                                     | getattr(os, "O_CLOEXEC", 0))
        except (ImportError, OSError):
            self.buf = None

    def read(self, length: int, offset: int) -> "bytes | memoryview":
        aligned = length - length % DIRECT_ALIGN  # the rest (a disk's tail): buffered
        if (self.buf is not None and aligned and length <= len(self.buf)
                and offset % DIRECT_ALIGN == 0):
            view = self.buf[:aligned]
            try:
                got = os.preadv(self.direct_fd, [view], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.close_direct()  # the device takes no direct reads after all
            else:
                self.direct_bytes += got
                if got == length:
                    return view
                rest = _pread_exact(self.fd, length - got, offset + got)
                _drop_cache(self.fd, offset + got, length - got)
                return bytes(view[:got]) + rest
        data = _pread_exact(self.fd, length, offset)
        _drop_cache(self.fd, offset, length)
        return data

    def close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        self.direct_fd = -1
        self.buf = None

    def close(self) -> None:
        self.close_direct()
        os.close(self.fd)


def _open(path: str, flags: int, size: int) -> int:
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise HelperError("busy", f"{path} is in use (mounted or held by another "
                              "device); refusing to overwrite it") from None
        raise HelperError("open", f"cannot open {path}: {exc.strerror}") from None
    have = _device_size(fd)
    if have < size:
        os.close(fd)
        raise HelperError("too-small", f"{path} holds {have} bytes, fewer than {size}")
    return fd


# --- compression -----------------------------------------------------------------------


def _find_program(name: str) -> str:
    """The path of an executable ``name`` on PATH, or "" (no shutil in python3-minimal)."""
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return ""


class CompressionSwitch:
    """Decides once, early in a read, whether the rest goes through ``zstd -1``."""

    def __init__(self, zstd: str, reader: "DeviceReader", size: int, granularity: int
                 ) -> None:
        self.zstd = zstd
        self.reader = reader
        self.size = size
        self.granularity = granularity
        self.started = -1.0
        self.decided = not zstd
        self.rate = 0.0

    def due(self, pos: int, data_bytes: int) -> bool:
        """Called after each chunk sent (``pos``: where the next one starts)."""
        if self.decided:
            return False
        now = time.monotonic()
        if self.started < 0:
            self.started = now
            return False
        elapsed = now - self.started
        if elapsed < ZSTD_WATCH_SECONDS or data_bytes < ZSTD_WATCH_BYTES:
            return False
        self.decided = True
        self.rate = data_bytes / elapsed
        if self.rate > ZSTD_MAX_RATE or pos >= self.size:
            return False
        speed = _compression_pays(self.zstd, self.reader, pos, self.size, self.granularity)
        return speed >= ZSTD_SPEEDUP * self.rate


def _compression_pays(zstd: str, reader: "DeviceReader", start: int, size: int,
                      granularity: int) -> float:
    """How fast (input bytes/s) ``zstd -1`` compresses a sample of what ``[start,
    size)`` sends, or 0 if the sample does not shrink to :data:`ZSTD_PAYS`: up to
    :data:`ZSTD_SAMPLES` blocks spread evenly over it, less their zero pieces of
    ``granularity`` bytes (those are never sent)."""
    span = size - start
    samples = []
    for k in range(ZSTD_SAMPLES):
        offset = start + span * k // ZSTD_SAMPLES
        offset -= offset % granularity
        view = memoryview(reader.read(min(BLOCK, size - offset), offset))
        samples += [view[i:i + granularity].tobytes() for i in range(0, len(view), granularity)
                    if not ZEROS.startswith(view[i:i + granularity])]
    if not samples:
        return 0.0
    raw = b"".join(samples)
    began = time.monotonic()
    try:
        packed = subprocess.run([zstd, ZSTD_LEVEL, "-q", "-c"], input=raw,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0.0
    if len(packed) > ZSTD_PAYS * len(raw):
        return 0.0
    return len(raw) / max(time.monotonic() - began, 1e-6)


def _pump(source: "io.BufferedReader", sink: "IO[bytes]") -> None:
    """Copy ``source`` into ``sink`` to its end, then close ``sink`` (a thread)."""
    try:
        while True:
            chunk = source.read1(PIPE_SIZE)
            if not chunk:
                break
            sink.write(chunk)
    except (OSError, ValueError):
        pass  # the decompressor is gone: the reader side reports what happened
    finally:
        with contextlib.suppress(OSError):
            sink.close()


# --- read ------------------------------------------------------------------------------


class Sender:
    """Turns chunks of the disk into frames, merging zero blocks into runs."""

    def __init__(self, out: IO[bytes], granularity: int) -> None:
        self.out = out
        self.g = granularity
        self.zero_start = -1
        self.zero_end = 0
        self.data_bytes = 0
        self.zero_bytes = 0

    def _flush_zero(self) -> None:
        if self.zero_start >= 0:
            length = self.zero_end - self.zero_start
            self.out.write(HEAD.pack(ZERO, self.zero_start, length))
            self.zero_bytes += length
            self.zero_start = -1

    def _zero(self, start: int, end: int) -> None:
        if self.zero_start < 0:
            self.zero_start = start
        self.zero_end = end

    def _data(self, offset: int, view: memoryview) -> None:
        self._flush_zero()
        for i in range(0, len(view), FRAME_DATA):
            part = view[i:i + FRAME_DATA]
            self.out.write(HEAD.pack(DATA, offset + i, len(part)))
            self.out.write(part)
        self.data_bytes += len(view)

    def chunk(self, offset: int, data: "bytes | memoryview") -> None:
        view = memoryview(data)
        n = len(view)
        if ZEROS.startswith(view):
            self._zero(offset, offset + n)
            return
        g = self.g
        cuts = [0, *range((offset // g + 1) * g - offset, n, g), n]
        run_start = 0
        run_zero = None
        for k in range(len(cuts) - 1):
            a, b = cuts[k], cuts[k + 1]
            zero = view[a] == 0 and ZEROS.startswith(view[a:b])
            if run_zero is None:
                run_zero = zero
            elif zero != run_zero:
                self._emit(offset, view, run_start, a, run_zero)
                run_start, run_zero = a, zero
        self._emit(offset, view, run_start, n, bool(run_zero))

    def _emit(self, offset: int, view: memoryview, a: int, b: int, zero: bool) -> None:
        if zero:
            self._zero(offset + a, offset + b)
        else:
            self._data(offset + a, view[a:b])

    def gap(self) -> None:
        """A block that is not sent: a zero run must not reach across it."""
        self._flush_zero()

    def finish(self) -> None:
        self._flush_zero()


def cmd_read(dev: str, size: int, start: int, want_digest: bool, granularity: int,
             compare: bool, zstd_ok: bool = False) -> None:
    """Send ``[start, size)``; with ``compare``, only the blocks whose SHA-256 differs
    from the destination's, read from stdin (32 bytes per block from ``start``); with
    ``zstd_ok``, compressed when that pays (see the module's docstring)."""
    if compare and start % BLOCK:
        raise HelperError("usage", "a compared read starts on a block boundary")
    fd = _open(dev, os.O_RDONLY, size)
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    reader = DeviceReader(dev, fd)
    out = sys.stdout.buffer
    theirs = cast("io.BufferedReader", sys.stdin.buffer)
    hello = {"size": size, "start": start, "pid": os.getpid(),
             "python": "{}.{}".format(*sys.version_info[:2])}
    out.write(MAGIC + _json(hello).encode() + b"\n")
    out.flush()
    switch = CompressionSwitch(_find_program("zstd") if zstd_ok and not compare else "",
                               reader, size, granularity)
    packer = None
    digest = Vmd1(size) if want_digest or compare else None
    pos = 0 if digest is not None else start
    sender = Sender(out, granularity)
    changed = 0
    while pos < size:
        n = min(READ_SIZE - pos % READ_SIZE, size - pos)
        if pos < start:
            n = min(n, start - pos)
        try:
            data = reader.read(n, pos)
        except OSError as exc:
            raise HelperError("read", f"reading {dev} at {pos}: {exc.strerror}", offset=pos,
                              errno=errno.errorcode.get(exc.errno or 0, "")) from None
        if compare and pos >= start:
            assert digest is not None
            view = memoryview(data)
            for b in range(0, n, BLOCK):
                block = view[b:b + BLOCK]
                mine = _block_hash(block)
                digest.add(mine, len(block))
                if mine != _read_exact(theirs, 32):
                    sender.chunk(pos + b, block)
                    changed += 1
                else:
                    sender.gap()
        else:
            if digest is not None:
                digest.update(data)
            if pos >= start:
                sender.chunk(pos, data)
        pos += n
        if pos > start and switch.due(pos, sender.data_bytes):
            out.write(HEAD.pack(COMPRESSED, 0, 0))  # the rest goes through zstd
            out.flush()
            packer = subprocess.Popen([switch.zstd, ZSTD_LEVEL, "-q", "-c"],
                                      stdin=subprocess.PIPE, bufsize=PIPE_SIZE)
            out = sender.out = cast("io.BufferedWriter", packer.stdin)
    sender.finish()
    info: dict[str, object] = {"data_bytes": sender.data_bytes, "zero_bytes": sender.zero_bytes,
                               "direct_read": reader.direct_bytes,
                               "zstd": packer is not None, "rate": int(switch.rate)}
    if compare:
        info["changed_blocks"] = changed
    if digest is not None:
        info["digest"] = digest.hexdigest()
    payload = _json(info).encode()
    out.write(HEAD.pack(END, size, len(payload)) + payload)
    out.flush()
    if packer is not None:
        out.close()
        if packer.wait() != 0:
            raise HelperError("zstd", f"zstd exited {packer.returncode}")
    reader.close()


def cmd_hashes(dev: str, size: int, start: int) -> None:
    """SHA-256 of every block of ``[start, size)`` (``start`` block-aligned), 32 raw
    bytes each, read from the device (clean cached pages dropped first)."""
    fd = _open(dev, os.O_RDONLY, size)
    _drop_cache(fd, 0, 0)
    reader = DeviceReader(dev, fd)
    out = sys.stdout.buffer
    pos = start - start % BLOCK
    while pos < size:
        n = min(READ_SIZE - pos % READ_SIZE, size - pos)
        view = memoryview(reader.read(n, pos))
        for b in range(0, n, BLOCK):
            out.write(_block_hash(view[b:b + BLOCK]))
        pos += n
    out.flush()
    reader.close()


# --- write -----------------------------------------------------------------------------


def _hole_puncher() -> "Callable[[int, int, int], None] | None":
    """``punch(fd, offset, length)`` through libc's fallocate, or None where ctypes is
    missing (Debian's python3-minimal): the writer then reads and compares instead."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
    except (ImportError, OSError, AttributeError):
        return None
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate.restype = ctypes.c_int

    def punch(fd: int, offset: int, length: int) -> None:
        if fallocate(fd, PUNCH_HOLE, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return punch


def _read_exact(inp: IO[bytes], n: int) -> bytes:
    data = inp.read(n)
    if data is None or len(data) != n:
        raise HelperError("truncated", "the stream ended early")
    return bytes(data)


class Writer:
    """Writes frames to the device: data with ``O_DIRECT`` from a page-aligned buffer
    where it can (one copy less than through the page cache, and nothing left cached),
    else buffered; zero runs by :meth:`zero`; fdatasync and ``DURABLE`` by :meth:`sync`."""

    def __init__(self, fd: int, sync_bytes: int, path: str = "") -> None:
        self.fd = fd
        self.direct_fd = -1
        self.direct_written = 0
        #: Frames are read into this buffer (page-aligned when mmap is there).
        self.buf = memoryview(bytearray(MAX_FRAME))
        if path and hasattr(os, "O_DIRECT"):
            try:
                import mmap

                self.buf = memoryview(mmap.mmap(-1, MAX_FRAME))
                # Not O_EXCL: ``fd`` holds the exclusive claim, if one was asked for.
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT
                                         | getattr(os, "O_CLOEXEC", 0))
            except (ImportError, OSError):
                self.buf = memoryview(bytearray(MAX_FRAME))
        self.sync_bytes = sync_bytes
        self.dirty = 0
        self.synced_at = time.monotonic()
        self.written = 0
        self.zeroed = 0
        self.punched = 0
        self.punch = _hole_puncher()  # until the device says it cannot
        self.punch_error = ""
        self.unsynced = False  # holes punched since the last sync
        self.zeroout = True  # BLKZEROOUT until the device says no
        self.durable_from = 0  # start of the range written since the last sync

    def pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        aligned = len(view) - len(view) % DIRECT_ALIGN  # the rest (a disk's tail): buffered
        if self.direct_fd >= 0 and aligned and offset % DIRECT_ALIGN == 0 \
                and view.obj is self.buf.obj:
            try:
                done = os.pwrite(self.direct_fd, view[:aligned], offset)
                self.direct_written += done
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct_fd)  # the device takes no direct writes after all
                self.direct_fd = -1
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        self.dirty += len(view)
        self.written += len(view)

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros: a punched hole where the
        device offers it, else writing only where it does not read as zeros already."""
        if self.punch is not None:
            try:
                self.punch(self.fd, offset, length)
            except OSError as exc:
                # EINVAL: this range (a tail not on a sector boundary); anything else:
                # the device cannot, so stop asking.
                if exc.errno != errno.EINVAL:
                    self.punch = None
                    self.punch_error = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            else:
                self.punched += length
                self.unsynced = True
                return
        pos, end = offset, offset + length
        bad_start, bad_end = -1, -1
        while pos < end:
            n = min(READ_SIZE - pos % READ_SIZE, end - pos)
            old = _pread_exact(self.fd, n, pos)
            _drop_cache(self.fd, pos, n)
            if not ZEROS.startswith(old):
                if bad_start >= 0 and bad_end == pos:
                    bad_end = pos + n
                else:
                    if bad_start >= 0:
                        self._zero_out(bad_start, bad_end - bad_start)
                    bad_start, bad_end = pos, pos + n
            pos += n
        if bad_start >= 0:
            self._zero_out(bad_start, bad_end - bad_start)

    def _zero_out(self, offset: int, length: int) -> None:
        if self.zeroout and offset % 512 == 0 and length % 512 == 0:
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                self.zeroed += length
                self.dirty += length
                return
            except OSError:
                self.zeroout = False
        pos = offset
        while pos < offset + length:
            n = min(READ_SIZE, offset + length - pos)
            self.pwrite(memoryview(ZEROS)[:n], pos)
            pos += n
        self.zeroed += length

    def sync(self, out: IO[bytes], pos: int) -> None:
        os.fdatasync(self.fd)
        _drop_cache(self.fd, self.durable_from, pos - self.durable_from)
        self.durable_from = pos
        self.dirty = 0
        self.unsynced = False
        self.synced_at = time.monotonic()
        out.write(f"DURABLE {pos}\n".encode())
        out.flush()

    def due(self) -> bool:
        return self.dirty >= self.sync_bytes or (
            (self.dirty > 0 or self.unsynced)
            and time.monotonic() - self.synced_at >= SYNC_SECONDS)


def cmd_write(dev: str, size: int, start: int, excl: bool, sync_bytes: int,
              sparse: bool, direct: bool) -> None:
    """Write frames from ``start`` on; with ``sparse``, frames may skip ahead (blocks a
    compared read found equal) but never go back; with ``direct``, stdin is the reader's
    output, greeting included, and its end frame's JSON is printed back."""
    fd = _open(dev, os.O_RDWR | (os.O_EXCL if excl else 0), size)
    out = sys.stdout.buffer
    inp = cast("io.BufferedReader", sys.stdin.buffer)
    ready = {"pid": os.getpid(), "capacity": _device_size(fd),
             "python": "{}.{}".format(*sys.version_info[:2])}
    out.write(f"READY {_json(ready)}\n".encode())
    out.flush()
    w = Writer(fd, sync_bytes, dev)
    w.durable_from = start
    pos = start
    unpacker = None
    if direct:
        if _read_exact(inp, len(MAGIC)) != MAGIC:
            raise HelperError("protocol", "the stream does not start with the reader's "
                              "greeting")
        if not inp.readline().endswith(b"\n"):
            raise HelperError("truncated", "the stream ended early")
    buf = w.buf
    while True:
        kind, a, b = HEAD.unpack(_read_exact(inp, HEAD.size))
        if kind in (DATA, ZERO) and ((a < pos if sparse else a != pos) or a + b > size):
            raise HelperError("protocol", f"frame at {a}+{b}, expected offset {pos} "
                              f"of {size}")
        if kind in (DATA, ZERO):
            pos = a
        if kind == DATA:
            if b > MAX_FRAME:
                raise HelperError("protocol", f"data frame of {b} bytes")
            view = memoryview(buf)[:b]
            got = 0
            while got < b:
                n = inp.readinto(view[got:])
                if not n:
                    raise HelperError("truncated", "the stream ended inside a frame")
                got += n
            w.pwrite(view, a)
            pos += b
        elif kind == ZERO:
            w.zero(a, b)
            pos += b
        elif kind == SYNC:
            w.sync(out, pos)
        elif kind == COMPRESSED and direct and unpacker is None:
            zstd = _find_program("zstd")
            if not zstd:
                raise HelperError("zstd", "the stream goes on zstd-compressed and this "
                                  "host has no zstd")
            unpacker = subprocess.Popen([zstd, "-d", "-q", "-c"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, bufsize=PIPE_SIZE)
            # What stdin's buffer already holds goes first: a thread feeds zstd.
            threading.Thread(target=_pump, args=(inp, unpacker.stdin), daemon=True).start()
            inp = cast("io.BufferedReader", unpacker.stdout)
        elif kind == END:
            info = _read_exact(inp, b)  # the reader's JSON (one line: see _json)
            if a != size or (pos != size and not sparse):
                raise HelperError("protocol", f"end at {a}, wrote up to {pos} of {size}")
            pos = size
            w.sync(out, pos)
            if direct:
                out.write(b"SOURCE " + info.replace(b"\n", b" ") + b"\n")
            done: dict[str, object] = {"written": w.written, "zeroed": w.zeroed,
                                       "punched": w.punched, "direct": w.direct_written,
                                       "zstd": unpacker is not None}
            if w.punch_error:
                done["punch_error"] = w.punch_error
            out.write(f"DONE {_json(done)}\n".encode())
            out.flush()
            if w.direct_fd >= 0:
                os.close(w.direct_fd)
            os.close(fd)
            return
        else:
            raise HelperError("protocol", f"unknown frame type {kind!r}")
        if w.due():
            w.sync(out, pos)


# --- digest ----------------------------------------------------------------------------


def cmd_digest(dev: str, size: int) -> None:
    fd = _open(dev, os.O_RDONLY, size)
    _drop_cache(fd, 0, 0)
    reader = DeviceReader(dev, fd)
    d = Vmd1(size)
    pos = 0
    while pos < size:
        n = min(READ_SIZE, size - pos)
        d.update(reader.read(n, pos))
        pos += n
    reader.close()
    sys.stdout.write(d.hexdigest() + "\n")
    sys.stdout.flush()


def _grow_pipe(fd: int) -> None:
    """Make the pipe sshd gave us hold 1 MiB (Linux, when the limit allows; else as
    is): sshd and the helper then take turns every MiB, not every 64 KiB."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)


def main(argv: "list[str]") -> int:
    try:
        mode = argv[0]
        _grow_pipe(0 if mode == "write" else 1)
        if mode == "read":
            cmd_read(argv[1], int(argv[2]), int(argv[3]), argv[4] == "1", int(argv[5]),
                     argv[6:7] == ["1"], argv[7:8] == ["1"])
        elif mode == "write":
            cmd_write(argv[1], int(argv[2]), int(argv[3]), argv[4] == "1", int(argv[5]),
                      argv[6:7] == ["1"], argv[7:8] == ["1"])
        elif mode == "hashes":
            cmd_hashes(argv[1], int(argv[2]), int(argv[3]))
        elif mode == "digest":
            cmd_digest(argv[1], int(argv[2]))
        else:
            raise HelperError("usage", f"unknown mode {mode!r}")
    except HelperError as exc:
        report: dict[str, object] = {"kind": exc.kind, "message": str(exc)}
        report.update(exc.extra)
        sys.stderr.write(f"vmls-error {_json(report)}\n")
        return 3
    except BrokenPipeError:
        return 4
    except OSError as exc:
        report = {"kind": "os", "message": f"{exc.filename or mode}: {exc.strerror}",
                  "errno": errno.errorcode.get(exc.errno or 0, "")}
        sys.stderr.write(f"vmls-error {_json(report)}\n")
        return 3
    return 0


if __name__ == "__main__":
    # argv: ["-c", N, MODE, ...] under the bootstrap; [script, MODE, ...] when run as a file.
    args = sys.argv[2:] if sys.argv[0] == "-c" else sys.argv[1:]
    code = main(args)
    try:
        sys.stdout.flush()
    except OSError:
        code = code or 4
    os._exit(code)  # no flush at interpreter exit: the service may be gone
