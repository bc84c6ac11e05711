"""Workers on a real database: claiming, fencing, limits, retry, cancel, resume.

The migrations are real rows created through the API; the engine is a scripted one
(the worker mechanics are what is under test here; real engines have their own
end-to-end tests).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from app.crypto import SecretBox
from app.db import Database
from app.engines.retry import RetryPolicy
from app.engines.runner import Engine, LeaseLost, MigrationRun, StepContext, StepResult
from app.engines.worker import DbRunStore, Worker, WorkerConfig
from app.errors import AppError, TransientError
from app.models.db import Migration, MigrationEvent
from app.models.enums import CloudKind
from tests.api.migrations_support import PASSWORD, add_cloud, hypervisor
from tests.conftest import TokenFactory, auth

FAST = dict(lease_seconds=2.0, heartbeat_seconds=0.1, poll_seconds=0.05,
            retry=RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=0.0))


class Ran(StepResult):
    ok: str


class Script(Engine):
    """Records every step it runs; ``behaviour`` decides what a step does."""

    platform = "scripted"
    calls: Counter[tuple[str, str]] = Counter()

    def __init__(self, view: MigrationRun,
                 behaviour: Callable[[StepContext], Any] | None = None) -> None:
        self.view = view
        self.behaviour = behaviour

    async def run_step(self, ctx: StepContext) -> StepResult | None:
        Script.calls[(self.view.id, ctx.step.name)] += 1
        if self.behaviour is not None:
            result = self.behaviour(ctx)
            if asyncio.iscoroutine(result):
                result = await result
            if isinstance(result, StepResult):
                return result
        return Ran(ok=ctx.step.name)

    async def aclose(self) -> None:
        Script.calls[(self.view.id, "aclose")] += 1


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    Script.calls = Counter()


@pytest.fixture
def box(settings: Any) -> SecretBox:
    return SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])


async def _create(client: httpx.AsyncClient, token: str, db: Database, *, host: str = "esx1",
                  run: bool = True) -> str:
    cloud = await add_cloud(db, CloudKind.vmware)
    body = hypervisor(cloud, format="qcow2", run=run)
    body["source"]["host"] = f"{host}.example.com"
    r = await client.post("/v1/migrations", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _worker(db: Database, box: SecretBox, behaviour: Callable[[StepContext], Any] | None = None,
            **config: Any) -> Worker:
    return Worker(db, box, {"hypervisor": lambda v: Script(v, behaviour)},
                  WorkerConfig(**{**FAST, **config}))


async def _drain(worker: Worker, until: Callable[[], Any], timeout: float = 20.0) -> None:
    """Run the worker until ``until()`` is true (bounded), then stop it."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(timeout):
            while not await until():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task


async def _get(client: httpx.AsyncClient, token: str, mid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/migrations/{mid}", headers=auth(token))
    return dict(r.json())


def _status_is(client: httpx.AsyncClient, token: str, mid: str, *want: str
               ) -> Callable[[], Any]:
    async def check() -> bool:
        return (await _get(client, token, mid))["status"] in want
    return check


async def test_runs_plan_to_completion(client: httpx.AsyncClient, make_token: TokenFactory,
                                       db: Database, box: SecretBox) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    worker = _worker(db, box)
    await _drain(worker, _status_is(client, token, mid, "completed"))
    m = await _get(client, token, mid)
    assert m["status"] == "completed"
    assert m["error"] is None
    assert [s["status"] for s in m["steps"]] == ["completed"] * len(m["steps"])
    ran = [name for (i, name) in Script.calls if i == mid]
    assert ran == [s["name"] for s in m["steps"]] + ["aclose"]  # plan order, each once
    assert Script.calls[(mid, "aclose")] == 1  # the engine is closed once, at the end
    assert m["steps"][0]["result"] == {"ok": "validate"}  # the typed result, as stored
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token))).json()
    types = [e["type"] for e in events["items"]]
    assert types[:3] == ["migration.created", "migration.queued", "migration.started"]
    assert types[-1] == "migration.completed"
    assert PASSWORD not in str(events)


