"""The live stream's data path between real SSH hosts (namespace sshds with loop
devices; no LVM needed): helper and dd ends in every combination, sparseness, zeros
written only where needed, resume, back-pressure bounds, a dropped connection, and the
helper's digest against the service's."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.engines.live_stream import (
    HostDevice,
    StreamResult,
    delta_stream,
    destination_digest,
    stream,
    wire,
)
from app.formats.digest import digest_bytes, digest_file
from app.transports.ssh import RemoteCommandError, SshConnectionError, ssh_session
from tests.engines.live_stream.support import SSH, SSH_ASYNCSSH, helper_session_pids, target
from tests.infra.fixtures import NsHostFactory
from tests.infra.nshost import NsHost

MiB = 1024 * 1024
SIZE = 40 * MiB + 12 * 1024  # not a multiple of the dd block or the digest block


def _fill_source(host: NsHost, size: int = SIZE) -> bytes:
    """Every other MiB random, the rest zeros, and a few isolated 4 KiB data blocks."""
    data = bytearray(size)
    for off in range(0, size, 2 * MiB):
        data[off:off + MiB] = os.urandom(min(MiB, size - off))
    for off in (MiB + 128 * 1024, 9 * MiB + 4096, size - 4096):
        data[off:off + 4096] = os.urandom(4096)
    with host.backing_file.open("r+b") as f:
        f.write(data)
    return bytes(data)


def _garbage(host: NsHost, size: int = SIZE) -> None:
    with host.backing_file.open("r+b") as f:
        f.write(b"\xa5" * size)


def _read_dest(host: NsHost, size: int = SIZE) -> bytes:
    with host.backing_file.open("rb") as f:
        return f.read(size)


@pytest.fixture
def pair(ns_host_factory: NsHostFactory) -> tuple[NsHost, NsHost]:
    return ns_host_factory(device_mib=48), ns_host_factory(device_mib=48)


@pytest.mark.parametrize(("src_helper", "dst_helper"),
                         [(True, True), (False, True), (True, False), (False, False)],
                         ids=["helper-helper", "dd-helper", "helper-dd", "dd-dd"])
async def test_copies_exactly_and_digests(pair: tuple[NsHost, NsHost], src_helper: bool,
                                          dst_helper: bool) -> None:
    a, b = pair
    content = _fill_source(a)
    _garbage(b)
    durable: list[int] = []
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device, src_helper),
                              HostDevice(sb, b.device, dst_helper), SIZE,
                              on_durable=durable.append)
        dest_digest = await destination_digest(sb, b.device, SIZE, helper=dst_helper)
    assert _read_dest(b) == content
    assert result.digest == digest_bytes(content) == dest_digest
    assert durable == sorted(durable)
    assert durable[-1] == SIZE
    # Two helpers over the OpenSSH client: the frames never passed through Python.
    assert result.handed_over == (src_helper and dst_helper)
    nonzero = sum(1 for i in range(0, SIZE, 64 * 1024) if any(content[i:i + 64 * 1024]))
    if src_helper:  # zero blocks never left the source
        assert result.data_bytes <= nonzero * 64 * 1024
    if dst_helper:
        # The stale 0xa5 bytes under the source's zeros are gone (the content check
        # above) without being read or written: the loop device punched holes.
        assert result.destination["punched"] == result.zero_bytes > 0
        assert result.destination["zeroed"] == 0


async def test_asyncssh_channels_without_the_openssh_client(
        pair: tuple[NsHost, NsHost]) -> None:
    """The same stream over asyncssh channels (what runs where no ``ssh`` is installed),
    including a dropped connection."""
    a, b = pair
    content = _fill_source(a)
    _garbage(b)
    assert b.sshd is not None
    durable = [0]
    async with ssh_session(target(a), SSH_ASYNCSSH) as sa, \
            ssh_session(target(b), SSH_ASYNCSSH) as sb:
        assert sa.native is None
        task = asyncio.create_task(stream(
            HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE, throttle_bps=8e6,
            on_durable=lambda o: durable.__setitem__(0, o)))
        async with asyncio.timeout(30):
            while durable[0] < 4 * MiB:
                await asyncio.sleep(0.05)
        os.kill(helper_session_pids(b.sshd.pid)[0], signal.SIGKILL)
        with pytest.raises(SshConnectionError):
            await asyncio.wait_for(task, 60)
    async with ssh_session(target(a), SSH_ASYNCSSH) as sa, \
            ssh_session(target(b), SSH_ASYNCSSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
                              resume_from=durable[0])
    assert _read_dest(b) == content
    assert result.digest == digest_bytes(content)


async def test_zeros_written_only_where_needed(pair: tuple[NsHost, NsHost]) -> None:
    a, b = pair
    _fill_source(a)
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE)
    assert result.destination["zeroed"] == 0
    assert result.destination["punched"] == result.zero_bytes > 0
    # The zero half of the destination was never allocated in its backing file.
    assert os.stat(b.backing_file).st_blocks * 512 < SIZE * 0.6


async def _stream_and_verify(a: NsHost, b: NsHost, content: bytes) -> StreamResult:
    """Stream ``a``'s device to ``b``'s with both helpers; the destination must then hold
    ``content`` and both ends' digests must be that of ``content``."""
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE)
        dest_digest = await destination_digest(sb, b.device, SIZE, helper=True)
    assert _read_dest(b) == content
    assert result.digest == dest_digest == digest_bytes(content)
    return result


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "zeroed"])
async def test_zero_runs_on_a_device_that_cannot_punch_holes(
        ns_host_factory: NsHostFactory, stale: bool) -> None:
    """A loop device on ramfs (no fallocate) refuses to punch holes: the helper falls back
    to reading the zero runs and writing zeros only where the device held anything."""
    a = ns_host_factory(device_mib=48)
    b = ns_host_factory(device_mib=48, backing="ramfs")
    content = _fill_source(a)
    if stale:
        _garbage(b)
    result = await _stream_and_verify(a, b, content)
    assert result.destination["punched"] == 0
    assert result.destination["punch_error"] in ("EOPNOTSUPP", "ENOTSUP")  # one errno
    if stale:
        assert result.destination["zeroed"] == result.zero_bytes
    else:
        assert result.destination["zeroed"] == 0  # read as zeros already: nothing written


