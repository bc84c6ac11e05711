"""The LVM source host: a small Debian 12 VM under qemu-system-x86_64 (TCG).

The host kernel has no device-mapper, so LVM runs inside a guest booting the stock
``linux-image-cloud-amd64`` kernel with ``-kernel/-initrd`` and a root filesystem built by
``guest-build.sh`` (debootstrap + ``mkfs.ext4 -d``), cached under
``/var/cache/vmigrate-tests/guest-<hash of guest-build.sh and guest-init.sh>/``. The root
image is attached with ``snapshot=on``: a session never changes the cache.

Disks (virtio, identified inside the guest by serial): vda root, vdb the LVM PV (sparse
file, 256 MiB), vdc the destination device (128 MiB), vdd the seed (a raw tar archive
with this session's host key, authorized key and test-user password). SSH is forwarded
from 127.0.0.1:<free port> by QEMU user networking; the guest is 10.0.2.15/24.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.infra import (
    InfraUnavailableError,
    SshHost,
    SshKeyPair,
    die_with_parent,
    free_tcp_port,
    generate_keypair,
    missing_tools,
    stop_process,
)

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "guest-build.sh"
INIT_SCRIPT = HERE / "guest-init.sh"
QEMU = "qemu-system-x86_64"
BUILD_TOOLS = ("debootstrap", "mkfs.ext4", "chroot")
BOOT_TOOLS = (QEMU, "ssh", "ssh-keygen")

VG = "vg0"
LV = "data"
LV_PATH = f"/dev/{VG}/{LV}"
LV_SIZE_MIB = 48
TEST_USER = "tester"
READY_MARK = "VMIGRATE-READY"
FAILED_MARK = "VMIGRATE-FAILED"


def cache_root() -> Path:
    """Where built images live (``$VMIGRATE_TEST_CACHE`` overrides)."""
    return Path(os.environ.get("VMIGRATE_TEST_CACHE", "/var/cache/vmigrate-tests"))


def image_key() -> str:
    """Cache key: a hash of the build script and the init script baked into the image."""
    h = hashlib.sha256()
    for path in (BUILD_SCRIPT, INIT_SCRIPT):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GuestImage:
    directory: Path

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.rootfs, self.kernel, self.initrd))

    def manifest(self) -> dict[str, str]:
        path = self.directory / "manifest"
        if not path.is_file():
            return {}
        pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        return {k: v for k, v in pairs}


def cached_image() -> GuestImage | None:
    """The image for the current scripts if it is already built, else None."""
    image = GuestImage(cache_root() / f"guest-{image_key()}")
    return image if image.complete() else None


def check_boot_prerequisites() -> None:
    if os.geteuid() != 0:
        raise InfraUnavailableError("the LVM test guest needs root")
    missing = missing_tools(*BOOT_TOOLS)
    if missing:
        raise InfraUnavailableError(f"missing tools for the LVM test guest: {missing}")


def check_prerequisites() -> None:
    """Raise :class:`InfraUnavailableError` unless the guest can boot here (and its image
    can be built, unless already cached)."""
    check_boot_prerequisites()
    if cached_image() is None:
        missing = missing_tools(*BUILD_TOOLS)
        if missing:
            raise InfraUnavailableError(f"missing tools to build the LVM test guest: {missing}")


@contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on ``path``, waited for at most ``timeout`` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {path} still held after {timeout:.0f} s") from e
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_image(timeout: float = 900.0) -> GuestImage:
    """The cached guest image, built first (once, ~1 min) if missing.

    Concurrent sessions serialise on a lock file; images built from older scripts and
    leftovers of interrupted builds are removed while holding it.
    """
    check_boot_prerequisites()
    root = cache_root()
    key = image_key()
    image = GuestImage(root / f"guest-{key}")
    if image.complete():
        return image
    missing = missing_tools(*BUILD_TOOLS)
    if missing:
        raise InfraUnavailableError(f"missing tools to build the LVM test guest: {missing}")
    with _locked(root / "guest.lock", timeout):
        if image.complete():
            return image
        for stale in root.glob("guest-*"):
            if stale.name.startswith(image.directory.name):
                continue
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.suffix == ".log":
                stale.unlink(missing_ok=True)
        log = root / f"guest-{key}.log"
        started = time.monotonic()
        with log.open("wb") as out:
            try:
                proc = subprocess.run(
                    ["bash", str(BUILD_SCRIPT), str(image.directory), str(INIT_SCRIPT)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired as e:
                raise RuntimeError(
                    f"guest image build timed out after {timeout:.0f} s; log {log}:\n"
                    + _tail(log, 40)
                ) from e
        if proc.returncode != 0 or not image.complete():
            raise RuntimeError(
                f"guest image build failed ({proc.returncode}); log {log}:\n" + _tail(log, 40)
            )
        image.directory.joinpath("build-wall-seconds").write_text(
            f"{time.monotonic() - started:.1f}\n"
        )
    return image


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _seed_archive(host_key: SshKeyPair, authorized_key: str, password: str) -> bytes:
    """The seed disk's content: a tar archive the guest's init unpacks (owner root)."""
    files = {
        "ssh_host_ed25519_key": (host_key.private_path.read_bytes(), 0o600),
        "ssh_host_ed25519_key.pub": ((host_key.public_key + "\n").encode(), 0o644),
        "authorized_keys": ((authorized_key + "\n").encode(), 0o600),
        "password": (password.encode(), 0o600),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw + b"\0" * (-len(raw) % 4096)


@dataclass(kw_only=True)
class LvmGuest(SshHost):
    """The running guest. ``device`` is the destination disk (``/dev/vdc``)."""

    vg: str = VG
    lv_path: str = LV_PATH
    lv_size_mib: int = LV_SIZE_MIB
    pv_device: str = "/dev/vdb"
    guest_address: str = "10.0.2.15"
    console_log: Path = Path("/dev/null")
    workdir: Path = Path("/nonexistent")
    boot_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # "build", "boot", "lvm_setup"
    lv_sha256: str = ""  # sha256 of the whole LV after the last reset_lv() (hex)
    qemu: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _clean_state: dict[str, str] = field(default_factory=dict, repr=False)

    def console_tail(self, lines: int = 40) -> str:
        return _tail(self.console_log, lines)

    def alive(self) -> bool:
        return self.qemu is not None and self.qemu.poll() is None

    def stop(self) -> None:
        """Stop the QEMU process this session started (by its PID) and drop the disks."""
        self.stop_master()
        if self.qemu is not None:
            stop_process(self.qemu, grace=10)
        for name in ("pv.img", "dest.img", "seed.img", "golden-pv-head.img"):
            (self.workdir / name).unlink(missing_ok=True)

    def setup_vg(self) -> None:
        """Create the PV and ``vg0`` on the PV disk (first boot of a session)."""
        self.run(
            f"set -e; pvcreate -q -ff -y {self.pv_device} >/dev/null; "
            f"vgcreate -q {self.vg} {self.pv_device} >/dev/null",
            check=True,
        )

    def _probe_script(self) -> str:
        """Shell that kills what still holds a vg0 device or the destination (an abandoned
        stream; udev workers excepted), syncs, and prints what a test could have changed:
        every device-mapper table and vg0 mount ("T"/"M" lines) and the write counters of
        the PV and destination disks (PVW, DESTW). Reads, and snapshot create+remove,
        change none of it. Bash builtins where possible: each exec costs ~0.1 s under TCG."""
        pv = self.pv_device.removeprefix("/dev/")
        dest = self.device.removeprefix("/dev/")
        return f"""
