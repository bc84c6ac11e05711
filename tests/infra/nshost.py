"""SSH hosts on this machine: a real OpenSSH ``sshd`` in a network namespace of its own
(reached over a veth pair with private /30 addresses this module creates), or on loopback,
with a loop device (or a plain file) as the destination disk.

The sshd runs with its own config, host key and ``UsePAM no``; ``root`` logs in by key and
a password user (``tester``) by password or key. That user exists only for the sshd: the
sshd runs in a private mount namespace where copies of /etc/passwd, /etc/shadow and
/etc/group with the extra entry are bind-mounted, so the machine's accounts are untouched.

Everything is torn down by :meth:`NsHost.stop`: the sshd (by PID) and its sessions, the
loop device, the namespace (which takes the veth pair with it) and the work directory.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
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
    run_local,
    stop_process,
    wait_for_ssh_banner,
)

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
TEST_USER = "tester"
NETNS_PREFIX = "vmigt"
WORKDIR_PREFIX = "vmigrate-nshost"
SUBNET_POOL = ipaddress.IPv4Network("10.231.0.0/16")  # carved into /30s
LOCK_PATH = Path("/run/vmigrate-nshost.lock")
TOOLS = ("ip", "sshd", "ssh", "ssh-keygen", "losetup", "unshare", "mount", "openssl")

_counter = 0


@dataclass(kw_only=True)
class NsHost(SshHost):
    """An sshd this session started. For a namespace host ``host`` is the namespace's
    address (port 22) and ``peer_address`` this machine's end of the veth pair; for a
    loopback host ``host`` is 127.0.0.1 with a free port and ``netns`` is None."""

    netns: str | None = None
    peer_address: str | None = None
    veth: str | None = None  # this machine's end of the veth pair
    veth_peer: str | None = None  # the namespace's end
    backing_file: Path = Path("/nonexistent")
    loop_device: str | None = None
    ramfs: Path | None = None  # a ramfs mounted for the backing file (``backing="ramfs"``)
    hidden: tuple[str, ...] = ()  # programs its sessions cannot run (see start_ns_host)
    workdir: Path = Path("/nonexistent")
    sshd: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def sshd_log(self) -> Path:
        return self.workdir / "sshd.log"

    def ns_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's network namespace (as is for loopback)."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]

    def limit_egress(self, rate: str) -> None:
        """Make the namespace's link send at most ``rate`` (``tc`` units: "40mbit"): a
        slow network from this host to the service (a token bucket on its veth end)."""
        if self.netns is None or self.veth_peer is None:
            raise RuntimeError(f"{self.name} has no link of its own to slow down")
        run_local(["ip", "netns", "exec", self.netns, *_tbf(self.veth_peer, rate)])

    def limit_ingress(self, rate: str) -> None:
        """Make the link into the namespace carry at most ``rate``: a slow network from
        this machine (the service, or anything run here) to this host."""
        if self.veth is None:
            raise RuntimeError(f"{self.name} has no link of its own to slow down")
        run_local(_tbf(self.veth, rate))

    def stop(self) -> None:
        """Stop the sshd and its sessions (by PID), detach the loop device, delete the
        namespace and the work directory. Safe to call twice."""
        self.stop_master()
        if self.sshd is not None:
            _stop_tree(self.sshd, self.netns)
            self.sshd = None
        if self.loop_device is not None:
            run_local(["losetup", "-d", self.loop_device], check=False)
            self.loop_device = None
        if self.ramfs is not None:
            run_local(["umount", str(self.ramfs)], check=False)
            self.ramfs = None
        if self.netns is not None:
            _kill_netns_pids(self.netns)
            run_local(["ip", "netns", "del", self.netns], check=False)
            self.netns = None
        if self.veth is not None:
            # Normally gone with the namespace (it takes its peer); be sure.
            if Path(f"/sys/class/net/{self.veth}").exists():
                run_local(["ip", "link", "del", self.veth], check=False)
            self.veth = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def _tbf(device: str, rate: str) -> list[str]:
    # The bucket must hold a whole GSO packet (64 KiB) or nothing ever passes.
    return ["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", rate,
            "burst", "256kb", "latency", "200ms"]


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise InfraUnavailableError("namespace SSH hosts need root")
    missing = missing_tools(*TOOLS)
    if missing:
        raise InfraUnavailableError(f"missing tools for namespace SSH hosts: {missing}")


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (children first found, deepest last)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop_tree(proc: subprocess.Popen[bytes], netns: str | None) -> None:
    """Stop the sshd listener we started and the session processes it forked."""
    kids = _descendants(proc.pid) if proc.poll() is None else []
    _signal(kids, 15)
    stop_process(proc, grace=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in kids):
        time.sleep(0.05)
    _signal(kids, 9)


def _kill_netns_pids(netns: str) -> None:
    """SIGKILL what is still running in our namespace (only our sshd's sessions, or what a
    test started through them, can be there)."""
    out = run_local(["ip", "netns", "pids", netns], check=False)
    _signal([int(p) for p in out.split() if p.isdigit()], 9)


@contextmanager
def _flock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    with path.open("a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> None:
    """Remove namespaces and loop devices left by test sessions of this module whose
    process died (identified by the PID in their names)."""
    names = run_local(["ip", "netns", "list"], check=False)
    for m in re.finditer(rf"^({NETNS_PREFIX}-(\d+)-\d+)\b", names, re.MULTILINE):
        if not _pid_alive(int(m.group(2))):
            _kill_netns_pids(m.group(1))
            run_local(["ip", "netns", "del", m.group(1)], check=False)
    loops = run_local(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"], check=False)
    for line in loops.splitlines():
        parts = line.split(None, 1)
        if len(parts) != 2:
            continue
        owner = re.search(rf"/{WORKDIR_PREFIX}-(\d+)-", parts[1])
        if owner and not _pid_alive(int(owner.group(1))):
            run_local(["losetup", "-d", parts[0]], check=False)


_ROUTE_TYPES = frozenset(
    {
        "default",
        "unicast",
        "broadcast",
        "local",
        "unreachable",
        "blackhole",
        "prohibit",
        "throw",
        "nat",
        "anycast",
        "multicast",
    }
)


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    out = run_local(["ip", "-4", "-o", "addr", "show"], check=False)
    for m in re.finditer(r"\sinet\s+(\S+)", out):
        nets.append(ipaddress.IPv4Interface(m.group(1)).network)
    out = run_local(["ip", "-4", "route", "show", "table", "all"], check=False)
    for line in out.splitlines():
        words = line.split()
        # "[type] PREFIX ...": the prefix is the first word that is not a route type.
        dest = next((w for w in words[:2] if w not in _ROUTE_TYPES), "")
        if dest:
            with suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dest, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.231.0.0/16 that overlaps no address or route on this machine."""
    used = [n for n in _used_networks() if n.prefixlen > 0]
    candidates = list(SUBNET_POOL.subnets(new_prefix=30))
    start = secrets.randbelow(len(candidates))
    for i in range(len(candidates)):
        net = candidates[(start + i) % len(candidates)]
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free /30 in {SUBNET_POOL}")


