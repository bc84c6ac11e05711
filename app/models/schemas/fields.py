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
from pydantic_core import PydanticCustomError

__all__ = [
    "AccountName",
    "BlockDevice",
    "Fingerprint",
    "Host",
    "Label",
    "LvDevice",
    "Name",
    "NotMetadata",
    "NotMetadataUrl",
    "Password",
    "Port",
    "PosixUser",
    "PrivateKey",
    "PublicKey",
    "ServerId",
    "SnapshotSize",
    "Throttle",
    "WinRMPort",
    "WindowsPath",
    "WindowsUser",
]


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is exactly ``message`` (no "Value error," prefix)."""
    return PydanticCustomError("invalid", message)


def _grammar(pattern: str, expected: str, max_length: int) -> tuple[Any, ...]:
    """Annotated metadata for a string with an exact grammar: the pattern is documented
    in the JSON schema, and a mismatch says what was expected instead of the regex."""
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise invalid(f"must be {expected}")
        return value

    return (
        StringConstraints(strict=True, max_length=max_length),
        AfterValidator(check),
        Field(
            description=f"Must be {expected}.", json_schema_extra={"pattern": f"^(?:{pattern})$"}
        ),
    )


Port = Annotated[StrictInt, Field(ge=1, le=65535, description="TCP port, 1-65535.")]
WinRMPort = Annotated[StrictInt, Field(ge=1, le=65535, description="WinRM port (HTTPS: 5986).")]


def _printable(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise invalid("must not contain control characters (newlines, tabs, ...)")
    return value


Name = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=128),
    AfterValidator(_printable),
]
#: A free-form label (server name, datastore, flavor): printable, 1-255 characters.
Label = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=255),
    AfterValidator(_printable),
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
        raise invalid("must be a DNS hostname or an IP address (no scheme, port or path)")
    if labels[-1].isdigit():
        raise invalid("is neither a valid IP address nor a hostname")
    return value.lower()


Host = Annotated[
    str,
    StringConstraints(strict=True, min_length=1, max_length=253),
    AfterValidator(_host),
    Field(description="DNS hostname or IP address (no scheme, port or path)."),
]


#: NAT64 (RFC 6052): the last 32 bits are an IPv4 address a gateway will connect to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, 6to4, Teredo client, NAT64)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


#: Instance metadata services outside the link-local ranges, and their names.
_METADATA_ADDRESSES = frozenset({
    ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("168.63.129.16"),  # Azure wire server
})
_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog",
                             "instance-data", "instance-data.ec2.internal"})


def is_metadata_host(host: str) -> bool:
    """Whether ``host`` (a name or an address literal) is a link-local or cloud
    instance-metadata address (169.254.169.254 and the like): a worker must never
    connect there on a user's behalf, since the answer is the service's own identity."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name in _METADATA_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        address = embedded_ipv4(address) or address
    return address.is_link_local or address in _METADATA_ADDRESSES


def not_metadata_host(value: str) -> str:
    """Refuse link-local and cloud instance-metadata hosts (169.254.169.254, fe80::/10,
    metadata.google.internal, ...): a worker connecting there would talk to the
    metadata service of the machine it runs on, with the service's own identity."""
    if is_metadata_host(value):
        raise invalid("must not be a link-local or cloud metadata address")
    return value


#: Apply to any host a worker will connect to: ``Annotated[Host, NotMetadata]``.
NotMetadata = AfterValidator(not_metadata_host)


def _url_not_metadata(value: Any) -> Any:
    host = getattr(value, "host", None)
    if isinstance(host, str) and is_metadata_host(host):
        raise invalid("must not point at a link-local or cloud metadata address")
    return value


#: The same for a URL a worker will connect to: ``Annotated[HttpUrl, NotMetadataUrl]``.
NotMetadataUrl = AfterValidator(_url_not_metadata)

PosixUser = Annotated[
    str,
    *_grammar(
        r"[A-Za-z_][A-Za-z0-9_.-]{0,31}",
        "a POSIX login name (letters, digits, '_', '.', '-'; at most 32)",
        32,
    ),
]
WindowsUser = Annotated[
    str,
    *_grammar(
        r"(?:(?:\.|[A-Za-z0-9][A-Za-z0-9._-]{0,62})\\)?[A-Za-z0-9][A-Za-z0-9._@-]{0,103}",
        r"a Windows account: user, DOMAIN\user, .\user or user@domain",
        170,
    ),
]
AccountName = Annotated[
    str,
    *_grammar(
        r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}\\)?[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}",
        "an account name such as root, DOMAIN\\user or administrator@vsphere.local",
        192,
    ),
]


