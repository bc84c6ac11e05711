"""Schemas of the virtual image library."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: The formats a library image can be converted into (every format with a writer).
ConversionFormat = Literal["raw", "qcow2", "vmdk", "vhd", "vhdx"]


class ImageOut(BaseModel):
    """A library image. Images are immutable: a conversion makes a new image whose
    ``parent_id`` names the one it came from."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    status: str = Field(description="creating, ready or failed")
    format: str = Field(description="raw, qcow2, vmdk, vhd or vhdx")
    virtual_size: int = Field(description="Size of the virtual disk in bytes")
    size: int = Field(description="Size of the stored image file in bytes")
    digest: str | None = Field(
        description="vmd1 digest of the virtual disk (docs/digest.md): equal digests mean "
        "equal disks, whatever the format"
    )
    migration_id: uuid.UUID | None = Field(description="The migration that produced it")
    cloud_id: uuid.UUID | None = Field(description="The cloud its source VM lived in")
    server: str | None = Field(description="The source server")
    parent_id: uuid.UUID | None = Field(description="The image it was converted from")
    created_at: datetime
