"""Bulk data channels through the OpenSSH client (``ssh``), beside an asyncssh session.

asyncssh is pure Python per packet, and OpenSSH servers send and accept packets of at
most 32 KiB, so moving a GiB through asyncssh costs the service about 2.5 CPU seconds
per hop in one thread (measured, ``docs/performance.md``): the service, which runs many
migrations, would be the bottleneck. For the streams that carry a disk, the session
starts ``ssh`` processes instead: crypto in C, one process per channel (so it spreads
over cores), and the service only moves pipe reads of up to 1 MiB, or nothing at all when
it hands one process's output straight to another's input (``start(stdin_fd=...)``).

Nothing is looser than the asyncssh session the process belongs to:

- the host key is the one that session verified (strict known_hosts with that single
  key under a host alias; no other key is accepted);
- credentials come from the same request: a private key file and, for passwords, an
  askpass script, both mode 0600/0700 in a private directory (0700, on RAM-backed
  /dev/shm when there is one) removed when the session closes, and by the next session
  of any service process if its owner died; nothing is passed on a command line;
- no user configuration, agent or ``~/.ssh`` file is read (``-F /dev/null``, a HOME of
  its own, ``IdentitiesOnly``, ``IdentityAgent none``).

:class:`NativeProcess` offers what the engines use of an asyncssh process (``stdin``
``write``/``drain``/``write_eof``, ``stdout``/``stderr`` reads, ``exit_status``,
``wait_closed``, ``close``), so callers do not care which kind they got. An ``ssh``
that exits 255 lost its connection (or never made it): the caller's error handling
treats that as retryable, like a lost asyncssh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

import asyncssh

SSH = "ssh"
HOST_ALIAS = "vmigrate-target"
PIPE_SIZE = 1024 * 1024
DIR_PREFIX = "vmigrate-ssh-"
#: ssh's exit status when the connection failed or was lost (not the remote command's).
CONNECTION_FAILED = 255


def available() -> bool:
    return shutil.which(SSH) is not None


class NativeProcess:
    """An ``ssh`` child process shaped like an asyncssh ``SSHClientProcess``."""

    def __init__(self, process: asyncio.subprocess.Process, stdin: asyncio.StreamWriter | None,
                 stdout: asyncio.StreamReader | None) -> None:
        self._process = process
        assert process.stderr is not None
        self._stdin = stdin
        self._stdout = stdout
        self.stderr = process.stderr
        self.exit_signal: tuple[str, bool, str, str] | None = None

    @property
    def stdin(self) -> asyncio.StreamWriter:
        if self._stdin is None:
            raise RuntimeError("this process reads a pipe the service handed over")
        return self._stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        if self._stdout is None:
            raise RuntimeError("this process writes a pipe the service handed over")
        return self._stdout

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exit_status(self) -> int | None:
        code = self._process.returncode
        if code is not None and code < 0:
            self.exit_signal = (str(-code), False, "", "")
            return None
        return code

    @property
    def connection_lost(self) -> bool:
        return self._process.returncode == CONNECTION_FAILED

    async def wait_closed(self) -> None:
        await self._process.wait()

    def close(self) -> None:
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()
        if self._stdin is not None:
            self._stdin.close()


class _WriteProtocol(asyncio.streams.FlowControlMixin):
    """Flow control for the stdin pipe (what ``StreamWriter.drain`` waits on)."""


class NativeChannels:
    """Starts ``ssh`` processes for one verified asyncssh connection."""

    def __init__(self, host: str, port: int, username: str, host_key: asyncssh.SSHKey,
                 private_key: str | None, password: str | None,
                 connect_timeout: float) -> None:
        _sweep_stale()
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-",
                                          dir=_secret_root()))
        self._dir.chmod(stat.S_IRWXU)
        self.host, self.port, self.username = host, port, username
        self.connect_timeout = connect_timeout
        algorithm = host_key.get_algorithm()
        line = host_key.export_public_key("openssh").decode().split()[:2]
        (self._dir / "known_hosts").write_text(f"{HOST_ALIAS} {' '.join(line)}\n")
        self._algorithms = _host_key_algorithms(algorithm)
        self._key: Path | None = None
        self._askpass: Path | None = None
        if private_key:
            self._key = self._secret_file("id", private_key.rstrip("\n") + "\n")
        if password is not None:
            secret = self._secret_file("password", password)
            self._askpass = self._dir / "askpass"
            self._askpass.write_text(f"#!/bin/sh\nexec cat '{secret}'\n")
            self._askpass.chmod(stat.S_IRWXU)

    @property
    def directory(self) -> Path:
        """The private directory holding known_hosts and the credentials."""
        return self._dir

    def _secret_file(self, name: str, text: str) -> Path:
        path = self._dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def argv(self, command: str) -> list[str]:
        auth = ["publickey"] if self._key else []
        if self._askpass is not None:
            auth += ["password", "keyboard-interactive"]
        argv = [
            SSH, "-F", "/dev/null", "-T", "-x", "-a",
            "-o", f"HostKeyAlias={HOST_ALIAS}",
            "-o", f"UserKnownHostsFile={self._dir / 'known_hosts'}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes",
            "-o", "UpdateHostKeys=no",
            "-o", f"HostKeyAlgorithms={self._algorithms}",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", f"PreferredAuthentications={','.join(auth)}",
            "-o", "NumberOfPasswordPrompts=1",
            "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-o", f"ConnectTimeout={max(1, int(self.connect_timeout))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", "Ciphers=aes128-gcm@openssh.com,aes256-gcm@openssh.com,"
                  "chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr",
            "-o", "LogLevel=ERROR",
            "-p", str(self.port), "-l", self.username,
        ]  # fmt: skip
        if self._key is not None:
            argv += ["-i", str(self._key)]
        return [*argv, "--", self.host, command]

    async def start(self, command: str, *, stdin_fd: int | None = None,
                    stdout_fd: int | None = None) -> NativeProcess:
        """Start ``command``. With ``stdin_fd`` (``stdout_fd``) the process reads (writes)
        that file descriptor, typically one end of a pipe whose other end another
        process holds, and the service never touches those bytes; the caller closes its
        copy once this returns. Otherwise the service gets an asyncio stream."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self._dir),
               "LC_ALL": "C"}
        if self._askpass is not None:
            env |= {"SSH_ASKPASS": str(self._askpass), "SSH_ASKPASS_REQUIRE": "force",
                    "DISPLAY": "none"}
        ours: list[int] = []  # the service's ends: stdin's write end, stdout's read end
        theirs: list[int] = []  # the child's ends, closed here once it has them
        if stdin_fd is None:
            in_r, in_w = os.pipe()
            ours.append(in_w)
            theirs.append(in_r)
        else:
            in_r, in_w = stdin_fd, -1
        if stdout_fd is None:
            out_r, out_w = os.pipe()
            ours.append(out_r)
            theirs.append(out_w)
        else:
            out_r, out_w = -1, stdout_fd
        for fd in ours:
            set_pipe_size(fd)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv(command), stdin=in_r, stdout=out_w,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        loop = asyncio.get_running_loop()
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        if out_r >= 0:
            stream = reader = asyncio.StreamReader(limit=PIPE_SIZE, loop=loop)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream),
                                         os.fdopen(out_r, "rb", buffering=0))
        if in_w >= 0:
            transport, protocol = await loop.connect_write_pipe(
                _WriteProtocol, os.fdopen(in_w, "wb", buffering=0))
            writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return NativeProcess(process, writer, reader)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def set_pipe_size(fd: int) -> None:
    """Make a pipe hold :data:`PIPE_SIZE` bytes (if the system allows): a sixteenth of
    the syscalls and wake-ups on both sides of the pipe for the same bytes."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _secret_root() -> str | None:
    """RAM-backed /dev/shm when there is one (secrets never reach a disk), else TMPDIR."""
    shm = Path("/dev/shm")  # noqa: S108  (mkdtemp below: 0700, unpredictable name)
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _sweep_stale() -> None:
    """Remove the directories of service processes that died without closing their
    sessions (a SIGKILLed worker): they hold credentials."""
    root = Path(_secret_root() or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in root.glob(f"{DIR_PREFIX}*"):
            pid = entry.name[len(DIR_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists() and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


def _host_key_algorithms(algorithm: str) -> str:
    """Signature algorithms for a host key type (an RSA key signs with rsa-sha2-*)."""
    if algorithm in ("ssh-rsa", "rsa-sha2-256", "rsa-sha2-512"):
        return "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
    return algorithm