for f in $(find /proc/[0-9]*/fd -maxdepth 1 \\( -lname '/dev/dm-*' -o -lname '{self.device}' \\) \\
    2>/dev/null); do
  p=${{f#/proc/}}; p=${{p%%/*}}
  [ "$p" = $$ ] && continue
  read -r comm </proc/$p/comm 2>/dev/null || continue
  case "$comm" in *udev*) continue ;; esac
  kill -9 "$p" 2>/dev/null || true
done
sync
tables=$(dmsetup table 2>/dev/null)
while IFS= read -r line; do echo "T $line"; done <<<"$tables"
while read -r dev mnt _; do
  case "$dev" in /dev/mapper/{self.vg}-*) echo "M $dev $mnt" ;; esac
done </proc/mounts
read -r _ _ _ _ ios _ sectors _ </sys/block/{pv}/stat
echo "PVW $ios $sectors"
read -r _ _ _ _ ios _ sectors _ </sys/block/{dest}/stat
echo "DESTW $ios $sectors"
"""

    def _probe(self, prefix: str = "") -> dict[str, str]:
        out = self.run(prefix + self._probe_script(), check=True, timeout=120)[1]
        state: dict[str, str] = {}
        tables = hashlib.sha256()
        for line in out.splitlines():
            key, _, value = line.partition(" ")
            if key in ("T", "M"):
                tables.update(line.encode() + b"\n")
            elif key in ("PVW", "DESTW", "LVTABLE"):
                state[key] = value.strip()
        state["TABLES"] = tables.hexdigest()
        if "PVW" not in state or "DESTW" not in state:
            raise RuntimeError(f"{self.name}: unexpected probe output: {out[-2000:]!r}")
        return state

    def reset_lv(self, *, force: bool = False) -> str:
        """Back to a known state: ``vg0/data`` only (ext4 with ``hello.txt``,
        ``dir/random.bin`` (4 MiB), ``dir/numbers.txt``, ``SHA256SUMS``), free VG space for
        snapshots, destination disk zeroed, :attr:`lv_sha256` its digest.

        Returns what it did. "clean": nothing changed since the last reset (one quick SSH
        command). "restored": only data changed (LV or PV content, LVM metadata with the
        same active LVs, destination disk): the saved PV head and a zeroed destination are
        written back on this side into the disk images, and the guest drops its block
        caches. "rebuilt": LVs were added, removed, left active or mounted: ``vg0/data`` is
        recreated from scratch. Guest processes still holding a vg0 device or the
        destination are killed first.
        """
        golden = self.workdir / "golden-pv-head.img"
        state = self._probe()
        if not force and self._clean_state and golden.exists():
            if state == self._clean_state:
                return "clean"
            if state["TABLES"] == self._clean_state["TABLES"]:
                if state["PVW"] != self._clean_state["PVW"]:
                    _copy_into(golden, self.pv_image)
                if state["DESTW"] != self._clean_state["DESTW"]:
                    _zero_file(self.dest_image)
                devices = f"{self.pv_device} {self.lv_path} {self.device}"
                self._clean_state = self._probe(f"blockdev --flushbufs {devices}\n")
                return "restored"
        self._rebuild(golden)
        return "rebuilt"

    def _rebuild(self, golden: Path) -> None:
        script = f"""
