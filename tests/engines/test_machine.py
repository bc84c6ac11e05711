"""The status machine against a real PostgreSQL: every legal move, every illegal one,
races between sessions, fencing by epoch, leases, and resuming a new attempt."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from typing import Any

import pytest
from sqlalchemy import select, text

from app.db import Database
from app.engines import machine
from app.engines.machine import (
    TRANSITIONS,
    Action,
    Failure,
    InvalidTransition,
    Lease,
    StaleEpoch,
)
from app.engines.plans import Flag, plan_for
from app.errors import NotFound
from app.models.db import Migration, MigrationEvent, MigrationStep
from app.models.enums import MigrationStatus, MigrationType, StepStatus
from app.repositories import migrations as repo

S = MigrationStatus
LEASE = Lease("worker-1", 60)
FAILURE = Failure("Transfer failed", "connection reset by peer", step="transfer", retryable=True)


async def insert(db: Database, status: S = S.pending, tenant: str = "acme") -> uuid.UUID:
    """A live-stream migration row with its plan's steps, in ``status`` (set directly)."""
    plan = plan_for(MigrationType.live_stream, None, {Flag.verify})
    row = Migration(
        id=uuid.uuid4(), tenant=tenant, name="m", type=MigrationType.live_stream.value,
        status=status.value, spec={}, attempt=0, epoch=0, version=1, event_seq=0,
        bytes_total=0, bytes_done=0, rate=0, cancel_requested=False,
    )
    row.steps = [MigrationStep(position=i, name=s.name, cleanup=s.cleanup,
                               status=StepStatus.pending.value, bytes_total=0, bytes_done=0)
                 for i, s in enumerate(plan.steps)]
    async with db.session() as session:
        await repo.insert(session, row)
    return row.id


async def current(db: Database, mid: uuid.UUID) -> Migration:
    async with db.session() as session:
        row = await repo.get(session, "acme", mid)
    assert row is not None
    return row


async def apply(db: Database, mid: uuid.UUID, action: Action, **kw: Any) -> machine.Applied:
    """Apply with whatever the action needs: the current epoch, a lease, a failure."""
    t = TRANSITIONS[action]
    async with db.session() as session:
        if t.fenced and "epoch" not in kw:
            state = await repo.state(session, mid, "acme")
            kw["epoch"] = state.epoch if state else 0
        if t.claims:
            kw.setdefault("lease", LEASE)
        if action is Action.fail:
            kw.setdefault("failure", FAILURE)
        return await machine.apply(session, mid, "acme", action, **kw)


async def expire_lease(db: Database, mid: uuid.UUID) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(
            text("UPDATE migrations SET lease_expires_at = now() - interval '1 second' "
                 "WHERE id = :id"), {"id": mid})


async def event_log(db: Database, mid: uuid.UUID) -> list[MigrationEvent]:
    async with db.session() as session:
        return list((await session.execute(
            select(MigrationEvent).where(MigrationEvent.migration_id == mid)
            .order_by(MigrationEvent.seq))).scalars())


def _paths_from_pending() -> dict[S, list[Action]]:
    """Shortest action sequence from ``pending`` to every status, found from the table."""
    paths: dict[S, list[Action]] = {S.pending: []}
    todo = deque([S.pending])
    while todo:
        src = todo.popleft()
        for t in TRANSITIONS.values():
            if src in t.moves and (dst := t.moves[src][0]) not in paths:
                paths[dst] = [*paths[src], t.action]
                todo.append(dst)
    return paths


PATHS = _paths_from_pending()
EDGES = [(t.action, src) for t in TRANSITIONS.values() for src in t.moves]
ILLEGAL = [(a, s) for a in Action for s in S if s not in TRANSITIONS[a].moves]


def test_every_status_is_reachable_and_table_is_well_formed() -> None:
    assert set(PATHS) == set(S)
    assert len(EDGES) == 17
    assert len(ILLEGAL) == len(Action) * len(S) - 17
    for t in TRANSITIONS.values():
        assert all(event.startswith("migration.") for _, event in t.moves.values())
        assert not (t.fenced and t.claims)  # claiming is what makes a new epoch
    # nothing leaves a terminal status except a new run
    for t in TRANSITIONS.values():
        if t.action is not Action.run:
            assert not any(s.is_terminal() for s in t.moves), t.action


@pytest.mark.parametrize(("action", "source"), EDGES, ids=[f"{a}-from-{s}" for a, s in EDGES])
async def test_every_legal_move(db: Database, action: Action, source: S) -> None:
    mid = await insert(db)
    for step in PATHS[source]:
        await apply(db, mid, step)
    if action is Action.claim and source is not S.queued:
        await expire_lease(db, mid)  # a reclaim: the previous worker died
    before = await current(db, mid)
    applied = await apply(db, mid, action)
    target, event = TRANSITIONS[action].moves[source]
    after = await current(db, mid)
    assert (applied.previous, applied.status, after.status) == (source, target, target)
    assert applied.event_type == event
    assert after.version == before.version + 1
    assert after.event_seq == before.event_seq + 1 == applied.event_seq
    log = await event_log(db, mid)
    assert [e.seq for e in log] == list(range(1, len(log) + 1))  # no gaps, no duplicates
    assert log[-1].type == event
    assert log[-1].payload["from"] == source
    assert log[-1].payload["to"] == target
    assert (after.finished_at is not None) == target.is_terminal()
    if target not in (S.running, S.cancelling):
        assert after.lease_owner is None
        assert after.lease_expires_at is None


