"""Real SSH test hosts for the Live Stream feature.

* :mod:`tests.infra.guest`: a Debian 12 VM under QEMU (TCG) with LVM (``vg0/data``), reached
  by SSH through QEMU user networking on 127.0.0.1 (the host kernel has no device-mapper).
* :mod:`tests.infra.nshost`: OpenSSH ``sshd`` in a network namespace of its own (or on
  loopback) with a loop device as the destination disk.
* :mod:`tests.infra.fixtures`: the pytest fixtures (loaded as a plugin from tests/conftest.py).

This module holds what they share: SSH key pairs, host-key fingerprints and :class:`SshHost`,
the object the fixtures yield (address, credentials, pinned host key, device, ``run()``).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "InfraUnavailableError",
    "SshHost",
    "SshKeyPair",
    "die_with_parent",
    "free_tcp_port",
    "generate_keypair",
    "host_key_fingerprint",
    "known_hosts_line",
    "missing_tools",
    "run_local",
    "stop_process",
    "wait_for_ssh_banner",
]

SSH = "ssh"
SSH_KEYGEN = "ssh-keygen"


class InfraUnavailableError(RuntimeError):
    """A prerequisite (root, a tool, a kernel feature) is missing on this machine."""


def missing_tools(*names: str) -> list[str]:
    """The tools among ``names`` found neither on PATH nor in /usr/sbin or /sbin."""
    missing: list[str] = []
    for name in names:
        if shutil.which(name) is None and not any(
            os.access(f"{d}/{name}", os.X_OK) for d in ("/usr/sbin", "/sbin", "/usr/bin")
        ):
            missing.append(name)
    return missing


@dataclass(frozen=True)
class SshKeyPair:
    """An unencrypted ed25519 key pair on disk (OpenSSH format)."""

    private_path: Path
    public_key: str  # "ssh-ed25519 AAAA... comment"

    @property
    def public_path(self) -> Path:
        return self.private_path.with_name(self.private_path.name + ".pub")

    @property
    def fingerprint(self) -> str:
        return host_key_fingerprint(self.public_key)


def generate_keypair(path: Path, comment: str = "vmigrate-test") -> SshKeyPair:
    """Create an ed25519 key pair at ``path`` (and ``path``.pub)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    path.chmod(0o600)
    public = path.with_name(path.name + ".pub").read_text().strip()
    return SshKeyPair(private_path=path, public_key=public)