def _free_uid() -> int:
    for uid in range(61000, 62000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise RuntimeError("no free uid for the test user")


def _hash_password(password: str) -> str:
    proc = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout.strip()


def _account_files(
    workdir: Path, user: str, uid: int, home: Path, pw_hash: str, root_home: Path
) -> None:
    """passwd/shadow/group copies with ``user`` added (and root not locked, so key logins
    work with UsePAM no); bind-mounted over /etc only inside the sshd's mount namespace.

    root gets ``root_home`` (empty) as its home: a session must not read this machine's
    /root/.bashrc, whose ``pyenv init`` makes every login slow (and stall for a minute
    when a killed ``pyenv rehash`` left its lock behind) and puts pyenv's shims before
    the system python3 a real host would have."""

    def without(path: str, name: str) -> list[str]:
        return [ln for ln in Path(path).read_text().splitlines() if ln.split(":", 1)[0] != name]

    passwd = []
    for line in without("/etc/passwd", user):
        parts = line.split(":")
        if parts[0] == "root" and len(parts) == 7:
            parts[5] = str(root_home)
        passwd.append(":".join(parts))
    passwd.append(f"{user}:x:{uid}:{uid}:vmigrate test:{home}:/bin/bash")
    group = [*without("/etc/group", user), f"{user}:x:{uid}:"]
    shadow = []
    for line in without("/etc/shadow", user):
        parts = line.split(":")
        if parts[0] == "root" and len(parts) > 1 and parts[1].startswith("!"):
            parts[1] = "*"
        shadow.append(":".join(parts))
    shadow.append(f"{user}:{pw_hash}:19000:0:99999:7:::")
    for name, lines, mode in (
        ("passwd", passwd, 0o644),
        ("group", group, 0o644),
        ("shadow", shadow, 0o600),
    ):
        path = workdir / "etc" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        path.chmod(mode)


def _sshd_config(workdir: Path, listen: str, port: int) -> Path:
    lines = [
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {workdir / 'ssh_host_ed25519_key'}",
        "PidFile none",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication yes",
        "KbdInteractiveAuthentication no",
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}/%u",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel INFO",
    ]
    if Path(SFTP_SERVER).exists():
        lines.append(f"Subsystem sftp {SFTP_SERVER}")
    path = workdir / "sshd_config"
    path.write_text("\n".join(lines) + "\n")
    return path