@pytest.mark.parametrize(("action", "source"), ILLEGAL, ids=[f"{a}-from-{s}" for a, s in ILLEGAL])
async def test_every_illegal_move_is_refused(db: Database, action: Action, source: S) -> None:
    mid = await insert(db, source)
    with pytest.raises(InvalidTransition) as info:
        await apply(db, mid, action, epoch=0)
    message = str(info.value)
    assert f"that is {source}" in message
    assert all(s in message for s in TRANSITIONS[action].moves)
    assert info.value.status == 409
    after = await current(db, mid)
    assert (after.status, after.version, after.event_seq) == (source, 1, 0)
    assert await event_log(db, mid) == []


async def test_full_lifecycle_with_retry(db: Database) -> None:
    mid = await insert(db)
    await apply(db, mid, Action.run)
    claimed = await apply(db, mid, Action.claim)
    assert claimed.epoch == 1
    row = await current(db, mid)
    assert row.started_at is not None
    assert row.lease_owner == "worker-1"
    await apply(db, mid, Action.fail)
    row = await current(db, mid)
    assert row.status == S.failed
    assert row.error is not None
    assert row.error["detail"] == "connection reset by peer"
    assert row.finished_at is not None
    await apply(db, mid, Action.run)
    row = await current(db, mid)
    assert (row.status, row.attempt, row.error, row.finished_at, row.started_at) == (
        S.queued, 2, None, None, None)
    assert (await apply(db, mid, Action.claim)).epoch == 2
    await apply(db, mid, Action.cancel)
    row = await current(db, mid)
    assert (row.status, row.cancel_requested, row.lease_owner) == (S.cancelling, True, "worker-1")
    await apply(db, mid, Action.finish_cancel)
    await apply(db, mid, Action.run)
    row = await current(db, mid)
    assert (row.status, row.cancel_requested, row.attempt) == (S.queued, False, 3)
    await apply(db, mid, Action.claim)
    await apply(db, mid, Action.complete)
    types = [e.type for e in await event_log(db, mid)]
    assert types == [
        "migration.queued", "migration.started", "migration.failed", "migration.queued",
        "migration.started", "migration.cancel_requested", "migration.cancelled",
        "migration.queued", "migration.started", "migration.completed",
    ]


@pytest.mark.parametrize(
    ("setup", "action"),
    [([], Action.run), ([Action.run], Action.claim), ([Action.run], Action.cancel),
     ([Action.run, Action.claim], Action.complete), ([Action.run, Action.claim], Action.fail)],
)
async def test_racing_sessions_exactly_one_wins(
    db: Database, setup: list[Action], action: Action
) -> None:
    mid = await insert(db)
    for step in setup:
        await apply(db, mid, step)
    results = await asyncio.gather(*(apply(db, mid, action) for _ in range(8)),
                                   return_exceptions=True)
    wins = [r for r in results if isinstance(r, machine.Applied)]
    losses = [r for r in results if isinstance(r, InvalidTransition)]
    assert (len(wins), len(losses)) == (1, 7), results
    log = await event_log(db, mid)
    assert [e.seq for e in log] == list(range(1, len(setup) + 2))


async def test_a_blocked_writer_sees_the_winners_status(db: Database) -> None:
    """Deterministic interleaving: B's guarded UPDATE waits on A's row lock, then finds
    the status moved and matches nothing."""
    mid = await insert(db)
    async with db.session() as a:
        await machine.apply(a, mid, "acme", Action.run)
        b = asyncio.create_task(apply(db, mid, Action.run))
        await asyncio.sleep(0.3)
        assert not b.done()  # blocked on the row lock A holds
    with pytest.raises(InvalidTransition, match="that is queued"):
        await b
    assert (await current(db, mid)).attempt == 1


async def test_stale_epoch_never_overwrites(db: Database) -> None:
    mid = await insert(db)
    await apply(db, mid, Action.run)
    old = (await apply(db, mid, Action.claim)).epoch
    await expire_lease(db, mid)  # worker 1 stalls; worker 2 takes over
    new = (await apply(db, mid, Action.claim, lease=Lease("worker-2", 60))).epoch
    assert new == old + 1
    for action in (Action.complete, Action.fail, Action.release, Action.cancel):
        with pytest.raises(StaleEpoch, match=f"epoch {old} is stale"):
            await apply(db, mid, action, epoch=old)
    with pytest.raises(StaleEpoch):
        async with db.session() as session:
            await machine.append_event(session, mid, "acme", "step.finished", epoch=old)
    row = await current(db, mid)
    assert (row.status, row.lease_owner, row.epoch) == (S.running, "worker-2", new)
    await apply(db, mid, Action.complete, epoch=new)
    assert (await current(db, mid)).status == S.completed


