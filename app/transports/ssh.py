"""SSH transport: asyncssh connections with strict host-key checking and root/sudo.

Every connection verifies the server's host key, with no "trust on first use": the key
must be in the known_hosts file from the settings, or match the ``SHA256:`` fingerprint
pinned in the request. An unknown key fails with an error that shows the fingerprint the
server presented, so an operator can check it out of band and pin it. Neither the user's
``~/.ssh`` (config, keys, known_hosts) nor an SSH agent is ever consulted: a service must
not pick up whatever credentials the account it runs under happens to have.

Remote commands run as root: directly when the login is root, else through passwordless
``sudo -n`` (detected once per connection, :attr:`SshSession.sudo`). Every command runs
under ``sh -c`` with ``LC_ALL=C`` and a PATH that includes the sbin directories, so output
parses the same everywhere. Callers build commands with :func:`quote_argv`; nothing a
user sends reaches a shell unquoted.

asyncssh and socket errors are translated here (:func:`map_exceptions`, by the
:data:`SSH_TABLE` in front of the shared network table of :mod:`app.errormap`) into
:class:`~app.errors.AppError` subclasses: authentication and host-key failures are
permanent (retrying cannot help and may lock an account), a lost, reset or timed-out
connection is retryable. Messages name ``user@host:port``, never a password or key.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shlex
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from app.errormap import NETWORK, Boundary, ErrorFamily, ErrorRule, Scrubber
from app.errors import AppError
from app.transports import ssh_native
from app.transports.ssh_native import NativeChannels, NativeProcess

#: Ciphers in preference order: AES-GCM is hardware-accelerated on the hosts this runs
#: on and is what ``ssh -c aes128-gcm@openssh.com`` (the benchmark's reference) uses.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
#: Receive window and largest packet we accept on streaming channels: bigger packets
#: than asyncssh's 32 KiB default cut its per-packet cost (decrypt, bookkeeping) on the
#: receiving side several times; the window bounds what is in flight per channel.
STREAM_WINDOW = 8 * 1024 * 1024
STREAM_PACKET = 256 * 1024
#: PATH for remote commands: LVM tools live in /sbin on most distributions.
REMOTE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SshError(AppError):
    """Base of the SSH transport's errors."""

    status = 502
    code = "ssh-error"
    title = "SSH error"


class SshAuthError(SshError):
    code = "ssh-auth-failed"
    title = "SSH authentication failed"


class SshHostKeyError(SshError):
    code = "ssh-host-key"
    title = "SSH host key not trusted"


class SshConnectionError(SshError):
    """The connection could not be made or broke: worth another try."""

    code = "ssh-connection"
    title = "SSH connection failed"
    retryable = True


class SshPrivilegeError(SshError):
    code = "ssh-privilege"
    title = "Not root"


class RemoteCommandError(SshError):
    """A remote command exited non-zero; ``what`` says what it was for."""

    code = "remote-command-failed"
    title = "Remote command failed"

    def __init__(self, label: str, what: str, exit_status: int | None, stderr: str) -> None:
        tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
        status = "was killed" if exit_status is None else f"exited {exit_status}"
        super().__init__(f"{what} on {label} {status}" + (f": {tail}" if tail else ""),
                         extra={"exit_status": exit_status})
        self.exit_status = exit_status
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class SshTarget:
    """Where and how to log in. Secrets are kept out of ``repr``."""

    host: str
    port: int
    username: str
    password: str | None = field(default=None, repr=False)
    private_key: str | None = field(default=None, repr=False)
    #: ``SHA256:...`` fingerprint the server's host key must have (else known_hosts).
    fingerprint: str | None = None

    @property
    def label(self) -> str:
        return f"{self.username}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SshOptions:
    """Process-wide SSH settings (from :class:`~app.config.Settings`)."""

    known_hosts: Path | None = None
    connect_timeout: float = 30.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 4
    #: Run the processes that stream data through the OpenSSH client (``ssh_native``)
    #: when it is installed; else over asyncssh channels.
    native_data: bool = True


def quote_argv(*argv: str | int) -> str:
    """One shell command line from argument values, each quoted for a POSIX shell."""
    return " ".join(shlex.quote(str(a)) for a in argv)


class _Client(asyncssh.SSHClient):
    """Accepts a host key not in known_hosts only when it matches the pinned fingerprint,
    and remembers what the server presented (for the error message)."""

    def __init__(self, pin: str | None) -> None:
        self.pin = pin
        self.presented: str | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        fingerprint = key.get_fingerprint("sha256")
        self.presented = f"{key.get_algorithm()} {fingerprint}"
        return self.pin is not None and fingerprint == self.pin


