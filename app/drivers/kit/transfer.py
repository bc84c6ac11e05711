"""Helpers every driver that moves disks needs: probe what an export sent, turn an
import's disk content into a filler, and remove what a failed import left behind."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from app.drivers.base import (
    CloudError,
    DestinationDriver,
    DiskFiller,
    ImportDisk,
    ServerLookup,
    filler_from_reader,
)
from app.errors import AppError, InvalidInput
from app.formats import probes
from app.formats.base import ImageReader
from app.models.enums import ImageFormat

log = logging.getLogger(__name__)

#: Bytes to read before probing (enough for every signature at the start of a disk).
PROBE_BYTES = 512

_HEAD_PROBES = {
    ImageFormat.vmdk: probes.vmdk_sparse,  # a stream is sparse (streamOptimized) or nothing
    ImageFormat.qcow2: probes.qcow2,
    ImageFormat.vhd: probes.vhd,  # a dynamic VHD has its footer copy at the start
}


def probe_stream_format(head: bytes, formats: Sequence[ImageFormat]) -> ImageFormat:
    """What a streamed disk is, from its first bytes, among the ``formats`` the platform
    may send (its ``export_formats``). Raw has no signature: it is what is left, if the
    platform may send raw; otherwise ``CloudError``."""
    for fmt in formats:
        probe = _HEAD_PROBES.get(fmt)
        if probe is not None and probe(head[:PROBE_BYTES]):
            return fmt
    if ImageFormat.raw in formats:
        return ImageFormat.raw
    raise CloudError(f"the exported disk is none of the formats expected "
                     f"({', '.join(f.value for f in formats)})")


def disk_filler(disk: ImportDisk, fmt: ImageFormat) -> DiskFiller:
    """The filler that writes ``disk`` in ``fmt``: the engine's own, or a conversion of
    a ready image (refused when the image is larger than the disk)."""
    if isinstance(disk.content, ImageReader):
        if disk.content.virtual_size > disk.capacity:
            raise InvalidInput(
                f"an image of {disk.content.virtual_size} bytes does not fit a disk of "
                f"{disk.capacity} bytes"
            )
        return filler_from_reader(disk.content, fmt)
    return disk.content


async def remove_partial(driver: DestinationDriver, ref: ServerLookup, *, marker: str,
                         name: str) -> None:
    """Destroy what a failed import left (only a VM carrying ``marker``); logs and
    swallows its own errors, as it runs while the import's error propagates."""
    try:
        if await driver.destroy_vm(ref, marker=marker):
            log.info("removed the partly imported VM %s", name)
    except AppError as exc:
        log.warning("could not remove the partly imported VM %s: %s", name, exc)
