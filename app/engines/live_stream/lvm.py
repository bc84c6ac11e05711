"""What the live stream asks of the hosts: LVM volumes and snapshots, block devices.

Every command is a fixed script with quoted values (:func:`quote_argv`) run as root
through :class:`~app.transports.ssh.SshSession`; output is parsed with ``LC_ALL=C``.
Failures that no retry can fix (no such volume, not enough space, a mounted device)
raise :class:`HostCheckFailed`, which is permanent and says what to change.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from app.errors import AppError
from app.transports.ssh import RemoteCommandError, SshSession, quote_argv

#: Tag on every snapshot the service creates (``lvs @vmigrate-live-stream`` finds them).
SNAPSHOT_TAG = "vmigrate-live-stream"


class HostCheckFailed(AppError):
    """A host is not in a state the live stream can work with (permanent)."""

    status = 422
    code = "host-check-failed"
    title = "Host check failed"


class SnapshotOverflow(AppError):
    """The snapshot's copy-on-write space filled up: LVM invalidated it, so what was
    read from it can no longer be trusted."""

    status = 409
    code = "snapshot-overflow"
    title = "Snapshot overflowed"


def snapshot_name(migration_id: str) -> str:
    """The snapshot's LV name, derived from the migration so a resumed or later run (or
    a person) finds it: ``vmls-<first 12 hex digits of the id>``."""
    return "vmls-" + migration_id.replace("-", "")[:12]


@dataclass(frozen=True, slots=True)
class LvInfo:
    vg: str
    lv: str
    size: int
    attr: str
    vg_free: int
    extent_size: int
    majmin: str

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def active(self) -> bool:
        return self.attr[4:5] == "a"


_LVS_FIELDS = "vg_name,lv_name,lv_size,lv_attr,vg_free,vg_extent_size,lv_kernel_major,"\
              "lv_kernel_minor"


async def lv_info(session: SshSession, device: str) -> LvInfo:
    """The logical volume at ``device``; :class:`HostCheckFailed` when there is none."""
    result = await session.run(
        quote_argv("lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
                   "-o", _LVS_FIELDS, device),
        what="lvs", check=False)
    fields = [f.strip() for f in result.stdout.strip().split("|")]
    if result.exit_status != 0 or len(fields) != 8:
        reason = result.stderr.strip().splitlines()[-1:] or ["not a logical volume"]
        raise HostCheckFailed(f"logical volume {device} not found on {session.label}: "
                              f"{reason[0].strip()}")
    vg, lv, size, attr, free, extent, major, minor = fields
    return LvInfo(vg=vg, lv=lv, size=int(size), attr=attr, vg_free=int(free),
                  extent_size=int(extent), majmin=f"{major}:{minor}")


@dataclass(frozen=True, slots=True)
class SnapshotStatus:
    name: str
    attr: str
    percent: float | None
    size: int
    uuid: str

    @property
    def invalid(self) -> bool:
        """LVM marks an overflowed snapshot invalid ('I' in the fifth attr character);
        100 % use means the same."""
        return self.attr[4:5] == "I" or (self.percent is not None and self.percent >= 100.0)


async def snapshot_status(session: SshSession, vg: str, name: str) -> SnapshotStatus | None:
    """The snapshot ``vg/name``, or None when it does not exist."""
    result = await session.run(
        quote_argv("lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
                   "-o", "lv_attr,snap_percent,lv_size,lv_uuid", f"{vg}/{name}"),
        what="lvs", check=False)
    fields = [f.strip() for f in result.stdout.strip().split("|")]
    if result.exit_status != 0 or len(fields) != 4:
        return None
    attr, percent, size, uuid = fields
    try:
        used: float | None = float(percent) if percent else None
    except ValueError:
        used = None
    return SnapshotStatus(name=name, attr=attr, percent=used, size=int(size), uuid=uuid)


def overflow_error(status: SnapshotStatus, vg: str) -> SnapshotOverflow:
    return SnapshotOverflow(
        f"snapshot {vg}/{status.name} overflowed: its copy-on-write space "
        f"({status.size} bytes) filled up while the volume was being copied, so LVM "
        "invalidated it; run again with a larger options.snapshot_size_bytes or when the "
        "volume is written less")


async def check_snapshot(session: SshSession, vg: str, name: str) -> SnapshotStatus:
    """The snapshot's status; :class:`SnapshotOverflow` when it is invalid and
    :class:`HostCheckFailed` when it is gone."""
    status = await snapshot_status(session, vg, name)
    if status is None:
        raise HostCheckFailed(f"snapshot {vg}/{name} disappeared from {session.label}")
    if status.invalid:
        raise overflow_error(status, vg)
    return status


def _freeze_wrapped(script: str, mountpoint: str, seconds: int) -> str:
    """``script`` run with the filesystem at ``mountpoint`` frozen, for at most
    ``seconds``: a detached watchdog thaws it even if this shell is killed, and the EXIT
    trap thaws it as soon as the script is done."""
    mnt = quote_argv(mountpoint)
    return (
        f"(sleep {seconds}; fsfreeze -u {mnt}) >/dev/null 2>&1 </dev/null & "
        f"fsfreeze -f {mnt} || exit 90\n"
        f"trap 'fsfreeze -u {mnt} 2>/dev/null' EXIT HUP INT TERM\n{script}"
    )


async def create_snapshot(session: SshSession, lv: LvInfo, name: str, size: int, *,
                          freeze: str | None = None, freeze_seconds: int = 5) -> None:
    """``lvcreate --snapshot`` of ``lv`` named ``name`` with ``size`` bytes of COW space.

    With ``freeze`` (a mount point), the filesystem is frozen around the lvcreate and
    LVM's metadata backup is skipped meanwhile (it may live on the frozen filesystem);
    a ``vgcfgbackup`` follows the thaw.
    """
    create = quote_argv("lvcreate", "--yes", "--snapshot", "--name", name, "--size",
                        f"{size}b", "--addtag", SNAPSHOT_TAG, f"{lv.vg}/{lv.lv}")
    if freeze is None:
        await session.run(create, what="lvcreate --snapshot", seconds=300)
        return
    frozen = create.replace("lvcreate ", "lvcreate --config 'backup{backup=0 archive=0}' ",
                            1)
    result = await session.run(_freeze_wrapped(frozen, freeze, freeze_seconds),
                               what="fsfreeze + lvcreate --snapshot", check=False, seconds=300)
    if result.exit_status == 90:
        raise HostCheckFailed(f"fsfreeze of {freeze} on {session.label} failed: "
                              f"{result.stderr.strip()[-300:]}")
    if result.exit_status != 0:
        raise RemoteCommandError(session.label, "lvcreate --snapshot", result.exit_status,
                                 result.stderr)
    await session.run(quote_argv("vgcfgbackup", lv.vg), what="vgcfgbackup", check=False)


async def remove_snapshot(session: SshSession, vg: str, name: str, *,
                          attempts: int = 15, pause: float = 1.0) -> bool:
    """Remove ``vg/name`` if it exists (True if it did). A helper that is still exiting
    may hold the device open for a moment: "in use" is retried a bounded number of
    times."""
    for attempt in range(1, attempts + 1):
        if await snapshot_status(session, vg, name) is None:
            return attempt > 1
        result = await session.run(quote_argv("lvremove", "--yes", "--force", f"{vg}/{name}"),
                                   what="lvremove", check=False, seconds=300)
        if result.exit_status == 0:
            return True
        if "in use" not in result.stderr or attempt == attempts:
            raise RemoteCommandError(session.label, f"lvremove {vg}/{name}",
                                     result.exit_status, result.stderr)
        await asyncio.sleep(pause)
    return False


@dataclass(frozen=True, slots=True)
class Mount:
    majmin: str
    source: str
    mountpoint: str
    read_write: bool


@dataclass(slots=True)
class DeviceInfo:
    """A block device, everything stacked on it (partitions, LVs) and their mounts."""

    path: str
    exists: bool = False
    is_block: bool = False
    size: int = 0
    #: MAJ:MIN -> name of the device and every device on top of it.
    tree: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    swap: list[str] = field(default_factory=list)

    @property
    def rw_mounts(self) -> list[Mount]:
        return [m for m in self.mounts if m.read_write]


_PROBE = r"""
dev=$1
[ -e "$dev" ] || { echo MISSING; exit 0; }
[ -b "$dev" ] || { echo NOTBLOCK; exit 0; }
echo "SIZE $(blockdev --getsize64 "$dev")"
lsblk -nrpo MAJ:MIN,NAME,MOUNTPOINT "$dev" | sed 's/^/TREE /'
awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { print "MOUNT", $3, $(i+2), $5, $6; break } }' \
  /proc/self/mountinfo
