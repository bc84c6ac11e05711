"""Request and response schemas for ``/v1/clouds``.

A cloud has a ``kind`` and two objects whose shape depends on it: ``settings`` (how to
reach it: host, region, TLS policy; returned by the API) and ``credentials`` (who to
be: passwords, keys; encrypted at rest and **write-only**). Each kind has its own
models, declared by the platform's driver spec (:class:`KindSchema`); the create body
is the union of one model per *registered* kind (:func:`cloud_create_union`, built by
:mod:`app.services.clouds` from :mod:`app.drivers.registry`), discriminated by
``kind``, so a client learns from the OpenAPI document exactly which kinds and fields
apply, and a kind no driver serves is refused at the door.

Secrets are ``SecretStr``: their ``repr``/``str`` is masked, so an accidental log line
or error message cannot print them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, SecretStr, create_model, field_validator

from app.models.enums import CloudKind, ImageFormat
from app.models.schemas.cloud_fields import Name, StrictModel


@dataclass(frozen=True, slots=True)
class KindSchema:
    """The API's models for one cloud kind; ``title`` names its create schema
    (``"Vmware"`` -> ``VmwareCloudCreate``)."""

    kind: CloudKind
    title: str
    settings: type[BaseModel]
    credentials: type[BaseModel]


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


# --- create: one model per registered kind, discriminated by ``kind`` -----------------


class CloudCreateBase(StrictModel):
    """What every create body has; ``kind``, ``settings`` and ``credentials`` per kind."""

    name: Name = Field(description="Unique within the tenant.")
    kind: CloudKind
    settings: BaseModel
    credentials: BaseModel | None = None


def _defaults_only(model: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in model.model_fields.values())


def cloud_create_model(schema: KindSchema) -> type[CloudCreateBase]:
    """The create body of one kind (``<Title>CloudCreate``)."""
    settings_default: Any = (
        Field(default_factory=schema.settings) if _defaults_only(schema.settings) else ...
    )
    kind: Any = Literal[schema.kind.value]  # a type made at run time
    credentials: Any = schema.credentials | None
    model: type[CloudCreateBase] = create_model(
        f"{schema.title}CloudCreate",
        __base__=CloudCreateBase,
        __module__=__name__,
        kind=(kind, ...),
        settings=(schema.settings, settings_default),
        credentials=(credentials, None),
    )
    return model


def cloud_create_union(schemas: Sequence[KindSchema]) -> Any:
    """The ``POST /v1/clouds`` body: one model per kind, discriminated by ``kind``.

    A type built at run time, so it is typed ``Any`` here; its members are
    :class:`CloudCreateBase` subclasses.
    """
    models = tuple(cloud_create_model(s) for s in schemas)
    if len(models) == 1:
        return models[0]
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007


# --- update and read ------------------------------------------------------------------


class CloudUpdate(StrictModel):
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


# --- what each registered kind is -----------------------------------------------------


_PLACEMENT = ("The destination fields a hypervisor migration to it takes (all null: the "
              "platform's defaults); any other placement field is refused.")


class CloudKindBase(BaseModel):
    """A cloud kind this deployment has a driver for, and what it can do."""

    kind: CloudKind
    platform: str
    roles: list[str] = Field(
        description="What a cloud of this kind can be in a migration today (its driver and "
        "an engine for it): hypervisor_source, hypervisor_destination, live_stream_source, ...")
    import_formats: list[ImageFormat] = Field(
        description="Disk formats a new VM on it is made from, preferred first.")
    export_formats: list[ImageFormat] = Field(description="Disk formats its exports arrive in.")
    settings_schema: str = Field(description="Name of its settings schema.")
    credentials_schema: str = Field(description="Name of its credentials schema.")
    placement: BaseModel = Field(description=_PLACEMENT)


def cloud_kind_out_model(placements: Sequence[type[BaseModel]]) -> type[CloudKindBase]:
    """:class:`CloudKindBase` with ``placement`` typed as the registered placement models
    (so they appear, with their descriptions, in the OpenAPI document)."""
    unique = tuple(dict.fromkeys(placements))
    placement: Any = unique[0] if len(unique) == 1 else Union[unique]  # noqa: UP007
    model: type[CloudKindBase] = create_model(
        "CloudKindOut", __base__=CloudKindBase, __module__=__name__,
        placement=(placement, Field(description=_PLACEMENT)))
    return model