def _known_hosts(options: SshOptions) -> asyncssh.SSHKnownHosts:
    """The trusted keys. An empty :class:`SSHKnownHosts` (never an empty list or None:
    asyncssh would read ~/.ssh/known_hosts or skip verification) when none is set."""
    if options.known_hosts is None:
        return asyncssh.import_known_hosts("")
    try:
        return asyncssh.read_known_hosts(str(options.known_hosts))
    except OSError as exc:
        raise SshError(f"cannot read the known_hosts file {options.known_hosts}: "
                       f"{exc.strerror or exc}") from None


def _host_key_error(target: SshTarget, client: _Client | None) -> SshHostKeyError:
    presented = client.presented if client is not None else None
    where = f"{target.host}:{target.port}"
    if presented is None:
        return SshHostKeyError(f"the host key of {where} could not be verified")
    if target.fingerprint:
        return SshHostKeyError(
            f"the host key of {where} ({presented}) does not match the pinned "
            f"host_key_fingerprint {target.fingerprint}")
    return SshHostKeyError(
        f"the host key of {where} is unknown: the server presented {presented}; "
        "if that is the right key, pin it with host_key_fingerprint (or add it to the "
        "service's known_hosts file)")


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", "") or exc)


def _os_reason(exc: BaseException) -> str:
    assert isinstance(exc, OSError)
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _resolve(exc: BaseException, b: Boundary, action: str) -> AppError:
    assert isinstance(exc, socket.gaierror)
    err = SshConnectionError if exc.errno == socket.EAI_AGAIN else SshError
    return err(b.scrub(f"cannot resolve {action}: {exc.strerror}"))


SSH_FAMILY = ErrorFamily(failed=SshError, unavailable=SshConnectionError, auth=SshAuthError,
                         untrusted=SshHostKeyError)

#: asyncssh's exceptions in front of the shared network table; anything else (a bug, a
#: parse error in the caller's block) propagates unchanged. The action is the host name
#: (what a failed name resolution names), ``where`` is ``user@host:port``.
SSH_TABLE = NETWORK.extend([
    ErrorRule(asyncssh.PermissionDenied,
              lambda exc, b, host: SshAuthError(f"authentication failed for {b.where}"),
              hide_cause=True),
    ErrorRule(asyncssh.KeyImportError, lambda exc, b, host: SshAuthError(
        b.scrub(f"the private key for {b.where} cannot be used: {exc}")), hide_cause=True),
    ErrorRule((asyncssh.KeyExchangeFailed, asyncssh.ProtocolNotSupported),
              lambda exc, b, host: SshError(
                  b.scrub(f"SSH negotiation with {b.where} failed: {_reason(exc)}")),
              hide_cause=True),
    ErrorRule((asyncssh.ConnectionLost, asyncssh.DisconnectError),
              lambda exc, b, host: SshConnectionError(
                  b.scrub(f"SSH connection to {b.where} lost: {_reason(exc)}")),
              hide_cause=True),
    ErrorRule(asyncssh.ChannelOpenError, lambda exc, b, host: SshConnectionError(
        b.scrub(f"SSH session on {b.where} refused: {_reason(exc)}")), hide_cause=True),
    ErrorRule(socket.gaierror, _resolve, hide_cause=True),
    ErrorRule(TimeoutError, lambda exc, b, host: SshConnectionError(
        f"SSH connection to {b.where} timed out"), hide_cause=True),
    ErrorRule(OSError, lambda exc, b, host: SshConnectionError(
        f"SSH connection to {b.where} failed: {_os_reason(exc)}"), hide_cause=True),
], passthrough=True)


@contextlib.contextmanager
def map_exceptions(target: SshTarget, client: _Client | None = None) -> Iterator[None]:
    """Translate asyncssh and socket errors raised inside into :class:`SshError`s
    (:data:`SSH_TABLE`); a host key that cannot be verified names the key presented."""
    boundary = Boundary(
        where=target.label, family=SSH_FAMILY, username=target.username,
        scrub=Scrubber(s for s in (target.password, target.private_key) if s),
    )
    try:
        yield
    except AppError:
        raise
    except asyncssh.HostKeyNotVerifiable:
        raise _host_key_error(target, client) from None
    except Exception as exc:
        SSH_TABLE.raise_translated(exc, boundary, target.host)


#: A started remote process: an asyncssh channel or an ``ssh`` child process.
RemoteProcess = asyncssh.SSHClientProcess[bytes] | NativeProcess


@dataclass(frozen=True, slots=True)
class CommandResult:
    exit_status: int | None
    stdout: str
    stderr: str


