"""Field types and models shared by the platforms' settings and credentials.

A platform package (``app/drivers/<platform>/models.py``) builds its settings,
credentials and placement models from these, so every platform validates host names,
ports, TLS options and secrets the same way. Unknown fields are errors everywhere
(:class:`StrictModel`): a misspelt option must never be silently ignored. Secrets are
``SecretStr``: their ``repr``/``str`` is masked.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    model_validator,
)

from app.models.schemas.fields import NotMetadata

Name = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]


def _host(value: str) -> str:
    """A DNS name, an IPv4 address or an IPv6 address (brackets optional)."""
    if ":" in value:
        try:
            return str(ipaddress.IPv6Address(value.removeprefix("[").removesuffix("]")))
        except ValueError:
            raise ValueError("not a host name or IP address (no scheme or port here)") from None
    return value


Host = Annotated[
    str,
    StringConstraints(max_length=253, pattern=r"^[A-Za-z0-9_:\[][A-Za-z0-9_.:\[\]-]*$"),
    AfterValidator(_host), NotMetadata,
    Field(description="DNS name or IP address (no scheme, no port)."),
]
# Strict: "443" or true is a client bug to report, not something to guess about.
Port = Annotated[int, Field(ge=1, le=65535, strict=True)]
Flag = Annotated[bool, Field(strict=True)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
Username = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Secret = Annotated[SecretStr, Field(min_length=1, max_length=4096)]
PemBundle = Annotated[
    str,
    StringConstraints(max_length=65536, pattern=r"-----BEGIN CERTIFICATE-----"),
    Field(description="PEM CA certificates trusted for this endpoint, instead of the system's."),
]
CertFingerprint = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}$|^[0-9A-Fa-f]{64}$"),
    Field(description="Pinned SHA-256 fingerprint of the server certificate (hex)."),
]
SshFingerprint = Annotated[
    str,
    StringConstraints(pattern=r"^SHA256:[A-Za-z0-9+/]{43}=?$"),
    Field(description="Pinned host key fingerprint as `ssh-keygen -l` prints it."),
]


class StrictModel(BaseModel):
    """Unknown fields are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TlsOptions(StrictModel):
    verify_tls: Flag = Field(
        default=True, description="Verify the server certificate. Only opt out deliberately."
    )
    ca_bundle: PemBundle | None = None
    tls_fingerprint: CertFingerprint | None = None


class PasswordCredentials(StrictModel):
    """A user name and a password (vSphere; most platforms with a login)."""

    username: Username
    password: Secret


class SshCredentials(StrictModel):
    """At least one of ``password`` and ``private_key``."""

    username: Username
    password: Secret | None = None
    private_key: Annotated[SecretStr, Field(min_length=1, max_length=16384)] | None = Field(
        default=None, description="PEM or OpenSSH private key."
    )
    passphrase: Secret | None = None

    @model_validator(mode="after")
    def _one_way_in(self) -> SshCredentials:
        if self.password is None and self.private_key is None:
            raise ValueError("give a password or a private_key")
        key = self.private_key
        if key is not None and "-----BEGIN " not in key.get_secret_value():
            raise ValueError("private_key must be a PEM or OpenSSH private key")
        return self