set -e
for m in $(awk '$1 ~ "^/dev/mapper/{self.vg}-" {{print $2}}' /proc/mounts); do
  umount -l "$m"
done
if lvs --noheadings -o lv_name {self.vg} 2>/dev/null | grep -q .; then
  lvremove -q -f -y {self.vg} >/dev/null
fi
lvcreate -q -y -W y -Z y -L {self.lv_size_mib}M -n {LV} {self.vg} >/dev/null
mkfs.ext4 -q -F -L data -E lazy_itable_init=0,lazy_journal_init=0 {self.lv_path}
mkdir -p /mnt/data
mount {self.lv_path} /mnt/data
echo "hello from vmigrate test guest" > /mnt/data/hello.txt
mkdir -p /mnt/data/dir
head -c 4M /dev/urandom > /mnt/data/dir/random.bin
seq 1 100000 > /mnt/data/dir/numbers.txt
(cd /mnt/data && sha256sum hello.txt dir/random.bin dir/numbers.txt > SHA256SUMS)
umount /mnt/data
blkdiscard -z {self.device} 2>/dev/null || dd if=/dev/zero of={self.device} bs=1M status=none
udevadm settle --timeout=30 || true
echo "LVTABLE $(dmsetup table {self.vg}-{LV})"
"""
        self._clean_state = {}
        state = self._probe(script)
        # The guest synced, so the PV's bytes are in pv.img on this side: keep its head
        # (LVM metadata + the LV) for restores, and hash the LV here (native speed)
        # instead of in the guest (seconds under TCG).
        start, length = _linear_extent(state.pop("LVTABLE"), self.lv_path)
        with self.pv_image.open("rb") as f:
            head = f.read(start + length)
        if len(head) != start + length:
            raise RuntimeError(f"short read from {self.pv_image}")
        golden.write_bytes(head)
        self.lv_sha256 = hashlib.sha256(memoryview(head)[start:]).hexdigest()
        self._clean_state = state

    def mark_dirty(self) -> None:
        """Make the next :meth:`reset_lv` rebuild even if nothing visible changed."""
        self._clean_state = {}

    @property
    def pv_image(self) -> Path:
        """The host file behind the PV disk (``pv_device`` in the guest)."""
        return self.workdir / "pv.img"

    @property
    def dest_image(self) -> Path:
        """The host file behind the destination disk (``device`` in the guest): what a
        test wrote there (with O_DIRECT, fsync or after ``sync``) can be checked here."""
        return self.workdir / "dest.img"

    def read_lv(self) -> bytes:
        """The current bytes of ``vg0/data``, read from :attr:`pv_image` on this side.

        Valid for data the guest has flushed (``sync``, O_DIRECT) while the LV is linear
        (no snapshot of it active).
        """
        table = self.check_output(f"sync; dmsetup table {self.vg}-{LV}")
        start, length = _linear_extent(table, self.lv_path)
        with self.pv_image.open("rb") as f:
            f.seek(start)
            data = f.read(length)
        if len(data) != length:
            raise RuntimeError(f"short read of the LV from {self.pv_image}")
        return data


def _linear_extent(table: str, what: str) -> tuple[int, int]:
    """(byte offset on the PV, length) from a one-segment ``linear`` dm table line."""
    parts = table.split()
    # "<start> <sectors> linear <major:minor> <offset>"
    if len(parts) != 5 or parts[2] != "linear" or parts[0] != "0":
        raise RuntimeError(f"{what} is not a single linear segment: {table!r}")
    return int(parts[4]) * 512, int(parts[1]) * 512


def _copy_into(source: Path, target: Path) -> None:
    """Write ``source`` over the start of ``target`` (in place, same inode)."""
    with source.open("rb") as src, target.open("r+b") as dst:
        while chunk := src.read(4 << 20):
            dst.write(chunk)
        dst.flush()


def _zero_file(path: Path) -> None:
    """Make every byte of ``path`` read as zero, keeping its size (punch a hole)."""
    size = path.stat().st_size
    proc = subprocess.run(
        ["fallocate", "--punch-hole", "--offset", "0", "--length", str(size), str(path)],
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:  # no hole punching here: write zeros
        with path.open("r+b") as f:
            for _ in range(0, size, 4 << 20):
                f.write(bytes(min(4 << 20, size - f.tell())))


def _qemu_argv(image: GuestImage, workdir: Path, port: int, memory_mib: int, smp: int) -> list[str]:
    def disk(name: str, file: Path, extra: str = "") -> list[str]:
        return [
            "-drive", f"file={file},format=raw,if=none,id={name},cache=unsafe{extra}",
            "-device", f"virtio-blk-pci,drive={name},serial=vmigrate-{name}",
        ]  # fmt: skip

    cmdline = "console=ttyS0 net.ifnames=0 panic=-1 loglevel=4 printk.time=1 cryptomgr.notests"
    return [
        QEMU,
        "-name", "vmigrate-test-guest",
        "-accel", "tcg,thread=multi",
        "-m", str(memory_mib),
        "-smp", str(smp),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{workdir / 'console.log'}",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", cmdline,
        *disk("root", image.rootfs, ",snapshot=on"),
        *disk("pv", workdir / "pv.img", ",discard=unmap,detect-zeroes=unmap"),
        *disk("dest", workdir / "dest.img", ",discard=unmap,detect-zeroes=unmap"),
        *disk("seed", workdir / "seed.img", ",readonly=on"),
        "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip


def boot_guest(
    image: GuestImage,
    client_key: SshKeyPair,
    workdir: Path,
    *,
    memory_mib: int = 512,
    smp: int = 2,
    pv_mib: int = 256,
    dest_mib: int = 128,
    boot_timeout: float = 180.0,
) -> LvmGuest:
    """Boot the guest and wait (bounded) until root can log in by SSH.

    The caller must call :meth:`LvmGuest.stop` (see :func:`running_guest`). On failure
    QEMU is stopped and the error shows the tail of the serial console log.
    """
    check_boot_prerequisites()
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = generate_keypair(workdir / "ssh_host_ed25519_key", "vmigrate-guest")
    password = secrets.token_urlsafe(12)
    (workdir / "seed.img").write_bytes(_seed_archive(host_key, client_key.public_key, password))
    for name, mib in (("pv.img", pv_mib), ("dest.img", dest_mib)):
        with (workdir / name).open("wb") as f:
            f.truncate(mib * 1024 * 1024)

    console = workdir / "console.log"
    started = time.monotonic()
    last_error = ""
    for _attempt in range(3):  # a lost race for the forwarded port: retry on a new one
        port = free_tcp_port()
        console.write_bytes(b"")
        qemu_log = (workdir / "qemu.log").open("wb")
        proc = subprocess.Popen(
            _qemu_argv(image, workdir, port, memory_mib, smp),
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        qemu_log.close()
        guest = LvmGuest(
            name="lvm-guest",
            host="127.0.0.1",
            port=port,
            key_path=client_key.private_path,
            password_user=TEST_USER,
            password=password,
            host_public_key=host_key.public_key,
            known_hosts_path=workdir / "known_hosts",
            device="/dev/vdc",
            console_log=console,
            workdir=workdir,
            qemu=proc,
        )
        guest.write_known_hosts()
        try:
            _wait_ready(guest, started + boot_timeout, boot_timeout)
        except _QemuExitedEarlyError as e:
            last_error = str(e)
            stop_process(proc)
            if "hostfwd" in last_error or "host forwarding" in last_error:
                continue
            raise RuntimeError(last_error) from None
        except BaseException:
            stop_process(proc)
            raise
        guest.boot_seconds = guest.timings["boot"] = time.monotonic() - started
        try:
            guest.start_master()
            _map_devices(guest)
        except BaseException:
            guest.stop()
            raise
        return guest
    raise RuntimeError(f"QEMU did not start: {last_error}")


class _QemuExitedEarlyError(RuntimeError):
    pass


def _wait_ready(guest: LvmGuest, deadline: float, timeout: float) -> None:
    """Wait for the init's READY mark on the console, then for a working SSH login."""
    assert guest.qemu is not None
    proc = guest.qemu

    def failure(what: str) -> str:
        qemu_out = _tail(guest.workdir / "qemu.log", 10)
        return (
            f"LVM test guest {what}\n--- qemu output ---\n{qemu_out}\n"
            f"--- serial console ({guest.console_log}), last lines ---\n{guest.console_tail()}"
        )

    while True:
        if proc.poll() is not None:
            raise _QemuExitedEarlyError(failure(f"QEMU exited with {proc.returncode}"))
        text = guest.console_log.read_bytes().decode("utf-8", errors="replace")
        if FAILED_MARK in text:
            raise RuntimeError(failure("init failed"))
        if READY_MARK in text:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(failure(f"did not finish booting within {timeout:.0f} s"))
        time.sleep(0.25)
    last = ""
    while time.monotonic() < deadline:
        try:
            left = max(1.0, min(30.0, deadline - time.monotonic()))
            rc, _out, err = guest.run("true", timeout=left)
        except subprocess.TimeoutExpired:
            rc, err = -1, "timeout"
        if rc == 0:
            return
        last = err.strip()
        if proc.poll() is not None:
            raise RuntimeError(failure(f"QEMU exited with {proc.returncode}"))
        time.sleep(0.25)
    raise RuntimeError(failure(f"booted but SSH login failed: {last}"))


