"""Library storage in S3-compatible object storage (aioboto3).

Publishing uploads the staging file with a multipart upload and completes it only when
every part landed, so a failed store leaves no object (the upload is aborted). Reads
use ranged GETs, so readers get random access without downloading whole images.
Tested against moto's server mode; real S3, MinIO and Ceph RGW speak the same API.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aioboto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from app.errormap import NETWORK, Boundary, ErrorFamily, ErrorRule
from app.errors import AppError, NotFound
from app.formats.base import RandomAccessSource
from app.storage.base import ImageStore, StagedImage, StorageError, check_key, not_found

PART_SIZE = 64 * 1024 * 1024
PARALLEL_PARTS = 4


class StorageUnavailable(StorageError):
    """The object store could not be reached or timed out: worth another try."""

    status = 503
    code = "storage-unavailable"
    title = "Image storage temporarily unavailable"
    retryable = True


S3_FAMILY = ErrorFamily(failed=StorageError, unavailable=StorageUnavailable,
                        auth=StorageError, untrusted=StorageError)


def _client_error(exc: BaseException, b: Boundary, action: str) -> AppError:
    assert isinstance(exc, ClientError)
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound"):
        return not_found(b.where)
    return StorageError(b.scrub(f"{action} {b.where}: {code} {err.get('Message', '')}".strip()))


#: botocore's errors in front of the shared network table. ``where`` is the object key.
#: Unmatched exceptions propagate unchanged. Causes are dropped: botocore's text may
#: carry request signatures.
S3_TABLE = NETWORK.extend([
    ErrorRule(ClientError, _client_error, hide_cause=True),
    ErrorRule((EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError,
               ReadTimeoutError),
              lambda exc, b, action: StorageUnavailable(
                  b.scrub(f"{action} {b.where}: {type(exc).__name__}: {exc}")),
              hide_cause=True),
    ErrorRule(BotoCoreError, lambda exc, b, action: StorageError(
        b.scrub(f"{action} {b.where}: {type(exc).__name__}: {exc}")), hide_cause=True),
], passthrough=True)


def map_exceptions(what: str, key: str) -> AbstractContextManager[None]:
    """Translate botocore errors into the service's errors (no credentials in messages)."""
    return S3_TABLE.mapping(Boundary(where=key, family=S3_FAMILY), what)


class S3Source:
    """A :class:`RandomAccessSource` over one object, via ranged GETs."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    async def read_at(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self._size:
            return b""
        end = min(offset + length, self._size) - 1
        with map_exceptions("reading", self._key):
            async with self._store.client() as s3:
                resp = await s3.get_object(
                    Bucket=self._store.bucket, Key=self._store.object_key(self._key),
                    Range=f"bytes={offset}-{end}",
                )
                async with resp["Body"] as body:
                    data: bytes = await body.read()
        return data

    async def data_ranges(self) -> list[tuple[int, int]] | None:
        return None

    async def close(self) -> None:
        return None


class S3Store(ImageStore):
    def __init__(
        self,
        staging_dir: Path,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        super().__init__(staging_dir)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self._endpoint_url = endpoint_url
        self._config = Config(retries={"max_attempts": 5, "mode": "standard"})

    def object_key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        async with self._session.client(
            "s3", endpoint_url=self._endpoint_url, config=self._config
        ) as s3:
            yield s3

    async def publish(self, staged: StagedImage) -> int:
        size = (await asyncio.to_thread(os.stat, staged.path)).st_size
        key = self.object_key(staged.key)
        with map_exceptions("uploading", staged.key):
            async with self.client() as s3:
                upload = await s3.create_multipart_upload(Bucket=self.bucket, Key=key)
                upload_id = upload["UploadId"]
                try:
                    parts = await self._upload_parts(s3, staged.path, key, upload_id, size)
                    await s3.complete_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id,
                        MultipartUpload={"Parts": parts},
                    )
                except BaseException:
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                    UploadId=upload_id)
                    raise
        await staged.discard()
        return size

    async def _upload_parts(
        self, s3: Any, path: Path, key: str, upload_id: str, size: int
    ) -> list[dict[str, Any]]:
        offsets = list(range(0, max(size, 1), PART_SIZE))
        limit = asyncio.Semaphore(PARALLEL_PARTS)
        fd = os.open(path, os.O_RDONLY)

        async def part(number: int, offset: int) -> dict[str, Any]:
            async with limit:
                data = await asyncio.to_thread(os.pread, fd, PART_SIZE, offset)
                resp = await s3.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id,
                    PartNumber=number, Body=data,
                )
                return {"PartNumber": number, "ETag": resp["ETag"]}

        try:
            return list(await asyncio.gather(
                *(part(i + 1, off) for i, off in enumerate(offsets))
            ))
        finally:
            os.close(fd)

    async def open(self, key: str) -> RandomAccessSource:
        return S3Source(self, key, await self.size(key))

    async def delete(self, key: str) -> None:
        with map_exceptions("deleting", key):
            async with self.client() as s3:
                await s3.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    async def size(self, key: str) -> int:
        with map_exceptions("reading", key):
            async with self.client() as s3:
                head = await s3.head_object(Bucket=self.bucket, Key=self.object_key(key))
        return int(head["ContentLength"])


__all__ = ["NotFound", "S3Source", "S3Store"]