def _server_id(value: str) -> str:
    if ".." in value or "//" in value:
        raise invalid("must not contain '..' or '//'")
    return value


ServerId = Annotated[
    str,
    *_grammar(
        r"[A-Za-z0-9/][A-Za-z0-9._:/@-]{0,254}",
        "the platform's server id (moref, UUID, instance id): letters, digits and ._:/@-",
        255,
    ),
    AfterValidator(_server_id),
]

_LVM_NAME = r"[A-Za-z0-9][A-Za-z0-9+_.-]{0,127}"
_LV = rf"/dev/(?:mapper/{_LVM_NAME}|{_LVM_NAME}/{_LVM_NAME})"
_DISK = (
    r"/dev/(?:(?:sd|vd|xvd)[a-z]{1,2}[0-9]{0,3}|nvme[0-9]{1,3}n[0-9]{1,3}(?:p[0-9]{1,3})?"
    r"|md[0-9]{1,3}|loop[0-9]{1,4}|disk/by-(?:id|uuid|path|partuuid)/[A-Za-z0-9][A-Za-z0-9:_.+-]{0,199})"
)

LvDevice = Annotated[
    str,
    *_grammar(
        _LV,
        "an LVM logical volume, /dev/<vg>/<lv> or /dev/mapper/<vg>-<lv> "
        "(names of letters, digits and +_.-)",
        300,
    ),
]
BlockDevice = Annotated[
    str,
    *_grammar(
        rf"{_LV}|{_DISK}",
        "a logical volume (/dev/vg0/root, /dev/mapper/vg0-root) or "
        "a disk (/dev/sdb, /dev/vda2, /dev/nvme0n1p2, /dev/loop0, "
        "/dev/disk/by-id/...)",
        300,
    ),
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
            raise invalid("UNC share name must be letters, digits, space, '_', '.', '-'")
        parts = tail.split("\\") if tail else []
    elif re.match(r"^[A-Za-z]:\\", value):
        parts = value[3:].split("\\") if len(value) > 3 else []
    else:
        raise invalid(r"must be an absolute Windows path (D:\dir) or a UNC share (\\host\share)")
    if parts and parts[-1] == "":
        parts.pop()  # one trailing backslash
    for part in parts:
        if part in (".", "..") or not _WIN_PART.match(part):
            raise invalid(
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
            raise invalid("must be a string")
        if not 1 <= len(value) <= max_length:
            raise invalid(f"must be 1-{max_length} characters long")
        if "\x00" in value:
            raise invalid("must not contain NUL characters")
        return value

    return check


_PEM = re.compile(
    r"^-----BEGIN ((?:OPENSSH|RSA|EC|DSA|ENCRYPTED) )?PRIVATE KEY-----\r?\n"
    r"[A-Za-z0-9+/=:,\-\r\n ]+"
    r"-----END \1?PRIVATE KEY-----\s*$"
)


def _private_key(value: SecretStr) -> SecretStr:
    if not _PEM.match(value.get_secret_value()):
        raise invalid("must be a PEM or OpenSSH private key (-----BEGIN ... PRIVATE KEY-----)")
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
    Field(
        description="PEM or OpenSSH private key. Write-only; stored encrypted.",
        json_schema_extra={"maxLength": 16384},
    ),
]

_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _public_key(value: str) -> str:
    """An OpenSSH public key line whose blob really is base64 of a key of that type."""
    kind, _, rest = value.partition(" ")
    blob, _, _comment = rest.partition(" ")
    if kind not in _KEY_TYPES:
        raise invalid(f"key type must be one of {', '.join(_KEY_TYPES)}")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("key data is not base64") from None
    n = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if raw[4 : 4 + n].decode("latin-1") != kind:
        raise invalid("key data does not match the key type")
    return value


PublicKey = Annotated[
    str,
    *_grammar(
        r"[a-z0-9@.-]+ [A-Za-z0-9+/]+={0,2}(?: [\x20-\x7e]{0,256})?",
        "an OpenSSH public key line: <type> <base64> [comment]",
        8192,
    ),
    AfterValidator(_public_key),
]
Fingerprint = Annotated[
    str,
    *_grammar(
        r"SHA256:[A-Za-z0-9+/]{43}",
        "a host key fingerprint as ssh-keygen -lf prints it (SHA256:<43 base64>)",
        50,
    ),
]
Throttle = Annotated[
    StrictInt,
    Field(ge=1024, le=10**12, description="Bandwidth cap in bytes per second."),
]
SnapshotSize = Annotated[
    StrictInt,
    Field(ge=4 * 1024 * 1024, le=2**50,
          description="Bytes of copy-on-write space for an LVM snapshot (at least 4 MiB)."),
]
