"""Library storage backends: the local directory and S3 (moto's server, started here).

moto does not cover: S3 consistency quirks of real providers, multipart part-size
minimums beyond its own checks, server-side encryption and real throughput.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from app.errors import NotFound
from app.storage import s3 as s3_module
from app.storage.base import ImageStore, StagedImage, check_key
from app.storage.local import LocalStore
from app.storage.s3 import S3Store

CREDS = {"access_key_id": "testing-key", "secret_access_key": "testing-secret-value"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, moto_url: str
) -> AsyncIterator[ImageStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "library")
        return
    bucket = f"lib-{os.urandom(4).hex()}"
    boto3.client(
        "s3", endpoint_url=moto_url, region_name="us-east-1",
        aws_access_key_id=CREDS["access_key_id"],
        aws_secret_access_key=CREDS["secret_access_key"],
    ).create_bucket(Bucket=bucket)
    yield S3Store(tmp_path / "staging", bucket=bucket, prefix="images",
                  endpoint_url=moto_url, region="us-east-1", **CREDS)


async def _write(staged: StagedImage, data: bytes) -> None:
    sink = staged.sink()
    await sink.write_at(0, data)
    await sink.close()


async def test_publish_then_read_ranges(store: ImageStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    staged = store.stage()
    await _write(staged, data)
    with pytest.raises(NotFound):
        await store.size(staged.key)  # nothing visible before publish
    assert await staged.publish() == len(data)
    assert not staged.path.exists()
    assert await store.size(staged.key) == len(data)
    src = await store.open(staged.key)
    assert src.size == len(data)
    assert await src.read_at(0, 10) == data[:10]
    assert await src.read_at(1024 * 1024 - 3, 100) == data[1024 * 1024 - 3 : 1024 * 1024 + 97]
    assert await src.read_at(len(data) - 5, 100) == data[-5:]
    assert await src.read_at(len(data), 10) == b""
    await src.close()


async def test_discard_leaves_nothing(store: ImageStore) -> None:
    staged = store.stage()
    await _write(staged, b"partial")
    await staged.discard()
    assert not staged.path.exists()
    with pytest.raises(NotFound):
        await store.open(staged.key)


async def test_delete_is_idempotent(store: ImageStore) -> None:
    staged = store.stage()
    await _write(staged, b"x" * 1000)
    await staged.publish()
    await store.delete(staged.key)
    await store.delete(staged.key)
    with pytest.raises(NotFound):
        await store.size(staged.key)


@pytest.mark.parametrize("key", ["", "../etc", ".hidden", "a/b", "x" * 201])
def test_bad_keys_refused(key: str) -> None:
    with pytest.raises(ValueError, match="bad storage key"):
        check_key(key)


async def test_s3_multipart_failure_aborts_upload(
    tmp_path: Path, moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part that fails aborts the multipart upload: no object, no dangling upload."""
    bucket = f"lib-{os.urandom(4).hex()}"
    raw = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                       aws_access_key_id="k", aws_secret_access_key="s")
    raw.create_bucket(Bucket=bucket)
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 * 1024 * 1024)
    store = S3Store(tmp_path / "staging", bucket=bucket, endpoint_url=moto_url,
                    region="us-east-1", **CREDS)
    staged = store.stage()
    await _write(staged, os.urandom(11 * 1024 * 1024))
    real = S3Store._upload_parts

    async def failing(self: S3Store, *args: object) -> list[dict[str, object]]:
        await real(self, *args)  # type: ignore[arg-type]
        raise ConnectionResetError("link dropped")

    monkeypatch.setattr(S3Store, "_upload_parts", failing)
    with pytest.raises(s3_module.StorageUnavailable, match="link dropped") as info:
        await staged.publish()  # the shared network table: a reset link is retryable
    assert info.value.retryable
    assert raw.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