def _loop_attach(path: Path) -> str:
    dev = run_local(["losetup", "--find", "--show", str(path)], timeout=30).strip()
    if not dev.startswith("/dev/loop"):
        raise RuntimeError(f"losetup gave {dev!r}")
    return dev


def start_ns_host(
    client_key: SshKeyPair,
    *,
    netns: bool = True,
    device: str = "loop",
    device_mib: int = 256,
    backing: str = "disk",
    hide: Sequence[str] = (),
    ready_timeout: float = 20.0,
) -> NsHost:
    """Start an SSH host. ``netns``: in a new network namespace (else on 127.0.0.1).
    ``device``: "loop" (a loop device on a sparse file) or "file" (the sparse file itself).
    ``backing``: where that file lives: "disk" (this machine's /tmp) or "ramfs" (a ramfs
    mounted for it: no fallocate, so a loop device on it cannot punch holes or zero
    ranges without writing, like many real disks). ``hide``: programs (``"zstd"``) the
    host's sessions do not have: /dev/null is bind-mounted over them in the sshd's
    private mount namespace. The caller must call :meth:`NsHost.stop` (see
    :func:`running_ns_host`)."""
    global _counter
    check_prerequisites()
    if device not in ("loop", "file"):
        raise ValueError(f"device must be 'loop' or 'file', not {device!r}")
    if backing not in ("disk", "ramfs"):
        raise ValueError(f"backing must be 'disk' or 'ramfs', not {backing!r}")
    _counter += 1
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}-{os.getpid()}-", dir="/tmp"))
    workdir.chmod(0o755)  # the password user reads its authorized_keys, enters its home
    host = NsHost(
        name=f"nshost-{_counter}" if netns else f"loopback-sshd-{_counter}",
        host="127.0.0.1",
        port=0,
        key_path=client_key.private_path,
        password_user=TEST_USER,
        password=secrets.token_urlsafe(12),
        host_public_key="",
        known_hosts_path=workdir / "known_hosts",
        device="",
        ssh_timeout=60.0,
        backing_file=workdir / "disk.img",
        workdir=workdir,
        hidden=tuple(hide),
    )
    try:
        _setup(
            host,
            client_key,
            netns=netns,
            device=device,
            device_mib=device_mib,
            backing=backing,
            ready_timeout=ready_timeout,
        )
    except BaseException:
        host.stop()
        raise
    return host


