"""The virtual image library API on a real database and the local store, with
qemu-img making the images and the vmd1 digest of the raw source as the oracle."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.engines.deps import EngineDeps
from app.engines.registry import default_engines
from app.engines.worker import Worker, WorkerConfig
from app.formats.digest import digest_file
from app.repositories import images as images_repo
from app.services import images as images_service
from app.storage.local import LocalStore
from tests.conftest import TokenFactory, auth
from tests.formats import qcow2_bombs as bombs
from tests.formats.oracle import make_sparse_raw, qemu_img

SIZE = 5 * 1024 * 1024 + 512


@pytest.fixture
def raw_disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    make_sparse_raw(path, SIZE, [(0, 4096), (1024 * 1024 + 7, 70000), (SIZE - 512, 512)], seed=3)
    return path


def _convert(raw: Path, fmt: str, *opts: str) -> Path:
    out = raw.with_suffix(f".{fmt}")
    qemu_img("convert", "-f", "raw", "-O", "vpc" if fmt == "vhd" else fmt, *opts, raw, out)
    return out


async def _upload(client: httpx.AsyncClient, token: str, path: Path, **params: str
                  ) -> httpx.Response:
    return await client.post(
        "/v1/images", params={"name": path.name, **params}, content=path.read_bytes(),
        headers={**auth(token), "Content-Type": "application/octet-stream"},
    )


@pytest.mark.parametrize(("fmt", "opts"), [
    ("qcow2", ()), ("vmdk", ("-o", "subformat=streamOptimized")),
    ("vhd", ("-o", "subformat=dynamic,force_size=on")), ("raw", ()),
])
async def test_upload_identifies_and_digests(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path,
    fmt: str, opts: tuple[str, ...],
) -> None:
    token = await make_token("acme")
    image_file = _convert(raw_disk, fmt, *opts) if fmt != "raw" else raw_disk
    r = await _upload(client, token, image_file)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["format"] == fmt
    assert body["virtual_size"] == SIZE
    assert body["size"] == image_file.stat().st_size
    assert body["digest"] == digest_file(str(raw_disk))
    assert r.headers["location"] == f"/v1/images/{body['id']}"

    got = await client.get(f"/v1/images/{body['id']}", headers=auth(token))
    assert got.json() == body
    listed = await client.get("/v1/images", headers=auth(token))
    assert [i["id"] for i in listed.json()["items"]] == [body["id"]]


async def test_download_range_and_etag(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path
) -> None:
    token = await make_token("acme")
    qcow = _convert(raw_disk, "qcow2")
    image = (await _upload(client, token, qcow)).json()
    url = f"/v1/images/{image['id']}/content"
    whole = await client.get(url, headers=auth(token))
    assert whole.status_code == 200
    assert whole.content == qcow.read_bytes()
    etag = whole.headers["etag"]

    part = await client.get(url, headers={**auth(token), "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == qcow.read_bytes()[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{qcow.stat().st_size}"
    tail = await client.get(url, headers={**auth(token), "Range": "bytes=-10"})
    assert tail.content == qcow.read_bytes()[-10:]

    bad = await client.get(url, headers={**auth(token), "Range": "bytes=999999999-"})
    assert bad.status_code == 416
    assert bad.headers["content-type"] == "application/problem+json"
    cached = await client.get(url, headers={**auth(token), "If-None-Match": etag})
    assert cached.status_code == 304


async def test_declared_format_must_match_bytes(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path, settings: Settings
) -> None:
    token = await make_token("acme")
    r = await _upload(client, token, _convert(raw_disk, "qcow2"), format="vmdk")
    assert r.status_code == 422
    assert "qcow2" in r.json()["detail"]
    assert r.json()["errors"][0]["pointer"] == "/format"
    # nothing left behind: no row, no staging file, no object
    assert (await client.get("/v1/images", headers=auth(token))).json()["items"] == []
    assert list((settings.library_dir / "staging").glob("*")) == []
    assert not (settings.library_dir / "objects").exists() or \
        list((settings.library_dir / "objects").iterdir()) == []


async def test_corrupt_image_refused(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path, settings: Settings
) -> None:
    token = await make_token("acme")
    qcow = _convert(raw_disk, "qcow2")
    data = bytearray(qcow.read_bytes())
    data[40:48] = (2**62).to_bytes(8, "big")  # L1 table offset far past the end
    broken = qcow.with_name("broken.qcow2")
    broken.write_bytes(bytes(data))
    r = await _upload(client, token, broken)
    assert r.status_code == 422, r.text
    assert r.json()["title"]
    assert list((settings.library_dir / "staging").glob("*")) == []


async def test_empty_and_oversize_uploads(
    client: httpx.AsyncClient, make_token: TokenFactory, tmp_path: Path
) -> None:
    token = await make_token("acme")
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    r = await _upload(client, token, empty)
    assert r.status_code == 422
    missing_name = await client.post("/v1/images", content=b"x", headers=auth(token))
    assert missing_name.status_code == 422
    assert missing_name.json()["errors"][0]["pointer"] == "/name"


async def test_tenants_and_delete(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path, settings: Settings
) -> None:
    acme, other = await make_token("acme"), await make_token("globex")
    image = (await _upload(client, acme, raw_disk)).json()
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        r = await client.request(method, f"/v1/images/{image['id']}{suffix}", headers=auth(other))
        assert r.status_code == 404, (method, suffix)
    assert (await client.get("/v1/images", headers=auth(other))).json()["items"] == []

    assert (await client.delete(f"/v1/images/{image['id']}", headers=auth(acme))).status_code == 204
    assert (await client.get(f"/v1/images/{image['id']}", headers=auth(acme))).status_code == 404
    assert list((settings.library_dir / "objects").iterdir()) == []
    unknown = await client.get(f"/v1/images/{uuid.uuid4()}", headers=auth(acme))
    assert unknown.status_code == 404
    reader_only = await make_token("acme", "images:read")
    denied = await client.delete(f"/v1/images/{uuid.uuid4()}", headers=auth(reader_only))
    assert denied.status_code == 403


@pytest.mark.parametrize("target", ["vmdk", "vhd", "qcow2", "vhdx"])
async def test_conversion_job_makes_a_new_image(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path, settings: Settings,
    db: Database, tmp_path: Path, target: str,
) -> None:
    token = await make_token("acme")
    source = (await _upload(client, token, _convert(raw_disk, "qcow2"))).json()
    named = {"name": f"converted to {target}"} if target != "qcow2" else {}
    r = await client.post(f"/v1/images/{source['id']}/conversions", headers=auth(token),
                          json={"format": target, **named})
    assert r.status_code == 202, r.text
    job = r.json()
    assert (job["type"], job["status"], job["format"]) == ("conversion", "queued", target)
    assert r.headers["location"] == f"/v1/migrations/{job['id']}"

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    deps = EngineDeps(settings=settings, db=db, box=box, store=LocalStore(settings.library_dir))
    worker = Worker(db, box, default_engines(deps), WorkerConfig(poll_seconds=0.05))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(60):
            while (await client.get(f"/v1/migrations/{job['id']}",
                                    headers=auth(token))).json()["status"] != "completed":
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    images = (await client.get("/v1/images", headers=auth(token))).json()["items"]
    (new,) = [i for i in images if i["id"] != source["id"]]
    assert new["format"] == target
    # the conversion's name (or its default, "<image> to <format>") names the image
    assert new["name"] == named.get("name", f"{source['name']} to {target}")
    assert new["parent_id"] == source["id"]
    assert new["migration_id"] == job["id"]
    assert new["digest"] == source["digest"] == digest_file(str(raw_disk))
    data = await client.get(f"/v1/images/{new['id']}/content", headers=auth(token))
    out = tmp_path / f"out.{target}"
    out.write_bytes(data.content)
    cmp = qemu_img("compare", "-f", "vpc" if target == "vhd" else target, "-F", "raw",
                   out, raw_disk, check=False)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert list((settings.library_dir / "staging").glob("*")) == []
    # One image.created payload for every way an image enters the library: the upload's
    # (tenant-level) and the conversion's (in the job's own log) carry the same fields.
    r = await client.get("/v1/events?type=image.created", headers=auth(token))
    created = {e["payload"]["image_id"]: e for e in r.json()["items"]}
    assert set(created) == {source["id"], new["id"]}
    uploaded, converted = created[source["id"]], created[new["id"]]
    assert uploaded["migration_id"] is None
    assert converted["migration_id"] == job["id"]
    # (events in a migration's log also name the step that wrote them)
    assert converted["payload"].pop("step") == "store"
    assert set(uploaded["payload"]) == set(converted["payload"]) == {
        "image_id", "name", "format", "virtual_size", "size", "digest", "migration_id",
        "parent_id"}
    assert converted["payload"] == {
        "image_id": new["id"], "name": new["name"], "format": target,
        "virtual_size": new["virtual_size"], "size": new["size"], "digest": new["digest"],
        "migration_id": job["id"], "parent_id": source["id"]}
    assert (uploaded["payload"]["migration_id"], uploaded["payload"]["parent_id"]) == (
        None, None)


async def test_conversion_requests_are_checked(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path
) -> None:
    acme, other = await make_token("acme"), await make_token("globex")
    image = (await _upload(client, acme, raw_disk)).json()
    url = f"/v1/images/{image['id']}/conversions"
    bad = await client.post(url, headers=auth(acme), json={"format": "iso"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["pointer"] == "/format"
    extra = await client.post(url, headers=auth(acme), json={"format": "vmdk", "x": 1})
    assert extra.status_code == 422
    assert (await client.post(url, headers=auth(other), json={"format": "vmdk"})).status_code \
        == 404


async def test_delete_removes_bytes_only_after_the_commit(
    client: httpx.AsyncClient, make_token: TokenFactory, raw_disk: Path, settings: Settings,
    db: Database, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The bytes of a deleted image go after its row is committed away (a failed commit
    must not leave a library entry without content), and a failure to delete them is
    logged while the delete still succeeds."""
    from sqlalchemy import select

    from app.models.db import VirtualImage

    token = await make_token("acme")
    seen: list[tuple[str, bool]] = []
    real_delete = LocalStore.delete

    async def delete(self: LocalStore, key: str) -> None:
        async with db.session() as session:  # another connection: sees committed rows only
            rows = (await session.execute(select(VirtualImage.id))).scalars().all()
        seen.append((key, bool(rows)))
        if len(seen) == 2:
            raise OSError("disk on fire")
        await real_delete(self, key)

    monkeypatch.setattr(LocalStore, "delete", delete)
    for _ in range(2):
        image = (await _upload(client, token, raw_disk)).json()
        r = await client.delete(f"/v1/images/{image['id']}", headers=auth(token))
        assert r.status_code == 204, r.text
        gone = await client.get(f"/v1/images/{image['id']}", headers=auth(token))
        assert gone.status_code == 404
    assert [committed_rows for _, committed_rows in seen] == [False, False]
    assert len(list((settings.library_dir / "objects").iterdir())) == 1  # the second stayed
    assert any("disk on fire" in rec.getMessage() for rec in caplog.records)


