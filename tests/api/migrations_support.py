"""Helpers for the /v1/migrations tests: clouds in the database and valid bodies."""

from __future__ import annotations

import base64
import struct
import uuid
from typing import Any

import httpx

from app.db import Database
from app.models.db import Cloud
from app.models.enums import CloudKind

PASSWORD = "Tr0ub4dor&3-hunter2"  # distinctive: must never appear in any response
DEST_PASSWORD = "dest-Pa55-correct-horse"
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACDm4GxBRo1Wk4HeTJx5YSk3qZQxVEryLtZ9KJtuYbcyGgAAAJgSECRETSSWD\n"
    "-----END OPENSSH PRIVATE KEY-----\n"
)
KEY_MARKER = "QyNTUxOQAAACDm4GxBRo1Wk4HeTJx5YSk3qZQxVEryLtZ9KJtuYbcyGgAAAJgSECRETSSWD"
SECRETS = (PASSWORD, DEST_PASSWORD, KEY_MARKER)
PUBLIC_KEY = "ssh-ed25519 " + base64.b64encode(
    struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + bytes(range(32))
).decode() + " ops@example"
FINGERPRINT = "SHA256:" + "A" * 43


async def add_cloud(db: Database, kind: CloudKind | str, tenant: str = "acme") -> str:
    """A cloud row of ``kind`` (the clouds API is another module's concern)."""
    cloud_id = uuid.uuid4()
    async with db.session() as session:
        session.add(Cloud(id=cloud_id, tenant=tenant, kind=str(kind),
                          name=f"{kind}-{cloud_id.hex[:6]}", settings={}))
    return str(cloud_id)


def hypervisor(source: str, *, mode: str = "store", destination: str | None = None,
               **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "hypervisor", "name": "web-01 to library", "mode": mode, "platform": "linux",
        "source": {"cloud_id": source, "server": {"name": "web-01"}, "host": "esx1.example.com",
                   "port": 443, "username": "administrator@vsphere.local",
                   "password": PASSWORD},
    }
    if destination is not None:
        body["destination"] = {"cloud_id": destination, "datastore": "ds1"}
    body.update(extra)
    return body


def image_extract(source: str, *, cloud: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "image_extract", "name": "dc01 image", "platform": "windows",
        "source": {"cloud_id": source, "server": {"id": "vm-1042"}, "host": "10.1.2.3",
                   "username": "CORP\\svc-migrate", "password": PASSWORD,
                   "snapshot_path": "\\\\nas01\\staging$\\images"},
        "destination": ({"kind": "cloud", "cloud_id": cloud} if cloud
                        else {"kind": "library"}),
    }
    body.update(extra)
    return body


def live_stream(source: str, *, new_in: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "live_stream", "name": "db stream", "platform": "linux",
        "source": {"cloud_id": source, "server": {"name": "db1"}, "host": "db1.example.com",
                   "port": 2222, "username": "root", "password": PASSWORD,
                   "private_key": PRIVATE_KEY, "public_key": PUBLIC_KEY,
                   "host_key_fingerprint": FINGERPRINT, "device": "/dev/vg0/root"},
        "destination": (
            {"kind": "new", "cloud_id": new_in, "plan": "4 vCPU / 8 GB"} if new_in else
            {"kind": "existing", "host": "192.0.2.10", "username": "root",
             "password": DEST_PASSWORD, "device": "/dev/mapper/vg1-root"}),
        "options": {"throttle_bytes_per_second": 50_000_000},
    }
    body.update(extra)
    return body


def assert_no_secrets(response: httpx.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text


def assert_problem(response: httpx.Response, status: int, *pointers: str) -> dict[str, Any]:
    """A problem document with that status and (at least) errors at those pointers."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail"} <= body.keys()
    got = [e["pointer"] for e in body.get("errors", [])]
    for pointer in pointers:
        assert pointer in got, (pointer, body)
    assert_no_secrets(response)
    return body
