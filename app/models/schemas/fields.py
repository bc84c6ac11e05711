"""Strict, bounded field types for migration requests.

Every value a migration carries ends up in a command line, a remote API call or a
device the service overwrites, so each type accepts only what it must: an exact
grammar (hostname, LVM device, Windows path), a bound on length and, where numbers
are involved, no silent coercion (``"22"`` or ``true`` is not a port). The validators
never echo secret input back in their messages.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    StrictInt,
    StringConstraints,
)

__all__ = [
    "AccountName",
    "BlockDevice",
    "Fingerprint",
    "Host",
    "Label",
    "LvDevice",
    "Name",
    "Password",
    "Port",
    "PosixUser",
    "PrivateKey",
    "PublicKey",
    "ServerId",
    "Throttle",
    "WinRMPort",
    "WindowsPath",
    "WindowsUser",
]

_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"

Port = Annotated[StrictInt, Field(ge=1, le=65535, description="TCP port, 1-65535.")]
WinRMPort = Annotated[StrictInt, Field(ge=1, le=65535, description="WinRM port (HTTPS: 5986).")]

Name = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=128,
                      pattern=_PRINTABLE),
]
#: A free-form label (server name, datastore, flavor): printable, 1-255 characters.
Label = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=255,
                      pattern=_PRINTABLE),
]

_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _host(value: str) -> str:
    """A DNS hostname (RFC 1123) or an IPv4/IPv6 literal, normalised to lower case."""
    if "%" not in value:
        try:
            return ipaddress.ip_address(value).compressed
        except ValueError:
            pass
    labels = value.lower().split(".")
    if len(value) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError("must be a DNS hostname or an IP address (no scheme, port or path)")
    if labels[-1].isdigit():
        raise ValueError("is neither a valid IP address nor a hostname")
    return value.lower()


Host = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=253),
    AfterValidator(_host),
    Field(description="DNS hostname or IP address (no scheme, port or path)."),
]

PosixUser = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$"),
    Field(description="POSIX login name."),
]
WindowsUser = Annotated[
    str,
    StringConstraints(
        strict=True, max_length=170,
        pattern=r"^(?:(?:\.|[A-Za-z0-9][A-Za-z0-9._-]{0,62})\\)?[A-Za-z0-9][A-Za-z0-9._@-]{0,103}$",
    ),
    Field(description="`user`, `DOMAIN\\user`, `.\\user` or `user@domain`."),
]
AccountName = Annotated[
    str,
    StringConstraints(
        strict=True, max_length=192,
        pattern=r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}\\)?[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}$",
    ),
    Field(description="Hypervisor account, e.g. `root` or `administrator@vsphere.local`."),
]


def _server_id(value: str) -> str:
    if ".." in value or "//" in value:
        raise ValueError("must not contain '..' or '//'")
    return value


ServerId = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^[A-Za-z0-9/][A-Za-z0-9._:/@-]{0,254}$"),
    AfterValidator(_server_id),
    Field(description="The platform's id of the server (moref, UUID, instance id, ...)."),
]

_LVM_NAME = r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,127}"
_LV = rf"/dev/(?:mapper/{_LVM_NAME}|{_LVM_NAME}/{_LVM_NAME})"
_DISK = (
    r"/dev/(?:(?:sd|vd|xvd)[a-z]{1,2}[0-9]{0,3}|nvme[0-9]{1,3}n[0-9]{1,3}(?:p[0-9]{1,3})?"
    r"|md[0-9]{1,3}|disk/by-(?:id|uuid|path|partuuid)/[A-Za-z0-9][A-Za-z0-9:_.+-]{0,199})"
)

LvDevice = Annotated[
    str,
    StringConstraints(strict=True, max_length=300, pattern=rf"^{_LV}$"),
    Field(description="LVM logical volume: `/dev/<vg>/<lv>` or `/dev/mapper/<vg>-<lv>`."),
]
BlockDevice = Annotated[
    str,
    StringConstraints(strict=True, max_length=300, pattern=rf"^(?:{_LV}|{_DISK})$"),
    Field(description="A logical volume (`/dev/vg0/root`, `/dev/mapper/...`) or a disk "
                      "(`/dev/sdb`, `/dev/nvme0n1p2`, `/dev/disk/by-id/...`)."),
]

_WIN_PART = re.compile(r"^[A-Za-z0-9_.-](?:[A-Za-z0-9 _.-]{0,62}[A-Za-z0-9_.-])?$")
_WIN_SHARE = re.compile(r"^[A-Za-z0-9_.-](?:[A-Za-z0-9 _.-]{0,78}[A-Za-z0-9_.-])?\$?$")


def _windows_path(value: str) -> str:
    """``D:\\staging`` or ``\\\\server\\share\\dir``; plain characters only, no ``..``."""
    if value.startswith("\\\\"):
        host, _, rest = value[2:].partition("\\")
        share, _, tail = rest.partition("\\")
        _host(host)
        if not _WIN_SHARE.match(share):
            raise ValueError("UNC share name must be letters, digits, space, '_', '.', '-'")
        parts = tail.split("\\") if tail else []
    elif re.match(r"^[A-Za-z]:\\", value):
        parts = value[3:].split("\\") if len(value) > 3 else []
    else:
        raise ValueError(r"must be an absolute Windows path (D:\dir) or a UNC share (\\host\share)")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing backslash
    for part in parts:
        if part in (".", "..") or not _WIN_PART.match(part):
            raise ValueError(
                "path components must be letters, digits, space, '_', '.', '-' "
                "(no '.', '..', empty or reserved characters)"
            )
    return value


WindowsPath = Annotated[
    str,
    StringConstraints(strict=True, min_length=3, max_length=240),
    AfterValidator(_windows_path),
    Field(description="Staging directory on the source: `D:\\staging` or `\\\\nas\\share\\dir`."),
]


def _bounded_secret(max_length: int) -> Callable[[Any], Any]:
    """Type and length checks on a secret before it is wrapped, with messages that do
    not echo the value (pydantic's length message for SecretStr is also misleading)."""

    def check(value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not 1 <= len(value) <= max_length:
            raise ValueError(f"must be 1-{max_length} characters long")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    return check


_PEM = re.compile(
    r"^-----BEGIN ((?:OPENSSH|RSA|EC|DSA|ENCRYPTED) )?PRIVATE KEY-----\r?\n"
    r"[A-Za-z0-9+/=:,\-\r\n ]+"
    r"-----END \1?PRIVATE KEY-----\s*$"
)


def _private_key(value: SecretStr) -> SecretStr:
    if not _PEM.match(value.get_secret_value()):
        raise ValueError("must be a PEM or OpenSSH private key (-----BEGIN ... PRIVATE KEY-----)")
    return value


Password = Annotated[
    SecretStr,
    BeforeValidator(_bounded_secret(256)),
    Field(description="Write-only; stored encrypted.", json_schema_extra={"maxLength": 256}),
]
PrivateKey = Annotated[
    SecretStr,
    BeforeValidator(_bounded_secret(16384)),
    AfterValidator(_private_key),
    Field(description="PEM or OpenSSH private key. Write-only; stored encrypted.",
          json_schema_extra={"maxLength": 16384}),
]

_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _public_key(value: str) -> str:
    """An OpenSSH public key line whose blob really is base64 of a key of that type."""
    kind, _, rest = value.partition(" ")
    blob, _, _comment = rest.partition(" ")
    if kind not in _KEY_TYPES:
        raise ValueError(f"key type must be one of {', '.join(_KEY_TYPES)}")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("key data is not base64") from None
    n = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if raw[4 : 4 + n].decode("latin-1") != kind:
        raise ValueError("key data does not match the key type")
    return value


PublicKey = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, max_length=8192,
                      pattern=r"^[a-z0-9@.-]+ [A-Za-z0-9+/]+={0,2}(?: [\x20-\x7e]{0,256})?$"),
    AfterValidator(_public_key),
    Field(description="OpenSSH public key line (`ssh-ed25519 AAAA... comment`)."),
]
Fingerprint = Annotated[
    str,
    StringConstraints(strict=True, pattern=r"^SHA256:[A-Za-z0-9+/]{43}$"),
    Field(description="Pinned host key fingerprint as `ssh-keygen -lf` prints it."),
]
Throttle = Annotated[
    StrictInt,
    Field(ge=1024, le=10**12, description="Bandwidth cap in bytes per second."),
]