async def _nothing_published(client: httpx.AsyncClient, token: str, settings: Settings) -> None:
    assert (await client.get("/v1/images", headers=auth(token))).json()["items"] == []
    assert [p for p in settings.library_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(("build", "why"), [
    (bombs.compressed_bomb, "decompression bomb"),
    (bombs.shared_data_cluster, "also holds another guest cluster"),
    (bombs.spread_bomb, "more than 256:1"),
    (lambda: bombs.refcount_disagrees()[0], "refcount is 0"),
])
async def test_image_bombs_are_refused_fast_and_nothing_is_published(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings,
    build: Callable[[], bytes], why: str,
) -> None:
    token = await make_token()
    image = build()
    started = time.monotonic()
    cpu = time.process_time()
    r = await client.post("/v1/images", params={"name": "bomb"}, content=image,
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    wall, spent = time.monotonic() - started, time.process_time() - cpu
    assert r.status_code == 422, r.text
    assert why in r.json()["detail"]
    assert spent < 3.0, (wall, spent)
    print(f"{why}: {len(image)} bytes refused in {wall:.2f} s ({spent:.2f} s CPU)")
    await _nothing_published(client, token, settings)


async def test_other_formats_may_not_claim_more_than_their_size(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings, tmp_path: Path
) -> None:
    """A VHD whose block table points every block at the same data claims 256x its
    file: refused from its tables before the data is read."""
    raw = tmp_path / "one-block.raw"
    make_sparse_raw(raw, 2 * 1024**3, [(0, 2 * 1024 * 1024)], seed=4)
    vhd = _convert(raw, "vhd", "-o", "subformat=dynamic,force_size=on")
    data = bytearray(vhd.read_bytes())
    # dynamic header at 512: table offset (u64 at +16), max entries (u32 at +28)
    bat = int.from_bytes(data[512 + 16:512 + 24], "big")
    first = data[bat:bat + 4]
    entries = int.from_bytes(data[512 + 28:512 + 32], "big")
    assert first != b"\xff\xff\xff\xff"
    assert entries == 1024
    for i in range(entries):
        data[bat + 4 * i:bat + 4 * i + 4] = first
    out = tmp_path / "claims.vhd"
    out.write_bytes(bytes(data))
    token = await make_token()
    r = await client.post("/v1/images", params={"name": "claims"}, content=bytes(data),
                          headers={**auth(token), "Content-Type": "application/octet-stream"})
    assert r.status_code == 422, r.text
    assert "over 256 times its size" in r.json()["detail"]
    await _nothing_published(client, token, settings)


async def test_checking_an_upload_has_a_time_budget_and_stops_for_a_gone_client(
    db: Database, settings: Settings, raw_disk: Path
) -> None:
    store = LocalStore(settings.library_dir)

    async def body() -> AsyncIterator[bytes]:
        yield raw_disk.read_bytes()

    async def gone_at_once() -> None:
        return None

    async def never() -> None:
        await asyncio.Event().wait()

    for budget, gone, error in [
        (images_service.CheckBudget(1e-9, 1e30), never, images_service.InspectionTooLong),
        (images_service.CheckBudget(), gone_at_once, images_service.ClientGone),
    ]:
        with pytest.raises(error):
            async with db.session() as session:
                await images_service.upload(
                    session, store, "acme", name="x", declared_format=None, body=body(),
                    max_bytes=1 << 40, budget=budget, gone=gone)
    async with db.session() as session:
        assert await images_repo.list_images(session, "acme", limit=10, after=None) == []
    assert [p for p in settings.library_dir.rglob("*") if p.is_file()] == []
