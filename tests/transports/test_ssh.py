"""The SSH transport against a real OpenSSH server: host-key policy, authentication,
root/sudo detection, quoting, and how failures are classified."""

from __future__ import annotations

import dataclasses
import stat

import asyncssh
import pytest

from app.engines.retry import RetryPolicy
from app.transports.ssh import (
    SshAuthError,
    SshConnectionError,
    SshHostKeyError,
    SshOptions,
    SshPrivilegeError,
    SshTarget,
    quote_argv,
    ssh_session,
)
from tests.engines.live_stream.support import SSH, target
from tests.infra import free_tcp_port
from tests.infra.nshost import NsHost


async def test_root_by_key_with_pinned_host_key(loopback_sshd: NsHost) -> None:
    async with ssh_session(target(loopback_sshd), SSH) as session:
        assert session.sudo == ""
        result = await session.run("id -u; echo $LC_ALL", what="id")
    assert result.stdout.split() == ["0", "C"]


async def test_known_hosts_file_from_settings(loopback_sshd: NsHost) -> None:
    options = dataclasses.replace(SSH, known_hosts=loopback_sshd.known_hosts_path)
    async with ssh_session(target(loopback_sshd, pin=False), options) as session:
        assert (await session.run("true", what="true")).exit_status == 0


async def test_unknown_host_key_shows_the_fingerprint_to_pin(loopback_sshd: NsHost) -> None:
    with pytest.raises(SshHostKeyError) as info:
        async with ssh_session(target(loopback_sshd, pin=False), SshOptions()):
            pass
    assert loopback_sshd.host_key_fingerprint in info.value.message
    assert "pin it with host_key_fingerprint" in info.value.message
    assert not RetryPolicy().is_retryable(info.value)


async def test_wrong_pin_is_a_mismatch(loopback_sshd: NsHost) -> None:
    wrong = dataclasses.replace(target(loopback_sshd), fingerprint="SHA256:" + "B" * 43)
    with pytest.raises(SshHostKeyError, match="does not match the pinned"):
        async with ssh_session(wrong, SSH):
            pass


async def test_wrong_password_is_permanent_and_never_echoed(loopback_sshd: NsHost) -> None:
    bad = dataclasses.replace(target(loopback_sshd, password_login=True),
                              password="not-the-Passw0rd")
    with pytest.raises(SshAuthError) as info:
        async with ssh_session(bad, SSH):
            pass
    assert info.value.message == (f"authentication failed for {loopback_sshd.password_user}@"
                                  f"{loopback_sshd.host}:{loopback_sshd.port}")
    assert "not-the-Passw0rd" not in repr(info.value.__dict__)
    assert not RetryPolicy().is_retryable(info.value)


async def test_user_without_sudo_is_refused(loopback_sshd: NsHost) -> None:
    """The namespace host's password user has no sudo rights at all."""
    with pytest.raises(SshPrivilegeError, match="neither root nor allowed passwordless sudo"):
        async with ssh_session(target(loopback_sshd, password_login=True), SSH):
            pass


async def test_connection_refused_is_retryable() -> None:
    closed = SshTarget("127.0.0.1", free_tcp_port(), "root", password="x",
                       fingerprint="SHA256:" + "C" * 43)
    with pytest.raises(SshConnectionError) as info:
        async with ssh_session(closed, SSH):
            pass
    assert RetryPolicy().is_retryable(info.value)


async def test_arguments_reach_the_shell_quoted(loopback_sshd: NsHost) -> None:
    nasty = "a b'c\"$(touch /tmp/vmigrate-pwned);`id`\n|&>"
    async with ssh_session(target(loopback_sshd), SSH) as session:
        result = await session.run(quote_argv("printf", "%s", nasty), what="printf")
    assert result.stdout == nasty


async def test_openssh_client_channels_keep_secrets_private(loopback_sshd: NsHost) -> None:
    async with ssh_session(target(loopback_sshd), SSH) as session:
        assert session.native is not None
        directory = session.native.directory
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_IMODE((directory / "id").stat().st_mode) == 0o600
        process = await session.start("id -u; cat")
        process.stdin.write(b"through ssh\n")
        process.stdin.write_eof()
        assert await process.stdout.read() == b"0\nthrough ssh\n"
        await process.wait_closed()
        assert process.exit_status == 0
        argv = " ".join(session.native.argv("true"))
        assert "BEGIN" not in argv
    assert not directory.exists()


async def test_openssh_client_refuses_another_host_key(loopback_sshd: NsHost) -> None:
    """The ``ssh`` processes trust exactly the key the session verified."""
    async with ssh_session(target(loopback_sshd), SSH) as session:
        assert session.native is not None
        other = asyncssh.generate_private_key("ssh-ed25519")
        (session.native.directory / "known_hosts").write_text(
            "vmigrate-target " + other.export_public_key().decode())
        process = await session.start("true")
        await process.wait_closed()
        assert process.exit_status == 255
        assert b"Host key verification failed" in await process.stderr.read()
