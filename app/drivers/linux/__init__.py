"""The ``linux`` kind: a plain Linux host reached over SSH.

No driver class: the live-stream engine talks SSH to the host itself
(:mod:`app.transports.ssh`). The spec only declares the kind, its models and the one
role the engine gives it (a live-stream source).
"""

from __future__ import annotations

from pydantic import Field

from app.drivers.kit.spec import DriverSpec, Role
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import Host, Port, SshCredentials, SshFingerprint, StrictModel
from app.models.schemas.clouds import KindSchema


class LinuxSettings(StrictModel):
    host: Host
    port: Port = 22
    host_key_fingerprint: SshFingerprint | None = Field(
        default=None, description="Pinned host key; else the service's known_hosts decides."
    )


SPEC = DriverSpec(
    platform="Linux host (SSH)",
    kinds=(KindSchema(CloudKind.linux, "Linux", LinuxSettings, SshCredentials),),
    roles=frozenset({Role.live_stream_source}),
)