def _compressible(host: NsHost, size: int = SIZE) -> bytes:
    """Text-like data (what a volume of logs, configuration and code holds), with
    the zero runs of :func:`_fill_source`; about 4:1 under zstd -1."""
    words = [os.urandom(3).hex() for _ in range(2000)]
    rng = random.Random(5)
    data = bytearray(size)
    for off in range(0, size, 2 * MiB):
        text = " ".join(rng.choice(words) for _ in range(MiB // 5)).encode()
        data[off:off + MiB] = text[:min(MiB, size - off)]
    with host.backing_file.open("r+b") as f:
        f.write(data)
    return bytes(data)


@pytest.mark.parametrize("case", ["compressible", "random", "no-zstd-at-destination",
                                  "fast-link"])
async def test_zstd_when_both_ends_have_it_and_it_pays(ns_host_factory: NsHostFactory,
                                                       case: str) -> None:
    """Over a slow link (5 MB/s out of the source host) compressible data switches to
    zstd after the first second; random data, a destination without zstd or a fast
    link (the stream is over before there is anything to decide) stay raw."""
    a = ns_host_factory(device_mib=48)
    b = ns_host_factory(device_mib=48, hide=("zstd",) if case.startswith("no-") else ())
    if case != "fast-link":
        a.limit_egress("40mbit")
    content = _fill_source(a) if case == "random" else _compressible(a)
    _garbage(b)
    result = await _stream_and_verify(a, b, content)
    assert result.handed_over
    assert result.compressed == (case == "compressible")
    assert result.destination["zstd"] == result.compressed


@pytest.mark.parametrize("src_helper", [True, False], ids=["helper", "dd"])
async def test_resume_writes_only_the_rest(pair: tuple[NsHost, NsHost],
                                           src_helper: bool) -> None:
    a, b = pair
    content = _fill_source(a)
    resume = 17 * MiB + 64 * 1024
    with b.backing_file.open("r+b") as f:
        f.write(content[:resume])  # what an earlier attempt made durable
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device, src_helper), HostDevice(sb, b.device),
                              SIZE, resume_from=resume)
    expected_start = resume if src_helper else resume - resume % wire.DD_BLOCK
    assert result.resumed_from == expected_start
    assert _read_dest(b) == content
    assert result.digest == digest_bytes(content)  # the whole disk, not just the rest


