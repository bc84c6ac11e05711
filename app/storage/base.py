"""The virtual image library's storage: where image bytes live.

A backend stores opaque objects under keys. Writes are staged: image writers need a
seekable file (qcow2 and VHD dynamic write their tables last), so every store first
writes a staging file on local disk, then :meth:`ImageStore.publish` makes it visible
atomically (a rename for the local directory, a completed multipart upload for S3).
A failed or cancelled store calls :meth:`StagedImage.discard` and leaves nothing
visible. Reads are random access (``read_at``), so any reader format works on them.
"""

from __future__ import annotations

import abc
import asyncio
import os
import uuid
from pathlib import Path

from app.errors import AppError, NotFound
from app.formats.base import RandomAccessSource
from app.formats.io import FileSink


class StorageError(AppError):
    status = 502
    code = "storage-error"
    title = "Image storage failed"
    retryable = True


class StagedImage:
    """A local staging file that becomes a library object on publish."""

    def __init__(self, store: ImageStore, key: str, path: Path) -> None:
        self.store = store
        self.key = key
        self.path = path

    def sink(self) -> FileSink:
        """A seekable sink over the staging file (for an image writer)."""
        return FileSink(self.path, create=not self.path.exists())

    async def publish(self) -> int:
        """Make the object visible under ``key``; returns its size in bytes."""
        return await self.store.publish(self)

    async def discard(self) -> None:
        await asyncio.to_thread(self.path.unlink, missing_ok=True)


class ImageStore(abc.ABC):
    """One storage backend of the library."""

    def __init__(self, staging_dir: Path) -> None:
        self.staging_dir = staging_dir

    def stage(self, key: str | None = None, *, stable: bool = False) -> StagedImage:
        """A staging file; ``key`` defaults to a fresh unique key.

        ``stable``: the staging path depends on the key alone, so a resumed migration on
        another worker finds the staging file of an earlier attempt (the caller owns
        uniqueness, e.g. a key derived from the migration id).
        """
        key = key or uuid.uuid4().hex
        check_key(key)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if stable else f".{uuid.uuid4().hex[:8]}"
        return StagedImage(self, key, self.staging_dir / f"{key}{suffix}.part")

    @abc.abstractmethod
    async def publish(self, staged: StagedImage) -> int:
        """Move a staged file to its key atomically; raises :class:`StorageError`."""

    @abc.abstractmethod
    async def open(self, key: str) -> RandomAccessSource:
        """Random access to a stored object; raises :class:`NotFound`."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove an object; deleting a missing object is not an error."""

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """Size in bytes; raises :class:`NotFound`."""


def check_key(key: str) -> None:
    if not key or len(key) > 200 or not all(c.isalnum() or c in "-_." for c in key) \
            or key.startswith("."):
        raise ValueError(f"bad storage key {key!r}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_found(key: str) -> NotFound:
    return NotFound(f"image object {key} is not in the library storage")