async def test_secrets_reach_the_engine_decrypted(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    seen: list[str] = []

    def grab(ctx: StepContext) -> None:
        password = ctx.migration.secrets.source.password
        assert password is not None
        seen.append(password.get_secret_value())

    await _drain(_worker(db, box, grab), _status_is(client, token, mid, "completed"))
    assert seen
    assert set(seen) == {PASSWORD}


async def test_permanent_failure_unwinds_started_steps_only(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)

    def fail_export(ctx: StepContext) -> None:
        if ctx.step.name == "transfer":
            raise AppError("disk-1 export refused by the host")

    await _drain(_worker(db, box, fail_export), _status_is(client, token, mid, "failed"))
    m = await _get(client, token, mid)
    assert m["error"]["step"] == "transfer"
    assert "disk-1 export refused" in m["error"]["detail"]
    assert "scripted" in m["error"]["detail"]  # the platform is named
    steps = {s["name"]: s["status"] for s in m["steps"]}
    assert steps["transfer"] == "failed"
    assert steps["check_image"] == "pending"
    assert steps["store"] == "pending"
    assert steps["remove_snapshot"] == "completed"
    assert steps["restore_power"] == "completed"
    ran = [name for (i, name) in Script.calls if i == mid]
    assert ran.index("remove_snapshot") < ran.index("restore_power")  # newest first
    assert Script.calls[(mid, "transfer")] == 1  # not retried


async def test_transient_errors_are_retried(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)

    def flaky(ctx: StepContext) -> None:
        if ctx.step.name == "transfer" and Script.calls[(ctx.migration.id, "transfer")] < 3:
            raise TransientError("connection reset by host")

    await _drain(_worker(db, box, flaky), _status_is(client, token, mid, "completed"))
    assert Script.calls[(mid, "transfer")] == 3
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    retries = [e for e in events if e["type"] == "migration.step.retrying"]
    assert [e["payload"]["attempt"] for e in retries] == [1, 2]


async def test_retries_are_bounded(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)

    def always(ctx: StepContext) -> None:
        if ctx.step.name == "snapshot":
            raise ConnectionResetError("peer reset")

    await _drain(_worker(db, box, always), _status_is(client, token, mid, "failed"))
    assert Script.calls[(mid, "snapshot")] == 3
    assert "peer reset" in (await _get(client, token, mid))["error"]["detail"]


async def test_cancel_while_running(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    in_export = asyncio.Event()

    async def slow_export(ctx: StepContext) -> None:
        if ctx.step.name == "transfer":
            in_export.set()
            await asyncio.sleep(60)

    stop = asyncio.Event()
    task = asyncio.create_task(_worker(db, box, slow_export).run(stop))
    try:
        async with asyncio.timeout(20):
            await in_export.wait()
            r = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
            assert r.json()["status"] == "cancelling"
            while (await _get(client, token, mid))["status"] != "cancelled":
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    steps = {s["name"]: s["status"] for s in (await _get(client, token, mid))["steps"]}
    assert steps["remove_snapshot"] == "completed"
    assert steps["check_image"] == "pending"


async def test_two_workers_run_each_migration_exactly_once(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    ids = [await _create(client, token, db, host=f"h{i}") for i in range(10)]

    async def all_done() -> bool:
        async with db.session() as s:
            n = await s.scalar(select(func.count()).select_from(Migration)
                               .where(Migration.status == "completed"))
        return n == 10

    async def slowish(ctx: StepContext) -> None:
        await asyncio.sleep(0.01)

    stop = asyncio.Event()
    # A lease long enough that a loaded machine's slow heartbeat never hands a run over
    # (that failover is correct, and tested elsewhere; here both workers compete).
    workers = [_worker(db, box, slowish, worker_id=f"w{i}", concurrency=3, lease_seconds=15.0)
               for i in range(2)]
    tasks = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        async with asyncio.timeout(60):
            while not await all_done():
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    for mid in ids:
        assert Script.calls[(mid, "transfer")] == 1
    async with db.session() as s:
        started = await s.scalar(select(func.count()).select_from(MigrationEvent)
                                 .where(MigrationEvent.type == "migration.started"))
    assert started == 10


async def test_per_source_host_limit(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    for _ in range(3):
        await _create(client, token, db, host="busy")
    worker = _worker(db, box, per_source_limit=1, concurrency=4)
    first = await worker.claim()
    assert first is not None
    assert await worker.claim() is None  # same host: must wait for the first
    other = await _create(client, token, db, host="idle")
    second = await worker.claim()
    assert second is not None
    assert str(second.id) == other


async def test_expired_lease_is_reclaimed_and_old_owner_fenced(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    dead = _worker(db, box, worker_id="dead")
    claimed = await dead.claim()
    assert claimed is not None
    # the dead worker never heartbeats: its lease runs out
    async with db.session() as s:
        await s.execute(update(Migration).where(Migration.id == uuid.UUID(mid))
                        .values(lease_expires_at=func.now() - timedelta(seconds=1)))
    alive = _worker(db, box, worker_id="alive")
    await _drain(alive, _status_is(client, token, mid, "completed"))
    stale = DbRunStore(db, claimed)
    with pytest.raises(LeaseLost):
        await stale.progress(0, 1, 2, 3)
    with pytest.raises(LeaseLost):
        await stale.event("migration.step.completed", {"step": "x"})
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    assert "migration.reclaimed" in [e["type"] for e in events]
    assert (await _get(client, token, mid))["status"] == "completed"


async def test_shutdown_releases_and_another_worker_resumes(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    in_convert = asyncio.Event()

    async def hang_in_convert(ctx: StepContext) -> None:
        if ctx.step.name == "check_image" and Script.calls[(ctx.migration.id, "check_image")] == 1:
            in_convert.set()
            await asyncio.sleep(60)

    stop = asyncio.Event()
    task = asyncio.create_task(_worker(db, box, hang_in_convert).run(stop))
    async with asyncio.timeout(20):
        await in_convert.wait()
    stop.set()
    await task
    m = await _get(client, token, mid)
    assert m["status"] == "queued"  # handed back at once, no lease to wait out
    assert Script.calls[(mid, "aclose")] == 1  # closed although the run was stopped
    read_back: list[Ran] = []

    async def resumed(ctx: StepContext) -> None:
        if ctx.step.name == "store":
            read_back.append(ctx.migration.result_of("transfer", Ran))
        await hang_in_convert(ctx)

    await _drain(_worker(db, box, resumed), _status_is(client, token, mid, "completed"))
    assert read_back == [Ran(ok="transfer")]  # an earlier attempt's result, read back typed
    assert Script.calls[(mid, "transfer")] == 1  # completed steps are not redone
    assert Script.calls[(mid, "check_image")] == 2


async def test_cancel_after_release_is_unwound_by_a_worker(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    """Work had started (snapshot taken) when the worker handed the migration back: a
    cancel must not just mark it cancelled, a worker must undo the snapshot first."""
    token = await make_token()
    mid = await _create(client, token, db)
    in_export = asyncio.Event()

    async def hang_in_export(ctx: StepContext) -> None:
        if ctx.step.name == "transfer":
            in_export.set()
            await asyncio.sleep(60)

    stop = asyncio.Event()
    task = asyncio.create_task(_worker(db, box, hang_in_export).run(stop))
    async with asyncio.timeout(20):
        await in_export.wait()
    stop.set()
    await task
    assert (await _get(client, token, mid))["status"] == "queued"

    r = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
    assert r.json()["status"] == "cancelling"
    await _drain(_worker(db, box), _status_is(client, token, mid, "cancelled"))
    steps = {s["name"]: s["status"] for s in (await _get(client, token, mid))["steps"]}
    assert steps["remove_snapshot"] == "completed"
    assert steps["restore_power"] == "completed"
    assert steps["check_image"] == "pending"


async def test_cancel_before_any_work_is_immediate(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    r = await client.post(f"/v1/migrations/{mid}/cancel", headers=auth(token))
    assert r.json()["status"] == "cancelled"


async def test_a_stored_spec_that_no_longer_validates_fails_without_running(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    async with db.session() as s:  # e.g. written by a build that knew another option
        await s.execute(update(Migration).where(Migration.id == uuid.UUID(mid)).values(
            spec=Migration.spec.op("||")(func.jsonb_build_object("surprise", 1))))
    await _drain(_worker(db, box), _status_is(client, token, mid, "failed"))
    m = await _get(client, token, mid)
    assert m["error"]["type"].endswith("/invalid-spec")
    assert not [k for k in Script.calls if k[0] == mid]  # no engine was built, no step ran
