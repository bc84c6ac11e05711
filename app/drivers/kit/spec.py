"""One declaration per platform: :class:`DriverSpec`.

A platform package declares, once, what the rest of the service needs to know about
it: the cloud kinds it serves, the pydantic models of their settings, credentials and
placement (they appear in the OpenAPI document), the :class:`Role`\\ s its driver can
play, the disk formats it exports and imports, and the factories that build its
driver from a :class:`~app.drivers.kit.connection.CloudConnection`. The registry
(:mod:`app.drivers.registry`) derives from the registered specs the cloud schema
accepted by ``POST /v1/clouds``, the capability matrix the API checks, the import
formats and the "what works" table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from app.drivers.base import DestinationDriver, DriverCapabilities, Placement, SourceDriver
from app.drivers.kit.connection import CloudConnection
from app.models.enums import CloudKind
from app.models.schemas.clouds import KindSchema


class Role(StrEnum):
    """A part a cloud plays in a migration."""

    hypervisor_source = "hypervisor_source"
    hypervisor_destination = "hypervisor_destination"
    image_extract_source = "image_extract_source"
    image_extract_destination = "image_extract_destination"
    live_stream_source = "live_stream_source"
    live_stream_new_destination = "live_stream_new_destination"

    @property
    def described(self) -> str:
        """How an error message names the role: "be the source of a hypervisor migration"."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS: dict[Role, str] = {
    Role.hypervisor_source: "be the source of a hypervisor migration",
    Role.hypervisor_destination: "be the destination of a hypervisor migration (mode new)",
    Role.image_extract_source: "be the source of an image extract",
    Role.image_extract_destination: "be the destination of an image extract",
    Role.live_stream_source: "be the source of a live stream",
    Role.live_stream_new_destination: "provision a new live-stream destination",
}

SourceFactory = Callable[[CloudConnection], SourceDriver]
DestinationFactory = Callable[[CloudConnection], DestinationDriver]


@dataclass(frozen=True, slots=True)
class DriverSpec:
    """Everything the service needs to know about one platform.

    ``roles`` are what the platform's driver can do. ``source``/``destination`` build
    its (not yet connected) driver; a role that needs one (``hypervisor_source``,
    ``hypervisor_destination``) must have it. A spec with neither declares a kind that
    only an engine uses (``linux``: a plain SSH host, a live-stream source).
    ``endpoint_fields`` are the settings fields (host, port) the migration wizard's
    "Host" and "Remote Port" override for a source, when the settings have them.
    """

    platform: str
    kinds: tuple[KindSchema, ...]
    roles: frozenset[Role]
    placement: type[Placement] = Placement
    capabilities: DriverCapabilities = field(default_factory=DriverCapabilities)
    source: SourceFactory | None = None
    destination: DestinationFactory | None = None
    endpoint_fields: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if Role.hypervisor_source in self.roles and self.source is None:
            raise ValueError(f"{self.platform}: hypervisor_source needs a source factory")
        if Role.hypervisor_destination in self.roles and (
            self.destination is None or not self.capabilities.import_formats
        ):
            raise ValueError(
                f"{self.platform}: hypervisor_destination needs a destination factory "
                "and import formats"
            )

    @property
    def kind_names(self) -> tuple[CloudKind, ...]:
        return tuple(k.kind for k in self.kinds)

    def schema(self, kind: CloudKind) -> KindSchema:
        return next(k for k in self.kinds if k.kind is kind)
