"""Helpers for the live-stream tests: SSH targets and API bodies for the test hosts,
an in-process worker running the real engine, and process lookup on namespace hosts."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from app.crypto import SecretBox
from app.db import Database
from app.engines.live_stream import LiveStreamEngine, Tuning
from app.engines.retry import RetryPolicy
from app.engines.worker import Worker, WorkerConfig
from app.models.enums import CloudKind
from app.transports.ssh import SshOptions, SshTarget
from tests.api.migrations_support import add_cloud
from tests.conftest import auth
from tests.infra import SshHost

SSH = SshOptions(connect_timeout=60.0, keepalive_interval=5.0, keepalive_count_max=3)
#: Data over asyncssh channels instead of the OpenSSH client.
SSH_ASYNCSSH = dataclasses.replace(SSH, native_data=False)
FAST = dict(lease_seconds=5.0, heartbeat_seconds=0.2, poll_seconds=0.05,
            retry=RetryPolicy(max_attempts=4, initial_delay=0.2, jitter=0.0))
TERMINAL = ("completed", "failed", "cancelled")


def target(host: SshHost, *, password_login: bool = False, pin: bool = True) -> SshTarget:
    """Root by key, or the password user by password; the host key pinned."""
    if password_login:
        return SshTarget(host.host, host.port, host.password_user, password=host.password,
                         fingerprint=host.host_key_fingerprint if pin else None)
    return SshTarget(host.host, host.port, host.user, private_key=host.key_path.read_text(),
                     fingerprint=host.host_key_fingerprint if pin else None)


def ssh_part(host: SshHost, device: str, *, password_login: bool = False,
             pin: bool = True, **extra: Any) -> dict[str, Any]:
    """The SSH fields of a source or destination in an API body."""
    t = target(host, password_login=password_login, pin=pin)
    part: dict[str, Any] = {"host": t.host, "port": t.port, "username": t.username,
                            "device": device}
    if t.password:
        part["password"] = t.password
    if t.private_key:
        part["private_key"] = t.private_key
    if t.fingerprint:
        part["host_key_fingerprint"] = t.fingerprint
    part.update(extra)
    return part


async def create(client: httpx.AsyncClient, token: str, db: Database, source: dict[str, Any],
                 destination: dict[str, Any], **options: Any) -> str:
    cloud = await add_cloud(db, CloudKind.linux)
    body = {"type": "live_stream", "name": "live stream test", "run": True,
            "source": {"cloud_id": cloud, "server": {"name": "guest"}, **source},
            "destination": {"kind": "existing", **destination}, "options": options}
    r = await client.post("/v1/migrations", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def get(client: httpx.AsyncClient, token: str, mid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/migrations/{mid}", headers=auth(token))
    assert r.status_code == 200, r.text
    return dict(r.json())


async def events(client: httpx.AsyncClient, token: str, mid: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/migrations/{mid}/events?limit=200", headers=auth(token))
    assert r.status_code == 200, r.text
    return list(r.json()["items"])


def step(migration: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in migration["steps"] if s["name"] == name)


def worker(db: Database, box: SecretBox, tuning: Tuning | None = None) -> Worker:
    return Worker(db, box, {"live_stream": lambda v: LiveStreamEngine(v, SSH, tuning)},
                  WorkerConfig(**FAST))  # type: ignore[arg-type]


async def run_until(worker: Worker, until: Callable[[], Awaitable[bool]],
                    timeout: float = 240.0) -> None:
    """Run ``worker`` until ``until()`` (bounded), then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await until():
                if task.done():
                    task.result()
                    raise AssertionError("the worker stopped")
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task


def status_in(client: httpx.AsyncClient, token: str, mid: str,
              *wanted: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await get(client, token, mid))["status"] in wanted
    return check


# --- processes on this machine (namespace hosts) ------------------------------------


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def helper_session_pids(sshd_pid: int) -> list[int]:
    """PIDs of the per-connection sshd processes (children of the listener ``sshd_pid``
    that this test's sshd started) that run a vmigrate helper somewhere below them."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"vmls-helper" not in cmdline:
            continue
        pid = int(entry)
        try:
            while pid > 1:
                parent = _ppid(pid)
                if parent == sshd_pid:
                    found.add(pid)
                    break
                pid = parent
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)