def _setup(
    host: NsHost,
    client_key: SshKeyPair,
    *,
    netns: bool,
    device: str,
    device_mib: int,
    backing: str,
    ready_timeout: float,
) -> None:
    workdir = host.workdir
    host_key = generate_keypair(workdir / "ssh_host_ed25519_key", f"vmigrate-{host.name}")
    host.host_public_key = host_key.public_key
    uid = _free_uid()
    home = workdir / "home" / TEST_USER
    home.mkdir(parents=True)
    os.chown(home, uid, uid)
    keys = workdir / "authorized_keys"
    keys.mkdir(mode=0o755)
    for user in ("root", TEST_USER):
        (keys / user).write_text(client_key.public_key + "\n")
        (keys / user).chmod(0o644)
    root_home = workdir / "home" / "root"
    root_home.mkdir(mode=0o700)
    _account_files(workdir, TEST_USER, uid, home, _hash_password(host.password), root_home)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    if backing == "ramfs":
        mount = workdir / "ramfs"
        mount.mkdir()
        run_local(["mount", "-t", "ramfs", "-o", "mode=0755", "vmigrate-nshost", str(mount)])
        host.ramfs = mount
        host.backing_file = mount / "disk.img"
    with host.backing_file.open("wb") as f:
        f.truncate(device_mib * 1024 * 1024)
    if device == "loop":
        host.loop_device = _loop_attach(host.backing_file)
        host.device = host.loop_device
    else:
        host.device = str(host.backing_file)

    if netns:
        cleanup_stale()
        with _flock(LOCK_PATH):
            net = _pick_subnet()
            peer, ns_addr = (str(a) for a in net.hosts())
            name = f"{NETNS_PREFIX}-{os.getpid()}-{_counter}"
            token = secrets.token_hex(3)
            veth_host, veth_ns = f"vmt{token}h", f"vmt{token}g"
            run_local(["ip", "netns", "add", name])
            host.netns = name
            run_local(["ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns])
            host.veth = veth_host
            run_local(["ip", "link", "set", veth_ns, "netns", name])
            host.veth_peer = veth_ns
            run_local(["ip", "addr", "add", f"{peer}/30", "dev", veth_host])
            run_local(["ip", "link", "set", veth_host, "up"])
            run_local(["ip", "-n", name, "addr", "add", f"{ns_addr}/30", "dev", veth_ns])
            run_local(["ip", "-n", name, "link", "set", veth_ns, "up"])
            run_local(["ip", "-n", name, "link", "set", "lo", "up"])
        host.host, host.port, host.peer_address = ns_addr, 22, peer
        _start_sshd(host, ready_timeout)
    else:
        for _attempt in range(3):  # a lost race for the free port: retry on another
            host.port = free_tcp_port()
            try:
                _start_sshd(host, ready_timeout)
                break
            except _SshdExitedError:
                if "Address already in use" not in host.sshd_log.read_text(errors="replace"):
                    raise
        else:
            raise RuntimeError(f"{host.name}: no free port for sshd")
    host.write_known_hosts()
    host.start_master()


class _SshdExitedError(RuntimeError):
    pass


def _start_sshd(host: NsHost, ready_timeout: float) -> None:
    workdir = host.workdir
    config = _sshd_config(workdir, host.host, host.port)
    # The sshd sees our passwd/shadow/group copies; `exec` keeps the PID we hold.
    etc = workdir / "etc"
    hide = "".join(
        f"mount --bind /dev/null {path} && "
        for path in (shutil.which(name) for name in host.hidden)
        if path is not None
    )
    script = (
        f"mount --bind {etc}/passwd /etc/passwd && mount --bind {etc}/shadow /etc/shadow && "
        f"mount --bind {etc}/group /etc/group && {hide}exec {SSHD} -D -e -f {config}"
    )
    argv = host.ns_argv(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script]
    )
    with host.sshd_log.open("wb") as log:
        host.sshd = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    if not wait_for_ssh_banner(host.host, host.port, ready_timeout, alive=host.sshd):
        tail = host.sshd_log.read_text(errors="replace")[-2000:]
        exited = host.sshd.poll() is not None
        stop_process(host.sshd)
        host.sshd = None
        error = _SshdExitedError if exited else RuntimeError
        raise error(f"{host.name}: sshd on {host.host}:{host.port} not ready:\n{tail}")


@contextmanager
def running_ns_host(
    client_key: SshKeyPair,
    *,
    netns: bool = True,
    device: str = "loop",
    device_mib: int = 256,
    backing: str = "disk",
    hide: Sequence[str] = (),
) -> Iterator[NsHost]:
    """:func:`start_ns_host` that always stops what it started."""
    host = start_ns_host(
        client_key, netns=netns, device=device, device_mib=device_mib, backing=backing,
        hide=hide,
    )
    try:
        yield host
    finally:
        host.stop()