def _map_devices(guest: LvmGuest) -> None:
    """Find the PV and destination disks by serial (vdb/vdc in practice)."""
    out = guest.check_output('for d in /sys/block/vd*; do echo "${d##*/} $(cat $d/serial)"; done')
    by_serial: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            by_serial[parts[1]] = parts[0]
    try:
        guest.pv_device = "/dev/" + by_serial["vmigrate-pv"]
        guest.device = "/dev/" + by_serial["vmigrate-dest"]
    except KeyError as e:
        raise RuntimeError(f"guest disks not found by serial: {out!r}") from e


@contextmanager
def running_guest(
    client_key: SshKeyPair,
    workdir: Path,
    *,
    build_timeout: float = 900.0,
    boot_timeout: float = 180.0,
    memory_mib: int = 512,
) -> Iterator[LvmGuest]:
    """Build (cached) and boot the guest, set up ``vg0`` and ``vg0/data``; always stops it."""
    started = time.monotonic()
    image = ensure_image(build_timeout)
    build_seconds = time.monotonic() - started
    guest = boot_guest(image, client_key, workdir, boot_timeout=boot_timeout, memory_mib=memory_mib)
    guest.timings["build"] = build_seconds
    try:
        started = time.monotonic()
        guest.setup_vg()
        guest.reset_lv()
        guest.timings["lvm_setup"] = time.monotonic() - started
        yield guest
    finally:
        guest.stop()
