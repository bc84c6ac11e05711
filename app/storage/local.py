"""Library storage in a local directory (the default: ``DATA_DIR/library``)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from app.formats.base import RandomAccessSource
from app.formats.io import FileSource
from app.storage.base import ImageStore, StagedImage, check_key, fsync_dir, not_found


class LocalStore(ImageStore):
    """Objects are files ``root/objects/<key>``; staging is ``root/staging`` (same
    filesystem, so publishing is an atomic rename after an fsync)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "staging")
        self.objects = root / "objects"

    def _path(self, key: str) -> Path:
        check_key(key)
        return self.objects / key

    async def publish(self, staged: StagedImage) -> int:
        def move() -> int:
            self.objects.mkdir(parents=True, exist_ok=True)
            fd = os.open(staged.path, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            os.replace(staged.path, self._path(staged.key))
            fsync_dir(self.objects)
            return size

        return await asyncio.to_thread(move)

    async def open(self, key: str) -> RandomAccessSource:
        path = self._path(key)
        if not path.is_file():
            raise not_found(key)
        return FileSource(path)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def size(self, key: str) -> int:
        try:
            return (await asyncio.to_thread(self._path(key).stat)).st_size
        except FileNotFoundError:
            raise not_found(key) from None