async def test_throttle_and_backpressure_bound_memory(pair: tuple[NsHost, NsHost]) -> None:
    """Throttled to 8 MB/s, 40 MiB with half zeros takes about 2.6 s; the durable offset
    trails what was sent by no more than the pipeline's queues plus the sync interval."""
    a, b = pair
    _fill_source(a)
    sent: list[int] = []
    lag: list[int] = []
    durable = [0]

    def on_durable(offset: int) -> None:
        durable[0] = offset

    def on_progress(done: int, total: int) -> None:
        sent.append(done)
        lag.append(done - durable[0])

    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        started = asyncio.get_running_loop().time()
        await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
                     throttle_bps=8e6, on_durable=on_durable, on_progress=on_progress)
        elapsed = asyncio.get_running_loop().time() - started
    assert elapsed > 2.0
    assert max(lag) <= 32 * MiB


async def test_dropped_connection_is_retryable(pair: tuple[NsHost, NsHost]) -> None:
    a, b = pair
    _fill_source(a)
    assert b.sshd is not None
    durable = [0]
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        task = asyncio.create_task(stream(
            HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE, throttle_bps=4e6,
            on_durable=lambda o: durable.__setitem__(0, o)))
        async with asyncio.timeout(30):
            while durable[0] < 4 * MiB:
                await asyncio.sleep(0.05)
        victims = helper_session_pids(b.sshd.pid)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        with pytest.raises(SshConnectionError):
            await asyncio.wait_for(task, 60)
    # A second attempt resumes from what was durable and completes the copy.
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
                              resume_from=durable[0])
    assert result.resumed_from >= 4 * MiB
    assert digest_file(b.backing_file, size=SIZE) == result.digest


async def test_destination_too_small_is_refused_by_the_helper(
        ns_host_factory: NsHostFactory) -> None:
    a, small = ns_host_factory(device_mib=48), ns_host_factory(device_mib=8)
    _fill_source(a)
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(small), SSH) as sb:
        with pytest.raises(RemoteCommandError, match=r"the destination helper.*fewer than"):
            await stream(HostDevice(sa, a.device), HostDevice(sb, small.device), SIZE)


async def test_handed_over_source_failure_names_the_source(
        ns_host_factory: NsHostFactory) -> None:
    """The source helper fails (its device is too small): the destination helper then
    runs out of input, but the error is the source's own."""
    small, b = ns_host_factory(device_mib=8), ns_host_factory(device_mib=48)
    async with ssh_session(target(small), SSH) as sa, ssh_session(target(b), SSH) as sb:
        with pytest.raises(RemoteCommandError, match=r"the source helper.*fewer than"):
            await stream(HostDevice(sa, small.device), HostDevice(sb, b.device), SIZE)


async def test_handed_over_stream_dropped_connection_is_retryable(
        pair: tuple[NsHost, NsHost]) -> None:
    """The destination's connection drops while the handed-over stream stands still (its
    helper stopped, so back-pressure holds the source): a retryable error, no hang, and
    a second attempt resumes from what was durable."""
    a, b = pair
    content = _fill_source(a)
    assert b.sshd is not None
    durable = [0]
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        task = asyncio.create_task(stream(
            HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
            on_durable=lambda o: durable.__setitem__(0, o)))
        async with asyncio.timeout(30):
            while not (helpers := _helper_pids(b.sshd.pid)):
                await asyncio.sleep(0.002)
        for pid in helpers:
            os.kill(pid, signal.SIGSTOP)
        victims = helper_session_pids(b.sshd.pid)
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with pytest.raises(SshConnectionError, match="lost during the destination helper"):
            await asyncio.wait_for(task, 60)
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
                              resume_from=durable[0])
    assert result.handed_over
    assert result.resumed_from == durable[0] < SIZE
    assert _read_dest(b) == content
    assert result.digest == digest_bytes(content)