def host_key_fingerprint(public_key: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line ("type base64 [comment]")."""
    blob = base64.b64decode(public_key.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def known_hosts_line(host: str, port: int, public_key: str) -> str:
    """A known_hosts entry pinning ``public_key`` for host:port (no comment)."""
    key_type, key_b64 = public_key.split()[:2]
    target = host if port == 22 else f"[{host}]:{port}"
    return f"{target} {key_type} {key_b64}"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (callers retry on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_ssh_banner(host: str, port: int, timeout: float, alive: object = None) -> bool:
    """Poll until something at host:port sends an ``SSH-`` banner; False on timeout.

    ``alive`` may be a :class:`subprocess.Popen`: waiting stops early if it exits.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if isinstance(alive, subprocess.Popen) and alive.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(2)
                if s.recv(8).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


_PR_SET_PDEATHSIG = 1
# Resolved before any fork: the child of a multi-threaded parent must not dlopen/dlsym.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL if the test process dies without cleaning up
    (a crashed or killed pytest must not leave a VM or an sshd behind)."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process this test session started: SIGTERM, then SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


@dataclass
class SshHost:
    """A real SSH server to test against.

    ``user`` (root) logs in with the private key at ``key_path``; ``password_user`` logs in
    with ``password`` (and the same key). The server's host key is ``host_public_key``;
    ``known_hosts_path`` is a file holding just ``known_hosts_line``, so pinning is strict.
    ``device`` is the destination block device (or file) on that host.
    """

    name: str
    host: str
    port: int
    key_path: Path
    password_user: str
    password: str
    host_public_key: str
    known_hosts_path: Path
    device: str
    user: str = "root"
    ssh_timeout: float = 120.0
    # Set by start_master(): run()/arun() as ``user`` share one SSH connection, which saves
    # the per-login cost (about a second on the TCG guest). Other users connect directly.
    control_path: Path | None = field(default=None, repr=False)
    _master: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def host_key_fingerprint(self) -> str:
        return host_key_fingerprint(self.host_public_key)

    @property
    def dest_device(self) -> str:
        """Alias of ``device``: the destination block device (or file) on this host."""
        return self.device

    @property
    def known_hosts_line(self) -> str:
        return known_hosts_line(self.host, self.port, self.host_public_key)

    def write_known_hosts(self) -> None:
        self.known_hosts_path.parent.mkdir(parents=True, exist_ok=True)
        self.known_hosts_path.write_text(self.known_hosts_line + "\n")

    def start_master(self, timeout: float = 60.0) -> None:
        """Open the shared connection for :meth:`run` (an ``ssh -M`` this object owns)."""
        if self._master is not None and self._master.poll() is None:
            return
        path = Path(tempfile.mkdtemp(prefix="vmcm-", dir="/tmp")) / "cm"
        argv = self.ssh_argv(None, master=True)
        argv[1:1] = ["-M", "-N", "-o", f"ControlPath={path}", "-o", "ControlPersist=no"]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_process(proc)
                shutil.rmtree(path.parent, ignore_errors=True)
                raise RuntimeError(f"{self.name}: SSH master connection did not come up")
            time.sleep(0.05)
        self._master = proc
        self.control_path = path

    def stop_master(self) -> None:
        """Close the shared connection (stops the ``ssh -M`` process it started)."""
        if self._master is not None:
            stop_process(self._master, grace=5)
            self._master = None
        if self.control_path is not None:
            shutil.rmtree(self.control_path.parent, ignore_errors=True)
            self.control_path = None

    def ssh_argv(
        self, command: str | None = None, *, user: str | None = None, master: bool = False
    ) -> list[str]:
        """An ``ssh`` command line for this host: key auth, strict pinning, no user config."""
        user = user or self.user
        if master:
            mux = []  # the caller adds -M and its ControlPath
        elif self.control_path is not None and user == self.user:
            mux = ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control_path}"]
        else:
            mux = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        argv = [
            SSH,
            "-F", "/dev/null",
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_path}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "ConnectTimeout=20",
            "-o", "ServerAliveInterval=15",
            "-o", "LogLevel=ERROR",
            "-i", str(self.key_path),
            "-p", str(self.port),
            *mux,
            "-l", user,
            self.host,
        ]  # fmt: skip
        if command is not None:
            argv += ["--", command]
        return argv

    def run(
        self,
        command: str,
        *,
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> tuple[int, str, str]:
        """Run a shell command on the host over SSH; returns (exit status, stdout, stderr).

        Blocking (fine in setup and simple tests; use :meth:`arun` inside an event loop
        that must keep serving). ``check`` raises :class:`RuntimeError` on non-zero status.
        """
        data = input.encode() if isinstance(input, str) else input
        proc = subprocess.run(
            self.ssh_argv(command, user=user),
            input=data if data is not None else b"",
            capture_output=True,
            timeout=timeout or self.ssh_timeout,
            check=False,
        )
        return self._result(command, proc.returncode, proc.stdout, proc.stderr, check)

    async def arun(
        self,
        command: str,
        *,
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
        check: bool = False,
    ) -> tuple[int, str, str]:
        """:meth:`run` without blocking the event loop."""
        data = input.encode() if isinstance(input, str) else input
        proc = await asyncio.create_subprocess_exec(
            *self.ssh_argv(command, user=user),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(data if data is not None else b""),
                timeout or self.ssh_timeout,
            )
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        assert proc.returncode is not None
        return self._result(command, proc.returncode, out, err, check)

    def _result(
        self, command: str, rc: int, out: bytes, err: bytes, check: bool
    ) -> tuple[int, str, str]:
        result = (rc, _text(out), _text(err))
        if check and rc != 0:
            raise RuntimeError(
                f"{self.name}: {command!r} exited {rc}\nstdout: {result[1][-2000:]}\n"
                f"stderr: {result[2][-2000:]}"
            )
        return result

    def check_output(self, command: str, *, user: str | None = None) -> str:
        """stdout of a command that must succeed."""
        return self.run(command, user=user, check=True)[1]


def run_local(argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> str:
    """Run a local command (as this root test process); returns stdout, raises with stderr."""
    proc = subprocess.run(
        list(argv), capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {_text(proc.stderr).strip()[-2000:]}"
        )
    return _text(proc.stdout)
