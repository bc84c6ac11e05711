"""Stored migration specs, typed: what a worker reads back from ``migrations.spec``.

A migration's request is stored without its secrets (:func:`.migrations.split_secrets`
replaces each by ``<name>_set``). The models here validate that stored JSON back into
the per-type request models, secret-free, so engines read ``spec.source.server.name``
rather than ``spec["source"]["server"]["name"]``. The secrets themselves come apart, as
:class:`MigrationSecrets` (decrypted only in a worker, never persisted or logged).

:func:`source_key` derives the per-source-host claim limit's key from a typed request;
it is written to ``migrations.source_key`` on insert.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SecretStr, Tag, TypeAdapter

from app.models.enums import ImageFormat
from app.models.json import JSON
from app.models.schemas.migrations import (
    ExistingHostDestinationOut,
    HypervisorSourceOut,
    ImageExtractSourceOut,
    LibraryImageSource,
    LiveStreamSourceOut,
    NewVmDestination,
    Options,
    _HypervisorCommon,
    _ImageExtractCommon,
    _LiveStreamCommon,
    _source_kind,
)


class HypervisorSpec(_HypervisorCommon):
    """A stored ``hypervisor`` migration: a VM in a cloud or a library image."""

    source: Annotated[
        Annotated[HypervisorSourceOut, Tag("source:vm")]
        | Annotated[LibraryImageSource, Tag("source:image")],
        Discriminator(_source_kind),
    ]


class ImageExtractSpec(_ImageExtractCommon):
    source: ImageExtractSourceOut


class LiveStreamSpec(_LiveStreamCommon):
    source: LiveStreamSourceOut
    destination: Annotated[
        ExistingHostDestinationOut | NewVmDestination, Field(discriminator="kind")]


class ConversionSpec(BaseModel):
    """A stored library conversion job (``POST /v1/images/{id}/conversions``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["conversion"]
    image_id: uuid.UUID
    format: ImageFormat
    options: Options = Field(default_factory=Options)
    image_name: str | None = Field(
        default=None, description="The new image's name (the conversion's name).")


StoredSpec = HypervisorSpec | ImageExtractSpec | LiveStreamSpec | ConversionSpec
_STORED: TypeAdapter[StoredSpec] = TypeAdapter(
    Annotated[StoredSpec, Field(discriminator="type")])


def load_spec(data: JSON) -> StoredSpec:
    """The typed spec of a stored migration; raises ``pydantic.ValidationError``."""
    return _STORED.validate_python(data)


def source_key(spec: StoredSpec) -> str:
    """Key of the per-source-host claim limit: the source's host when the request names
    one, else its cloud; "" when the source is no host (a library image)."""
    match spec:
        case HypervisorSpec(source=HypervisorSourceOut() as src):
            return src.host or str(src.cloud_id)
        case ImageExtractSpec() | LiveStreamSpec():
            return spec.source.host
    return ""


class SideSecrets(BaseModel):
    """The secrets of one side of a migration (source or destination)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    password: SecretStr | None = None
    private_key: SecretStr | None = None


class MigrationSecrets(BaseModel):
    """A migration's secrets, decrypted: the one typed way engines read them."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: SideSecrets = Field(default_factory=SideSecrets)
    destination: SideSecrets = Field(default_factory=SideSecrets)

    @classmethod
    def from_paths(cls, values: Mapping[str, str]) -> MigrationSecrets:
        """From the sealed form: secrets by dotted path (``source.password``)."""
        sides: dict[str, dict[str, SecretStr]] = {}
        for path, value in values.items():
            side, _, name = path.partition(".")
            sides.setdefault(side, {})[name] = SecretStr(value)
        return cls.model_validate(sides)


__all__ = [
    "ConversionSpec",
    "HypervisorSpec",
    "ImageExtractSpec",
    "LiveStreamSpec",
    "MigrationSecrets",
    "SideSecrets",
    "StoredSpec",
    "load_spec",
    "source_key",
]