class SshSession:
    """One authenticated connection; commands run as root (directly or via sudo)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, target: SshTarget,
                 client: _Client, native: NativeChannels | None = None) -> None:
        self.conn = conn
        self.target = target
        self._client = client
        #: ``ssh`` processes for :meth:`start`, when the OpenSSH client is used for data.
        self.native = native
        #: "" when logged in as root, else "sudo -n " (set by :func:`open_session`).
        self.sudo = ""

    @property
    def label(self) -> str:
        return self.target.label

    @property
    def can_hand_over(self) -> bool:
        """Whether :meth:`start` can connect a process to a file descriptor (a pipe to
        another session's process), so the bytes never pass through Python."""
        return self.native is not None

    def wrap(self, script: str) -> str:
        """The command line that runs shell ``script`` as root with a known locale/PATH."""
        env = f"env LC_ALL=C PATH={REMOTE_PATH}"
        return f"{self.sudo}{env} sh -c {shlex.quote(script)}"

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return map_exceptions(self.target, self._client)

    async def run(self, script: str, *, what: str, input: bytes | None = None,
                  seconds: float = 120.0, check: bool = True,
                  privileged: bool = True) -> CommandResult:
        """Run shell ``script``; raise :class:`RemoteCommandError` on non-zero exit when
        ``check``. ``what`` names the purpose in errors ("lvcreate"); ``seconds`` bounds
        the whole command (a timeout is a retryable :class:`SshConnectionError`)."""
        command = self.wrap(script) if privileged else script
        with self.errors():
            result = await self.conn.run(command, input=input, encoding=None,
                                         check=False, timeout=seconds)
        out = _text(result.stdout)
        err = _text(result.stderr)
        status = result.exit_status
        if check and status != 0:
            raise RemoteCommandError(self.label, what, status, err)
        return CommandResult(status, out, err)

    async def start(self, script: str, *, stdin_fd: int | None = None,
                    stdout_fd: int | None = None) -> RemoteProcess:
        """Start shell ``script`` as root with binary stdin/stdout/stderr: through the
        OpenSSH client when the session has one (bulk data), else an asyncssh channel.

        ``stdin_fd``/``stdout_fd`` (OpenSSH client only, see :attr:`can_hand_over`):
        the process reads/writes that descriptor instead of a stream of the service's;
        the caller closes its copy afterwards."""
        if self.native is not None:
            return await self.native.start(self.wrap(script), stdin_fd=stdin_fd,
                                           stdout_fd=stdout_fd)
        if stdin_fd is not None or stdout_fd is not None:
            raise ValueError("only OpenSSH client processes take file descriptors")
        with self.errors():
            process: asyncssh.SSHClientProcess[bytes] = await self.conn.create_process(
                self.wrap(script), encoding=None, window=STREAM_WINDOW,
                max_pktsize=STREAM_PACKET)
        return process

    async def close(self) -> None:
        if self.native is not None:
            self.native.close()
        self.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.conn.wait_closed(), 5)

    def abort(self) -> None:
        """Drop the connection at once (remote processes get EOF/SIGPIPE)."""
        if self.native is not None:
            self.native.close()
        self.conn.abort()


def _text(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes | bytearray):
        return bytes(data).decode("utf-8", errors="replace")
    return str(data)


async def _detect_sudo(session: SshSession) -> None:
    probe = await session.run("id -u", what="id -u", privileged=False, seconds=60)
    if probe.stdout.strip() == "0":
        return
    sudo = await session.run("sudo -n true", what="sudo -n true", privileged=False,
                             check=False, seconds=60)
    if sudo.exit_status != 0:
        raise SshPrivilegeError(
            f"{session.label} is neither root nor allowed passwordless sudo (sudo -n true: "
            f"{sudo.stderr.strip()[:200] or 'exit ' + str(sudo.exit_status)})")
    session.sudo = "sudo -n "


async def open_session(target: SshTarget, options: SshOptions) -> SshSession:
    """Connect, authenticate, verify the host key and find a way to run as root.

    Raises :class:`SshAuthError`, :class:`SshHostKeyError`, :class:`SshPrivilegeError`
    (permanent) or :class:`SshConnectionError` (retryable).
    """
    client = _Client(target.fingerprint)
    with map_exceptions(target, client):
        keys = [asyncssh.import_private_key(target.private_key)] if target.private_key else None
        conn = await asyncssh.connect(
            target.host,
            port=target.port,
            username=target.username,
            password=target.password,
            client_keys=keys,
            known_hosts=_known_hosts(options),
            client_factory=lambda: client,
            agent_path=None,
            config=None,
            preferred_auth=("publickey", "keyboard-interactive", "password"),
            encryption_algs=CIPHERS,
            connect_timeout=options.connect_timeout,
            login_timeout=options.connect_timeout,
            keepalive_interval=options.keepalive_interval,
            keepalive_count_max=options.keepalive_count_max,
        )
    session = SshSession(conn, target, client)
    try:
        await _detect_sudo(session)
        host_key = conn.get_server_host_key()
        if options.native_data and ssh_native.available() and host_key is not None:
            session.native = NativeChannels(
                target.host, target.port, target.username, host_key, target.private_key,
                target.password, options.connect_timeout)
    except BaseException:
        session.abort()
        raise
    return session


@contextlib.asynccontextmanager
async def ssh_session(target: SshTarget, options: SshOptions) -> AsyncIterator[SshSession]:
    """:func:`open_session` that closes the connection on exit."""
    session = await open_session(target, options)
    try:
        yield session
    finally:
        await session.close()

