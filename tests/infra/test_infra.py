"""The test hosts themselves: the LVM guest boots and snapshots, the namespace sshd takes
key and password logins with host-key pinning, destination devices are writable."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest

from tests.infra import SshHost, known_hosts_line
from tests.infra.fixtures import NsHostFactory
from tests.infra.guest import LvmGuest
from tests.infra.nshost import NsHost


async def _connect(
    host: SshHost,
    *,
    username: str,
    password: str | None = None,
    key: Path | None = None,
    known_hosts: str | None = None,
) -> asyncssh.SSHClientConnection:
    """asyncssh with only the given credentials, strict pinning, no user config or agent."""
    pinned = known_hosts if known_hosts is not None else host.known_hosts_line
    return await asyncssh.connect(
        host.host,
        port=host.port,
        username=username,
        password=password,
        client_keys=[str(key)] if key is not None else None,
        known_hosts=asyncssh.import_known_hosts(pinned + "\n"),
        agent_path=None,
        config=None,
        connect_timeout=60,
        login_timeout=60,
    )


def _other_host_key(host: SshHost) -> str:
    """A known_hosts line for the same host:port pinning a different key."""
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    return known_hosts_line(host.host, host.port, other)


async def _check_logins(host: SshHost, root_command: str, user_command: str) -> None:
    async with await _connect(host, username=host.user, key=host.key_path) as conn:
        result = await conn.run(root_command, check=True, timeout=60)
        assert str(result.stdout).split()[0] == "root"
    async with await _connect(host, username=host.password_user, password=host.password) as conn:
        result = await conn.run(user_command, check=False, timeout=60)
        assert result.exit_status == 0, result.stderr
        assert str(result.stdout).split()[0] == host.password_user
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await _connect(
            host, username=host.user, key=host.key_path, known_hosts=_other_host_key(host)
        )
    with pytest.raises(asyncssh.PermissionDenied):
        await _connect(host, username=host.password_user, password=host.password + "x")


# --- the LVM guest ---


async def test_guest_boots_with_lvm(lvm_guest: LvmGuest) -> None:
    rc, out, err = await lvm_guest.arun(
        "uname -r; lsmod | grep -c '^dm_snapshot'; "
        "lvs --noheadings -o lv_name,lv_size --units m vg0; "
        f"blockdev --getsize64 {lvm_guest.device}; hostname"
    )
    assert rc == 0, err
    lines = out.split("\n")
    assert lines[0].endswith("-cloud-amd64")
    assert int(lines[1]) == 1
    assert lines[2].split() == ["data", "48.00m"]
    assert int(lines[3]) == 128 * 1024 * 1024
    assert lvm_guest.host_key_fingerprint.startswith("SHA256:")
    assert lvm_guest.lv_path == "/dev/vg0/data"
    print("guest timings:", {k: round(v, 1) for k, v in lvm_guest.timings.items()})
    # The destination disk starts zeroed (reset before each test).
    with lvm_guest.dest_image.open("rb") as f:
        assert f.read(1 << 20) == bytes(1 << 20)


def test_guest_snapshot_stream_and_remove(lvm_guest: LvmGuest) -> None:
    """``lvcreate -s`` of vg0/data, stream the snapshot over SSH (as Live Stream does) while
    the origin changes, check what arrived, remove the snapshot cleanly."""
    origin = lvm_guest.read_lv()
    assert hashlib.sha256(origin).hexdigest() == lvm_guest.lv_sha256
    lvm_guest.run(
        "lvcreate -q -s -L 32M -n test_snap vg0/data >/dev/null && "
        "echo changed | dd of=/dev/vg0/data bs=512 seek=100 conv=fsync status=none",
        check=True,
    )
    size = 16 << 20
    started = time.monotonic()
    stream = subprocess.run(
        lvm_guest.ssh_argv(f"dd if=/dev/vg0/test_snap bs=1M count={size >> 20} status=none"),
        capture_output=True,
        timeout=120,
        check=True,
    )
    seconds = time.monotonic() - started
    print(f"streamed {size >> 20} MiB in {seconds:.1f} s")
    # The snapshot kept the content from before the write to the origin.
    assert stream.stdout == origin[:size]
    out = lvm_guest.check_output(
        "lvremove -q -f vg0/test_snap >/dev/null && lvs --noheadings -o lv_name vg0; dmsetup ls"
    )
    assert out.split()[:1] == ["data"]
    for leftover in ("snap", "-real", "-cow"):
        assert leftover not in out
    assert lvm_guest.read_lv()[100 * 512 : 100 * 512 + 8] == b"changed\n"
    # Next test's reset writes the saved PV head back (no rebuild needed).
    assert lvm_guest.reset_lv() == "restored"
    assert lvm_guest.read_lv() == origin


def test_guest_destination_disk_writable(lvm_guest: LvmGuest) -> None:
    data = os.urandom(1 << 20)
    rc, _, err = lvm_guest.run(
        f"dd of={lvm_guest.device} bs=1M count=1 iflag=fullblock oflag=direct status=none",
        input=data,
    )
    assert rc == 0, err
    with lvm_guest.dest_image.open("rb") as f:
        assert f.read(len(data)) == data
    assert lvm_guest.reset_lv() == "restored"
    assert lvm_guest.check_output(f"head -c 1M {lvm_guest.device} | tr -d '\\0' | wc -c") == "0\n"


async def test_guest_key_password_sudo_and_pinning(lvm_guest: LvmGuest) -> None:
    await _check_logins(lvm_guest, "id -un", "id -un; sudo -n lvs --noheadings -o lv_name vg0")


# --- namespace and loopback sshd ---


async def test_ns_host_logins_and_pinning(ns_host: NsHost) -> None:
    assert ipaddress.IPv4Address(ns_host.host) in ipaddress.IPv4Network("10.231.0.0/16")
    assert ns_host.port == 22
    assert ns_host.known_hosts_line.startswith(f"{ns_host.host} ssh-ed25519 ")
    await _check_logins(ns_host, "id -un", "id -un")


def test_ns_host_loop_device_writable(ns_host: NsHost) -> None:
    assert ns_host.device.startswith("/dev/loop")
    data = os.urandom(4 << 20)
    rc, out, err = ns_host.run(
        f"dd of={ns_host.device} bs=1M iflag=fullblock conv=fsync status=none && "
        f"head -c {len(data)} {ns_host.device} | sha256sum",
        input=data,
    )
    assert rc == 0, err
    assert out.split()[0] == hashlib.sha256(data).hexdigest()
    with ns_host.backing_file.open("rb") as f:
        assert f.read(len(data)) == data
    # The namespace has only its own veth and loopback.
    assert ns_host.netns is not None
    links = subprocess.run(
        ns_host.ns_argv(["ip", "-br", "-4", "addr"]), capture_output=True, text=True, check=True
    ).stdout
    assert f"{ns_host.host}/30" in links


async def test_loopback_sshd(loopback_sshd: NsHost) -> None:
    assert loopback_sshd.host == "127.0.0.1"
    assert loopback_sshd.netns is None
    await _check_logins(loopback_sshd, "id -un", "id -un")
    assert loopback_sshd.run("test -b " + loopback_sshd.device)[0] == 0


def test_ns_hosts_stream_and_teardown(ns_host_factory: NsHostFactory) -> None:
    """Two namespace hosts: copy a device from one to the other through this machine;
    stopping a host removes its namespace, loop device and sshd."""
    src, dst = ns_host_factory(device_mib=64), ns_host_factory(device="file", device_mib=64)
    assert src.host != dst.host
    src.run(f"head -c 16M /dev/urandom > {src.device}", check=True)
    reader = subprocess.Popen(
        src.ssh_argv(f"dd if={src.device} bs=1M count=16 status=none"), stdout=subprocess.PIPE
    )
    try:
        writer = subprocess.run(
            dst.ssh_argv(f"dd of={dst.device} bs=1M iflag=fullblock conv=notrunc status=none"),
            stdin=reader.stdout,
            capture_output=True,
            timeout=60,
            check=False,
        )
    finally:
        assert reader.stdout is not None
        reader.stdout.close()
        reader.wait(timeout=60)
    assert writer.returncode == 0, writer.stderr
    digests = [h.check_output(f"head -c 16M {h.device} | sha256sum").split()[0] for h in (src, dst)]
    assert digests[0] == digests[1]

    netns, loop, sshd = src.netns, src.loop_device, src.sshd
    assert netns is not None
    assert loop is not None
    assert sshd is not None
    src.stop()
    assert sshd.poll() is not None
    assert (
        netns
        not in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert (
        loop
        not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    )