async def test_hand_over_falls_back_to_the_relay_when_the_pipe_is_too_small(
        pair: tuple[NsHost, NsHost], monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper script waits in the pipe before anyone reads it: one the pipe cannot
    hold (here padded to 2 MiB, more than the 1 MiB pipe) means the service relays."""
    a, b = pair
    content = _fill_source(a)
    padded = wire.helper_script() + b"#" * (2 * MiB) + b"\n"
    monkeypatch.setattr(wire, "helper_script", lambda: padded)
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE)
    assert not result.handed_over
    assert _read_dest(b) == content
    assert result.digest == digest_bytes(content)


def _helper_pids(sshd_pid: int) -> list[int]:
    """The python3 helper processes below the sessions of ``sshd_pid``."""
    pids = []
    for session in helper_session_pids(sshd_pid):
        pids += [p for p in _descendants(session)
                 if Path(f"/proc/{p}/comm").read_text().strip().startswith("python3")]
    return pids


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True,
                         check=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def test_delta_pass_sends_only_changed_blocks(pair: tuple[NsHost, NsHost]) -> None:
    a, b = pair
    content = bytearray(_fill_source(a))
    stale = bytearray(content)
    for off in (0, 5 * MiB + 100, 20 * MiB, SIZE - 10):  # three blocks and the short tail
        stale[off:off + 10] = b"stale data"
    stale[11 * MiB:12 * MiB] = b"\x5a" * MiB  # a block the source has as zeros
    with b.backing_file.open("r+b") as f:
        f.write(stale)
    async with ssh_session(target(a), SSH) as sa, ssh_session(target(b), SSH) as sb:
        result = await delta_stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE)
        again = await delta_stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE)
        resumed = await delta_stream(HostDevice(sa, a.device), HostDevice(sb, b.device), SIZE,
                                     start=7 * MiB + 5)
    assert _read_dest(b) == bytes(content)
    assert result.changed_blocks == 5
    assert result.data_bytes <= 4 * MiB + 12 * 1024  # the changed blocks' data, no more
    assert result.digest == again.digest == resumed.digest == digest_bytes(bytes(content))
    assert again.changed_blocks == again.data_bytes == 0
    assert resumed.resumed_from == 7 * MiB


# --- the helper on its own (run locally, as the remote hosts run it) ------------------


def _helper(*args: str | int | Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    script = wire.helper_script()
    boot = f'import sys;exec(compile(sys.stdin.buffer.read({len(script)}),"vmls-helper","exec"))'
    return subprocess.run([sys.executable, "-c", boot, str(len(script)), *map(str, args)],
                          input=script + stdin, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("size", [0, 1, MiB - 1, MiB, 3 * MiB + 17])
def test_helper_digest_matches_the_service(tmp_path: Path, size: int) -> None:
    data = bytearray(size)
    if size > 100:
        data[size // 3:size // 3 + 50] = os.urandom(50)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(data) + b"\xff" * 4096)  # the device may be larger
    proc = _helper("digest", disk, size)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().strip() == digest_bytes(bytes(data))
    lines = [hashlib.sha256(bytes(data[i:i + MiB])).hexdigest()
             for i in range(0, size, MiB)]
    assert wire.vmd1_from_block_hashes(size, lines) == digest_bytes(bytes(data))


def test_helper_reports_errors_as_one_line(tmp_path: Path) -> None:
    proc = _helper("digest", tmp_path / "missing", 10)
    assert proc.returncode == 3
    failure = wire.parse_failure(proc.stderr.decode())
    assert failure is not None
    assert failure.kind == "open"
    assert "cannot open" in failure.message


def test_helper_refuses_a_truncated_stream(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    frames = wire.data_header(0, 4096) + b"x" * 100  # ends inside the frame
    proc = _helper("write", disk, MiB, 0, 0, MiB, stdin=frames)
    assert proc.returncode == 3
    failure = wire.parse_failure(proc.stderr.decode())
    assert failure is not None
    assert failure.kind == "truncated"
    assert b"DONE" not in proc.stdout


def test_helper_needs_only_python3_minimal() -> None:
    """Debian's python3-minimal (what many servers have) lacks json, ctypes and mmap,
    among others; the helper needs nothing outside this list, and imports ctypes (hole
    punching) and mmap (direct I/O buffers) only where an ImportError has a fallback."""
    import ast

    tree = ast.parse(wire.helper_script())
    optional: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                "ImportError" in ast.unparse(h.type) for h in node.handlers if h.type):
            optional |= {alias.name for sub in node.body for inner in ast.walk(sub)
                         if isinstance(inner, ast.Import) for alias in inner.names}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    minimal = {"collections", "contextlib", "errno", "fcntl", "hashlib", "io", "os", "stat",
               "struct", "subprocess", "sys", "threading", "time", "typing"}
    assert optional == {"ctypes", "mmap"}
    assert imported - optional <= minimal, imported - optional - minimal


def _helper_minimal(*args: str | int | Path, stdin: bytes = b""
                    ) -> subprocess.CompletedProcess[bytes]:
    """The helper as python3-minimal runs it: ctypes and mmap cannot be imported."""
    script = wire.helper_script()
    boot = ('import sys;sys.modules["ctypes"]=None;sys.modules["mmap"]=None;'
            f'exec(compile(sys.stdin.buffer.read({len(script)}),"vmls-helper","exec"))')
    return subprocess.run([sys.executable, "-c", boot, str(len(script)), *map(str, args)],
                          input=script + stdin, capture_output=True, timeout=60, check=False)


def _frames(output: bytes) -> bytes:
    """A reader's frames, without its greeting and its end frame's JSON."""
    pos = output.index(b"\n", len(wire.MAGIC)) + 1
    start = pos
    while True:
        kind, _, b = wire.HEAD.unpack_from(output, pos)
        if kind == wire.END:
            return output[start:pos]
        pos += wire.HEAD.size + (b if kind == wire.DATA else 0)


@pytest.mark.parametrize("minimal", [False, True], ids=["stdlib", "python3-minimal"])
def test_helper_read_write_with_and_without_ctypes_and_mmap(tmp_path: Path,
                                                            minimal: bool) -> None:
    """The same frames and the same disk whether the helper reads with O_DIRECT (mmap
    buffer) and punches holes (ctypes), or reads buffered and compares zero runs."""
    run = _helper_minimal if minimal else _helper
    size = 9 * MiB + 4096 + 17  # a tail off every alignment
    data = bytearray(size)
    for off in (0, 3 * MiB + 4096, 8 * MiB, size - 100):
        data[off:off + 100] = os.urandom(100)
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(data))
    dst.write_bytes(b"\xa5" * size)
    read = run("read", src, size, 0, 1, 64 * 1024)
    assert read.returncode == 0, read.stderr
    # The frames after the greeting (which names the pid) up to the end frame's JSON
    # (which says how much was read with O_DIRECT) are the same either way.
    other = _helper("read", src, size, 0, 1, 64 * 1024).stdout
    assert _frames(read.stdout) == _frames(other)
    write = run("write", dst, size, 0, 0, MiB, 0, 1, stdin=read.stdout)
    assert write.returncode == 0, write.stderr
    assert dst.read_bytes() == bytes(data)
    lines = write.stdout.decode().splitlines()
    assert lines[-2].startswith("SOURCE ")
    assert digest_bytes(bytes(data)) in lines[-2]
    source = json.loads(lines[-2].removeprefix("SOURCE "))
    done = json.loads(lines[-1].removeprefix("DONE "))
    if minimal:  # buffered reads and writes, zero runs read and compared
        assert source["direct_read"] == done["direct"] == done["punched"] == 0
        assert done["zeroed"] > size // 2
    else:  # O_DIRECT where aligned (not the tail), holes punched
        assert source["direct_read"] == size - size % 4096
        assert 0 < done["direct"] < done["written"]
        assert done["punched"] > size // 2
        assert done["zeroed"] == 0
    digest = run("digest", dst, size)
    assert digest.stdout.decode().strip() == digest_bytes(bytes(data))