"""


async def device_info(session: SshSession, device: str) -> DeviceInfo:
    """Probe ``device``: existence, type, size, and mounts/swap of it or anything on it."""
    result = await session.run(f"set -- {quote_argv(device)}\n{_PROBE}", what="device probe")
    info = DeviceInfo(path=device)
    mounts: list[Mount] = []
    for line in result.stdout.splitlines():
        word, _, rest = line.partition(" ")
        parts = rest.split()
        if word == "SIZE":
            info.exists = info.is_block = True
            info.size = int(rest)
        elif word == "NOTBLOCK":
            info.exists = True
        elif word == "TREE" and len(parts) >= 2:
            info.tree[parts[0]] = parts[1]
            if len(parts) >= 3 and parts[2] == "[SWAP]":
                info.swap.append(parts[1])
        elif word == "MOUNT" and len(parts) == 4:
            opts = parts[3].split(",")
            mounts.append(Mount(parts[0], parts[1], parts[2], "rw" in opts))
    names = set(info.tree.values())
    info.mounts = [m for m in mounts if m.majmin in info.tree or m.source in names]
    return info


async def python_version(session: SshSession) -> str | None:
    """``"3.11"`` when python3 (3.6 or newer, the helper's minimum) runs, else None."""
    result = await session.run(
        "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])' 2>/dev/null",
        what="python3 probe", check=False)
    match = re.fullmatch(r"(\d+)\.(\d+)", result.stdout.strip())
    if result.exit_status != 0 or match is None:
        return None
    if (int(match.group(1)), int(match.group(2))) < (3, 6):
        return None
    return match.group(0)


async def boot_id(session: SshSession) -> str:
    """The kernel's boot id: equal on two sessions only when they reach one machine."""
    result = await session.run("cat /proc/sys/kernel/random/boot_id", what="boot id",
                               check=False)
    return result.stdout.strip()


def check_source_lv(lv: LvInfo, device: str, where: str) -> None:
    """A thick, active, ordinary LV: a snapshot of a snapshot, or of a thin volume (which
    needs no VG space but an activation of its own), is not what the steps handle."""
    if lv.is_snapshot:
        raise HostCheckFailed(f"{device} on {where} is itself a snapshot")
    if lv.is_thin:
        raise HostCheckFailed(f"{device} on {where} is a thin volume; thin volumes "
                              "are not supported yet")
    if not lv.active:
        raise HostCheckFailed(f"{device} on {where} is not active")


def check_destination(info: DeviceInfo, size: int, overwrite_mounted: bool,
                       where: str) -> None:
    """Exists, is a block device, holds ``size`` bytes, and nothing on it is mounted
    read-write or used as swap (unless ``overwrite_mounted``): overwriting a mounted
    filesystem corrupts it under its users, so that must be asked for explicitly. Read-
    only mounts are allowed (the destination's rescue system may have one)."""
    if not info.exists:
        raise HostCheckFailed(f"destination device {info.path} does not exist on {where}")
    if not info.is_block:
        raise HostCheckFailed(f"destination {info.path} on {where} is not a block device")
    if info.size < size:
        raise HostCheckFailed(f"destination device {info.path} on {where} holds "
                              f"{info.size} bytes, less than the source's {size}")
    if overwrite_mounted:
        return
    busy = [f"{m.source} on {m.mountpoint}" for m in info.rw_mounts]
    busy += [f"{s} (swap)" for s in info.swap]
    if busy:
        raise HostCheckFailed(
            f"destination device {info.path} on {where} is in use read-write: "
            f"{', '.join(busy)}; set destination.overwrite_mounted to overwrite it anyway")