async def test_claim_refused_while_leased_then_reclaimed(db: Database) -> None:
    mid = await insert(db)
    await apply(db, mid, Action.run)
    await apply(db, mid, Action.claim)
    with pytest.raises(InvalidTransition, match="leased by worker-1"):
        await apply(db, mid, Action.claim, lease=Lease("worker-2", 60))
    await expire_lease(db, mid)
    applied = await apply(db, mid, Action.claim, lease=Lease("worker-2", 60))
    assert (applied.event_type, applied.epoch) == ("migration.reclaimed", 2)


async def test_release_gives_the_migration_back(db: Database) -> None:
    mid = await insert(db)
    await apply(db, mid, Action.run)
    await apply(db, mid, Action.claim)
    await apply(db, mid, Action.release)
    row = await current(db, mid)
    assert (row.status, row.lease_owner) == (S.queued, None)
    assert (await apply(db, mid, Action.claim)).epoch == 2


async def test_unknown_or_foreign_migration_is_not_found(db: Database) -> None:
    mid = await insert(db, tenant="other")
    async with db.session() as session:
        with pytest.raises(NotFound):
            await machine.apply(session, mid, "acme", Action.run)
        with pytest.raises(NotFound):
            await machine.apply(session, uuid.uuid4(), "acme", Action.cancel)
        with pytest.raises(NotFound):
            await machine.append_event(session, mid, "acme", "x")


async def test_worker_transitions_require_an_epoch(db: Database) -> None:
    mid = await insert(db)
    async with db.session() as session:
        with pytest.raises(ValueError, match="epoch"):
            await machine.apply(session, mid, "acme", Action.complete)
        with pytest.raises(ValueError, match="lease"):
            await machine.apply(session, mid, "acme", Action.claim)
        with pytest.raises(ValueError, match="failure"):
            await machine.apply(session, mid, "acme", Action.fail, epoch=0)


async def test_append_event_shares_the_sequence(db: Database) -> None:
    mid = await insert(db)
    async with db.session() as session:
        assert await machine.append_event(session, mid, "acme", "migration.created") == 1
    await apply(db, mid, Action.run)
    async with db.session() as session:
        seq = await machine.append_event(session, mid, "acme", "step.started", {"step": "x"})
    assert seq == 3
    assert [e.type for e in await event_log(db, mid)] == [
        "migration.created", "migration.queued", "step.started"]


async def _set_steps(db: Database, mid: uuid.UUID, statuses: dict[str, StepStatus]) -> None:
    async with db.engine.begin() as conn:
        for name, status in statuses.items():
            await conn.execute(
                text("UPDATE migration_steps SET status = :s, error = 'x', bytes_done = 5 "
                     "WHERE migration_id = :m AND name = :n"),
                {"s": status.value, "m": mid, "n": name})
        await conn.execute(text("UPDATE migrations SET checkpoint = '{\"offset\": 42}' "
                                "WHERE id = :m"), {"m": mid})


async def test_run_after_failure_resumes_at_the_first_undone_step(db: Database) -> None:
    """Transfer failed, the unwind removed the snapshot: redo from the snapshot."""
    mid = await insert(db)
    await apply(db, mid, Action.run)
    await apply(db, mid, Action.claim)
    done, failed = StepStatus.completed, StepStatus.failed
    await _set_steps(db, mid, {"validate": done, "snapshot": done, "transfer": failed,
                               "remove_snapshot": done})
    await apply(db, mid, Action.fail)
    await apply(db, mid, Action.run)
    row = await current(db, mid)
    assert {s.name: s.status for s in row.steps} == {
        "validate": "completed", "snapshot": "pending", "transfer": "pending",
        "verify": "pending", "remove_snapshot": "pending"}
    assert row.steps[0].error == "x"  # completed steps are left alone
    assert all(s.error is None and s.bytes_done == 0 for s in row.steps[1:])
    assert row.checkpoint is None  # its bytes came from a snapshot that is gone


async def test_run_after_interruption_keeps_completed_steps_and_checkpoint(db: Database) -> None:
    mid = await insert(db)
    await apply(db, mid, Action.run)
    await apply(db, mid, Action.claim)
    done = StepStatus.completed
    await _set_steps(db, mid, {"validate": done, "snapshot": done,
                               "transfer": StepStatus.running})
    await apply(db, mid, Action.cancel)
    await apply(db, mid, Action.finish_cancel)
    await apply(db, mid, Action.run)
    row = await current(db, mid)
    assert [s.status for s in row.steps] == [
        "completed", "completed", "pending", "pending", "pending"]
    assert row.checkpoint == {"offset": 42}
