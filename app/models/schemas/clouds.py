"""Request and response schemas for ``/v1/clouds``.

A cloud has a ``kind`` and two objects whose shape depends on it: ``settings`` (how to
reach it: host, region, TLS policy; returned by the API) and ``credentials`` (who to
be: passwords, keys; encrypted at rest and **write-only**). Each kind gets its own
models so a client learns from the OpenAPI document exactly which fields apply, and a
typo (``verfy_tls``) is an "unknown field" error rather than a silently ignored key.

Secrets are ``SecretStr``: their ``repr``/``str`` is masked, so an accidental log line
or error message cannot print them.
"""

from __future__ import annotations

import ipaddress
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    SecretStr,
    StringConstraints,
    field_validator,
    model_validator,
)

from app.models.enums import CloudKind
from app.models.schemas.fields import NotMetadata, NotMetadataUrl

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


class _Strict(BaseModel):
    """Unknown fields are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# --- settings (non-secret, returned by the API) ---------------------------------------


class TlsOptions(_Strict):
    verify_tls: Flag = Field(
        default=True, description="Verify the server certificate. Only opt out deliberately."
    )
    ca_bundle: PemBundle | None = None
    tls_fingerprint: CertFingerprint | None = None


class VsphereSettings(TlsOptions):
    """vCenter (``vmware``) or a standalone ESXi host (``esxi``)."""

    host: Host
    port: Port = 443
    datacenter: Text | None = Field(default=None, description="Default datacenter.")


class OpenStackSettings(TlsOptions):
    """Keystone v3 (``openstack`` and ``metapod``, which is OpenStack-based)."""

    auth_url: Annotated[HttpUrl, NotMetadataUrl]
    project: Text
    domain: Text = Field(default="Default", description="User and project domain.")
    region: Text | None = None


class XenSettings(TlsOptions):
    url: Annotated[HttpUrl, NotMetadataUrl] = Field(
        description="XAPI endpoint of the pool master, e.g. https://xen1.")


class NutanixSettings(TlsOptions):
    host: Host
    port: Port = 9440


class HyperVSettings(TlsOptions):
    host: Host
    winrm_port: Port = 5986
    use_tls: Flag = Field(default=True, description="WinRM over HTTPS (5986) rather than HTTP.")


class AzureSettings(_Strict):
    subscription_id: uuid.UUID
    tenant_id: uuid.UUID
    resource_group: Annotated[
        str, StringConstraints(min_length=1, max_length=90, pattern=r"^[-\w._()]+$")
    ]
    location: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{2,40}$")] = Field(
        description="Azure region name, e.g. westeurope."
    )


class AmazonSettings(TlsOptions):
    region: Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")]
    endpoint_url: Annotated[HttpUrl, NotMetadataUrl] | None = Field(
        default=None, description="Custom EC2/S3 endpoint (regional or compatible); AWS if null."
    )


class SoftLayerSettings(TlsOptions):
    endpoint_url: Annotated[HttpUrl, NotMetadataUrl] | None = Field(
        default=None, description="SoftLayer API endpoint; the public one if null."
    )


class LinuxSettings(_Strict):
    host: Host
    port: Port = 22
    host_key_fingerprint: SshFingerprint | None = Field(
        default=None, description="Pinned host key; else the service's known_hosts decides."
    )


# --- credentials (secret, write-only) -------------------------------------------------


class PasswordCredentials(_Strict):
    """vmware, esxi, openstack, metapod, xen, nutanix, hyperv (WinRM)."""

    username: Username
    password: Secret


class AzureCredentials(_Strict):
    """A service principal."""

    client_id: uuid.UUID
    client_secret: Secret


class AmazonCredentials(_Strict):
    access_key_id: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{16,128}$")]
    secret_access_key: Secret
    session_token: Secret | None = None


class SoftLayerCredentials(_Strict):
    username: Username
    api_key: Secret


class SshCredentials(_Strict):
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


#: The settings model of each kind; the API validates PATCHed settings against it.
SETTINGS_MODELS: dict[CloudKind, type[BaseModel]] = {
    CloudKind.vmware: VsphereSettings,
    CloudKind.esxi: VsphereSettings,
    CloudKind.openstack: OpenStackSettings,
    CloudKind.metapod: OpenStackSettings,
    CloudKind.xen: XenSettings,
    CloudKind.nutanix: NutanixSettings,
    CloudKind.hyperv: HyperVSettings,
    CloudKind.azure: AzureSettings,
    CloudKind.amazon: AmazonSettings,
    CloudKind.softlayer: SoftLayerSettings,
    CloudKind.linux: LinuxSettings,
}

#: The credentials model of each kind.
CREDENTIALS_MODELS: dict[CloudKind, type[BaseModel]] = {
    CloudKind.vmware: PasswordCredentials,
    CloudKind.esxi: PasswordCredentials,
    CloudKind.openstack: PasswordCredentials,
    CloudKind.metapod: PasswordCredentials,
    CloudKind.xen: PasswordCredentials,
    CloudKind.nutanix: PasswordCredentials,
    CloudKind.hyperv: PasswordCredentials,
    CloudKind.azure: AzureCredentials,
    CloudKind.amazon: AmazonCredentials,
    CloudKind.softlayer: SoftLayerCredentials,
    CloudKind.linux: SshCredentials,
}


def reveal(credentials: BaseModel) -> dict[str, Any]:
    """The plain values to encrypt: ``SecretStr`` unwrapped, absent fields dropped."""
    out: dict[str, Any] = {}
    for field, value in credentials.model_dump(mode="python", exclude_none=True).items():
        if isinstance(value, SecretStr):
            out[field] = value.get_secret_value()
        elif isinstance(value, uuid.UUID):
            out[field] = str(value)
        else:
            out[field] = value
    return out


# --- create: one model per kind, discriminated by ``kind`` ----------------------------


class _CloudCreate(_Strict):
    name: Name = Field(description="Unique within the tenant.")


class VmwareCloudCreate(_CloudCreate):
    kind: Literal["vmware"]
    settings: VsphereSettings
    credentials: PasswordCredentials | None = None


class EsxiCloudCreate(_CloudCreate):
    kind: Literal["esxi"]
    settings: VsphereSettings
    credentials: PasswordCredentials | None = None


class OpenStackCloudCreate(_CloudCreate):
    kind: Literal["openstack"]
    settings: OpenStackSettings
    credentials: PasswordCredentials | None = None


class MetapodCloudCreate(_CloudCreate):
    kind: Literal["metapod"]
    settings: OpenStackSettings
    credentials: PasswordCredentials | None = None


class XenCloudCreate(_CloudCreate):
    kind: Literal["xen"]
    settings: XenSettings
    credentials: PasswordCredentials | None = None


class NutanixCloudCreate(_CloudCreate):
    kind: Literal["nutanix"]
    settings: NutanixSettings
    credentials: PasswordCredentials | None = None


class HyperVCloudCreate(_CloudCreate):
    kind: Literal["hyperv"]
    settings: HyperVSettings
    credentials: PasswordCredentials | None = None


class AzureCloudCreate(_CloudCreate):
    kind: Literal["azure"]
    settings: AzureSettings
    credentials: AzureCredentials | None = None


class AmazonCloudCreate(_CloudCreate):
    kind: Literal["amazon"]
    settings: AmazonSettings
    credentials: AmazonCredentials | None = None


class SoftLayerCloudCreate(_CloudCreate):
    kind: Literal["softlayer"]
    settings: SoftLayerSettings = Field(default_factory=SoftLayerSettings)
    credentials: SoftLayerCredentials | None = None


class LinuxCloudCreate(_CloudCreate):
    kind: Literal["linux"]
    settings: LinuxSettings
    credentials: SshCredentials | None = None


CloudCreate = Annotated[
    VmwareCloudCreate
    | EsxiCloudCreate
    | OpenStackCloudCreate
    | MetapodCloudCreate
    | XenCloudCreate
    | NutanixCloudCreate
    | HyperVCloudCreate
    | AzureCloudCreate
    | AmazonCloudCreate
    | SoftLayerCloudCreate
    | LinuxCloudCreate,
    Field(discriminator="kind"),
]


# --- update and read ------------------------------------------------------------------


class CloudUpdate(_Strict):
    """Fields to change. ``kind`` cannot change (register a new cloud instead)."""

    name: Name | None = None
    settings: dict[str, Any] | None = Field(
        default=None,
        description="Replaces the settings as a whole; validated against the kind's "
        "settings schema (e.g. VsphereSettings).",
    )
    credentials: dict[str, Any] | None = Field(
        default=None,
        description="Replaces the stored credentials as a whole (kind's credentials "
        "schema); null removes them.",
    )

    @field_validator("name", "settings")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Only runs for values that were sent: an explicit null is an error, absence is not.
        if value is None:
            raise ValueError("must not be null; leave the field out to keep it")
        return value


class CloudOut(BaseModel):
    """A cloud as the API shows it: everything except the credentials' values."""

    id: uuid.UUID
    name: str
    kind: CloudKind
    settings: dict[str, Any] = Field(description="The kind's settings schema, defaults filled.")
    credentials_set: list[str] = Field(
        description="Names of the stored credential fields (their values are write-only)."
    )
    version: int = Field(description="Bumped on every change; the ETag is `\"v<version>\"`.")
    created_at: datetime
    updated_at: datetime
