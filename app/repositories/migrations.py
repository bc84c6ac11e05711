"""SQL for migrations, their steps and their events.

Every query filters by tenant, so another tenant's ids are simply absent. State
changes are single guarded statements (``UPDATE ... WHERE status IN (...)``): the
database, not a read-then-write in Python, decides which of two racing requests wins.
The policy (which moves exist, what they do) lives in :mod:`app.engines.machine`; this
module only knows how to express it in SQL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Numeric,
    Select,
    Table,
    Text,
    and_,
    case,
    delete,
    func,
    literal_column,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import (
    insert as sql_insert,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import Migration, MigrationEvent, MigrationStep
from app.models.enums import MigrationStatus, StepStatus
from app.models.json import JSON

_ACTIVE = (MigrationStatus.running, MigrationStatus.cancelling)


class Effect(StrEnum):
    """What a guarded status UPDATE may do besides moving ``status``.

    Every move also bumps ``version`` and ``event_seq``, stamps ``updated_at``, sets
    ``finished_at`` exactly when the new status is terminal, and zeroes ``rate``
    unless the new status is an active one.
    """

    bump_attempt = "bump_attempt"
    bump_epoch = "bump_epoch"
    take_lease = "take_lease"
    drop_lease = "drop_lease"
    set_error = "set_error"
    clear_error = "clear_error"
    request_cancel = "request_cancel"
    clear_cancel = "clear_cancel"
    start_clock = "start_clock"
    reset_clock = "reset_clock"


@dataclass(frozen=True, slots=True)
class Moved:
    """What a successful guarded UPDATE returned."""

    previous: MigrationStatus
    status: MigrationStatus
    event_seq: int
    epoch: int
    attempt: int
    version: int


@dataclass(frozen=True, slots=True)
class State:
    """The guard-relevant columns, read to explain why a guarded UPDATE matched nothing."""

    status: MigrationStatus
    epoch: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    leased: bool


async def move(
    session: AsyncSession,
    migration_id: uuid.UUID,
    tenant: str,
    *,
    moves: Mapping[MigrationStatus, MigrationStatus],
    effects: Collection[Effect],
    epoch: int | None = None,
    lease_must_be_free: bool = False,
    lease_owner: str | None = None,
    lease_seconds: int | None = None,
    error: JSON | None = None,
) -> Moved | None:
    """One guarded UPDATE: from any key of ``moves`` to its value, or nothing.

    The CTE locks the row first (``FOR UPDATE``, which in READ COMMITTED waits for and
    then sees the newest committed version), so ``previous`` is the status this very
    statement moved from, even under concurrent writers. None means the guard did not
    match: wrong status, stale epoch, live lease, or no such row for this tenant.
    """
    prev = (
        select(Migration.id, Migration.status)
        .where(Migration.id == migration_id, Migration.tenant == tenant)
        .with_for_update()
        .cte("prev")
    )
    terminal = [s for s, t in moves.items() if MigrationStatus(t).is_terminal()]
    active = [s for s, t in moves.items() if t in _ACTIVE]
    values: dict[Any, Any] = {
        Migration.status: case({s.value: t.value for s, t in moves.items()},
                               value=Migration.status),
        Migration.finished_at: case((Migration.status.in_(terminal), func.now()), else_=null()),
        Migration.rate: case((Migration.status.in_(active), Migration.rate), else_=0),
        Migration.updated_at: func.now(),
        Migration.version: Migration.version + 1,
        Migration.event_seq: Migration.event_seq + 1,
    }
    values.update(_effect_values(effects, lease_owner, lease_seconds, error))
    guards: list[ColumnElement[bool]] = [
        Migration.id == prev.c.id,
        Migration.status.in_([s.value for s in moves]),
    ]
    if epoch is not None:
        guards.append(Migration.epoch == epoch)
    if lease_must_be_free:
        guards.append(or_(Migration.lease_expires_at.is_(None),
                          Migration.lease_expires_at < func.now()))
    stmt = (
        update(Migration)
        .where(*guards)
        .values(values)
        .returning(prev.c.status, Migration.status, Migration.event_seq, Migration.epoch,
                   Migration.attempt, Migration.version)
        .execution_options(synchronize_session=False)
    )
    row = (await session.execute(stmt)).one_or_none()
    if row is None:
        return None
    return Moved(MigrationStatus(row[0]), MigrationStatus(row[1]), row[2], row[3], row[4], row[5])


def _effect_values(
    effects: Collection[Effect], lease_owner: str | None, lease_seconds: int | None,
    error: JSON | None,
) -> dict[Any, Any]:
    values: dict[Any, Any] = {}
    for effect in effects:
        match effect:
            case Effect.bump_attempt:
                values[Migration.attempt] = Migration.attempt + 1
            case Effect.bump_epoch:
                values[Migration.epoch] = Migration.epoch + 1
            case Effect.take_lease:
                if lease_owner is None or lease_seconds is None:
                    raise ValueError("take_lease needs lease_owner and lease_seconds")
                values[Migration.lease_owner] = lease_owner
                values[Migration.lease_expires_at] = func.now() + timedelta(seconds=lease_seconds)
            case Effect.drop_lease:
                values[Migration.lease_owner] = None
                values[Migration.lease_expires_at] = None
            case Effect.set_error:
                values[Migration.error] = error
            case Effect.clear_error:
                values[Migration.error] = None
            case Effect.request_cancel:
                values[Migration.cancel_requested] = True
            case Effect.clear_cancel:
                values[Migration.cancel_requested] = False
            case Effect.start_clock:
                values[Migration.started_at] = func.coalesce(Migration.started_at, func.now())
            case Effect.reset_clock:
                values[Migration.started_at] = None
    return values


async def state(session: AsyncSession, migration_id: uuid.UUID, tenant: str) -> State | None:
    row = (
        await session.execute(
            select(Migration.status, Migration.epoch, Migration.lease_owner,
                   Migration.lease_expires_at,
                   func.coalesce(Migration.lease_expires_at > func.now(), False))
            .where(Migration.id == migration_id, Migration.tenant == tenant)
        )
    ).one_or_none()
    if row is None:
        return None
    return State(MigrationStatus(row[0]), row[1], row[2], row[3], bool(row[4]))


async def next_event_seq(
    session: AsyncSession, migration_id: uuid.UUID, tenant: str, epoch: int | None = None
) -> int | None:
    """Reserve the next event number (the row lock serialises writers); None if no row."""
    guards = [Migration.id == migration_id, Migration.tenant == tenant]
    if epoch is not None:
        guards.append(Migration.epoch == epoch)
    stmt = (
        update(Migration).where(*guards)
        .values({Migration.event_seq: Migration.event_seq + 1})
        .returning(Migration.event_seq)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def insert_event(
    session: AsyncSession, tenant: str, migration_id: uuid.UUID | None, seq: int,
    type_: str, payload: JSON,
) -> None:
    session.add(MigrationEvent(tenant=tenant, migration_id=migration_id, seq=seq, type=type_,
                               payload=payload))
    await session.flush()


async def insert(session: AsyncSession, row: Migration) -> None:
    session.add(row)
    await session.flush()


async def get(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> Migration | None:
    """Fresh from the database (guarded UPDATEs bypass the identity map)."""
    result = await session.execute(
        select(Migration)
        .where(Migration.id == migration_id, Migration.tenant == tenant)
        .execution_options(populate_existing=True)
    )
    return result.scalar_one_or_none()


# --- read paths: one statement per migration or page, no ORM objects ----------------

#: What the API shows of a step, as one JSON object per step.
_STEP_JSON = func.jsonb_build_object(
    "position", MigrationStep.position, "name", MigrationStep.name,
    "cleanup", MigrationStep.cleanup, "status", MigrationStep.status,
    "bytes_done", MigrationStep.bytes_done, "bytes_total", MigrationStep.bytes_total,
    "started_at", MigrationStep.started_at, "finished_at", MigrationStep.finished_at,
    "error", MigrationStep.error, "result", MigrationStep.result,
)
#: The migration's steps in order, aggregated in the same statement (no N+1).
_STEPS = (
    select(func.coalesce(
        func.jsonb_agg(aggregate_order_by(_STEP_JSON, MigrationStep.position)),
        literal_column("'[]'::jsonb"),
    ))
    .where(MigrationStep.migration_id == Migration.id)
    .scalar_subquery()
    .label("steps")
)
_VIEW_COLUMNS = (
    Migration.id, Migration.name, Migration.type, Migration.status, Migration.phase,
    Migration.spec, Migration.error, Migration.attempt, Migration.cancel_requested,
    Migration.version, Migration.bytes_done, Migration.bytes_total, Migration.rate,
    Migration.created_at, Migration.updated_at, Migration.started_at, Migration.finished_at,
)


@dataclass(frozen=True, slots=True)
class Record:
    """A migration as the API shows it, read in one statement: its columns, and its
    steps as the JSON objects of :data:`_STEP_JSON` in position order."""

    id: uuid.UUID
    name: str
    type: str
    status: str
    phase: str | None
    spec: JSON
    error: JSON | None
    attempt: int
    cancel_requested: bool
    version: int
    bytes_done: int
    bytes_total: int
    rate: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: list[JSON]


def _records_query() -> Select[*tuple[Any, ...]]:
    return select(*_VIEW_COLUMNS, _STEPS)


async def record(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> Record | None:
    """One migration with its steps, in one statement."""
    stmt = _records_query().where(Migration.id == migration_id, Migration.tenant == tenant)
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else Record(*row)


# The same view, serialised by PostgreSQL: the spec merged with the state columns, as
# JSON text that goes to the client as it is (no decoding, no model, no encoding in
# Python). Keys and values are those of the API's migration models; the service only
# uses it for types whose stored spec holds every field of the view, and a test checks
# it against the models for every such shape.
_TS = "YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\""


def _ts(column: Any) -> Any:
    return case((column.is_(None), null()),
                else_=func.to_char(func.timezone("UTC", column), _TS))


_STEP_TEXT = func.jsonb_build_object(
    "position", MigrationStep.position, "name", MigrationStep.name,
    "cleanup", MigrationStep.cleanup, "status", MigrationStep.status,
    "bytes_done", MigrationStep.bytes_done, "bytes_total", MigrationStep.bytes_total,
    "started_at", _ts(MigrationStep.started_at), "finished_at", _ts(MigrationStep.finished_at),
    "error", MigrationStep.error, "result", MigrationStep.result,
)
_STEPS_TEXT = (
    select(func.coalesce(
        func.jsonb_agg(aggregate_order_by(_STEP_TEXT, MigrationStep.position)),
        literal_column("'[]'::jsonb"),
    ))
    .where(MigrationStep.migration_id == Migration.id)
    .scalar_subquery()
)
_LEFT = Migration.bytes_total - Migration.bytes_done
_ERROR = case(  # SQL NULL or JSON null: none
    (func.coalesce(func.jsonb_typeof(Migration.error), "null") != "object", null()),
    else_=func.jsonb_build_object(
        "type", Migration.error["type"], "title", Migration.error["title"],
        "detail", Migration.error["detail"],
        "step", func.coalesce(Migration.error["step"], literal_column("'null'::jsonb")),
        "retryable", func.coalesce(Migration.error["retryable"],
                                   literal_column("'false'::jsonb")),
    ),
)
_BODY = Migration.spec.op("||")(func.jsonb_build_object(
    "id", Migration.id, "name", Migration.name, "type", Migration.type,
    "mode", Migration.mode, "status", Migration.status, "phase", Migration.phase,
    "progress", func.jsonb_build_object(
        "bytes_done", Migration.bytes_done, "bytes_total", Migration.bytes_total,
        "rate", Migration.rate,
        "eta_seconds", case(
            (and_(Migration.rate > 0, _LEFT > 0),
             func.ceil(func.cast(_LEFT, Numeric) / Migration.rate).cast(BigInteger)),
            else_=null()),
    ),
    "error", _ERROR, "attempt", Migration.attempt,
    "cancel_requested", Migration.cancel_requested, "version", Migration.version,
    "steps", _STEPS_TEXT,
    "created_at", _ts(Migration.created_at), "updated_at", _ts(Migration.updated_at),
    "started_at", _ts(Migration.started_at), "finished_at", _ts(Migration.finished_at),
))


@dataclass(frozen=True, slots=True)
class Rendered:
    """A migration's API view as JSON text, with what paging and checks need."""

    id: uuid.UUID
    created_at: datetime
    type: str
    body: str


def _rendered_query() -> Select[*tuple[Any, ...]]:
    return select(Migration.id, Migration.created_at, Migration.type,
                  _BODY.cast(Text).label("body"))


async def rendered(
    session: AsyncSession, tenant: str, migration_id: uuid.UUID
) -> Rendered | None:
    """One migration's view as JSON text, in one statement."""
    stmt = _rendered_query().where(Migration.id == migration_id, Migration.tenant == tenant)
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else Rendered(*row)


def _paged(stmt: Select[*tuple[Any, ...]], tenant: str, statuses: Sequence[str],
           types: Sequence[str], before: tuple[datetime, uuid.UUID] | None,
           limit: int) -> Select[*tuple[Any, ...]]:
    stmt = stmt.where(Migration.tenant == tenant)
    if statuses:
        stmt = stmt.where(Migration.status.in_(statuses))
    if types:
        stmt = stmt.where(Migration.type.in_(types))
    if before is not None:
        key = tuple_(*before, types=[Migration.created_at.type, Migration.id.type])
        stmt = stmt.where(tuple_(Migration.created_at, Migration.id) < key)
    return stmt.order_by(Migration.created_at.desc(), Migration.id.desc()).limit(limit)


def rendered_page_query(
    tenant: str, *, statuses: Sequence[str], types: Sequence[str],
    before: tuple[datetime, uuid.UUID] | None, limit: int,
) -> Select[*tuple[Any, ...]]:
    """A page of views as JSON text, newest first by (created_at, id), after ``before``:
    a backward range scan of ``ix_migrations_tenant_created`` that stops after ``limit``
    rows however many the tenant has (with a status/type filter, after ``limit``
    matching ones)."""
    return _paged(_rendered_query(), tenant, statuses, types, before, limit)


async def rendered_page(
    session: AsyncSession, tenant: str, *, statuses: Sequence[str], types: Sequence[str],
    before: tuple[datetime, uuid.UUID] | None, limit: int,
) -> list[Rendered]:
    stmt = rendered_page_query(tenant, statuses=statuses, types=types, before=before,
                               limit=limit)
    return [Rendered(*row) for row in await session.execute(stmt)]


# --- write paths for many rows at once ----------------------------------------------


async def rendered_many(
    session: AsyncSession, tenant: str, ids: Sequence[uuid.UUID]
) -> list[Rendered]:
    """The views of these migrations (in no particular order), in one statement."""
    stmt = _rendered_query().where(Migration.tenant == tenant, Migration.id.in_(list(ids)))
    return [Rendered(*row) for row in await session.execute(stmt)]


_STEP_ROWS = text(
    "INSERT INTO migration_steps (migration_id, position, name, cleanup, status, "
    "bytes_total, bytes_done) "
    "SELECT m, p, n, c, s, 0, 0 FROM unnest("
    "CAST(:migration_ids AS uuid[]), CAST(:positions AS integer[]), "
    "CAST(:names AS varchar[]), CAST(:cleanups AS boolean[]), CAST(:statuses AS varchar[])"
    ") AS t(m, p, n, c, s)"
)
_EVENT_ROWS = text(
    "INSERT INTO migration_events (tenant, migration_id, seq, type, payload) "
    "SELECT t, m, q, y, p FROM unnest("
    "CAST(:tenants AS varchar[]), CAST(:migration_ids AS uuid[]), "
    "CAST(:seqs AS integer[]), CAST(:types AS varchar[]), CAST(:payloads AS jsonb[])"
    ") AS e(t, m, q, y, p)"
)


async def insert_many(
    session: AsyncSession,
    migrations: Sequence[Mapping[str, Any]],
    steps: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
) -> list[tuple[uuid.UUID, datetime]]:
    """Insert migrations, their step rows and their events: three statements whatever
    the count (the migrations as multi-row VALUES, steps and events as arrays, so
    thousands of rows cost one parameter set each). Returns each migration's
    (id, created_at), in order."""
    table = cast(Table, Migration.__table__)
    created = await session.execute(
        sql_insert(table).returning(table.c.id, table.c.created_at,
                                    sort_by_parameter_order=True),
        list(migrations),
    )
    stamps = [(row[0], row[1]) for row in created]
    if steps:
        await session.execute(_STEP_ROWS, {
            "migration_ids": [s["migration_id"] for s in steps],
            "positions": [s["position"] for s in steps],
            "names": [s["name"] for s in steps],
            "cleanups": [s["cleanup"] for s in steps],
            "statuses": [s["status"] for s in steps],
        })
    if events:
        await session.execute(_EVENT_ROWS, {
            "tenants": [e["tenant"] for e in events],
            "migration_ids": [e["migration_id"] for e in events],
            "seqs": [e["seq"] for e in events],
            "types": [e["type"] for e in events],
            "payloads": [json.dumps(e["payload"]) for e in events],
        })
    return stamps


async def delete_unless_active(
    session: AsyncSession, tenant: str, migration_id: uuid.UUID,
    deletable: Collection[MigrationStatus],
) -> int | None:
    """Delete if the status allows it; the final ``event_seq``, or None if nothing matched.

    Steps and events go with it (``ON DELETE CASCADE``).
    """
    stmt = (
        delete(Migration)
        .where(Migration.id == migration_id, Migration.tenant == tenant,
               Migration.status.in_([s.value for s in deletable]))
        .returning(Migration.event_seq)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def events(
    session: AsyncSession, tenant: str, migration_id: uuid.UUID, *, after: int, limit: int
) -> list[MigrationEvent]:
    stmt = (
        select(MigrationEvent)
        .where(MigrationEvent.tenant == tenant, MigrationEvent.migration_id == migration_id,
               MigrationEvent.seq > after)
        .order_by(MigrationEvent.seq)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())


async def steps(session: AsyncSession, migration_id: uuid.UUID) -> list[MigrationStep]:
    stmt = (
        select(MigrationStep)
        .where(MigrationStep.migration_id == migration_id)
        .order_by(MigrationStep.position)
        .execution_options(populate_existing=True)
    )
    return list((await session.execute(stmt)).scalars())


async def reset_steps(
    session: AsyncSession, migration_id: uuid.UUID, positions: Collection[int]
) -> None:
    """Back to ``pending`` with no trace of the previous attempt."""
    if not positions:
        return
    await session.execute(
        update(MigrationStep)
        .where(and_(MigrationStep.migration_id == migration_id,
                    MigrationStep.position.in_(list(positions))))
        .values(status=StepStatus.pending.value, error=None, result=None, bytes_done=0,
                started_at=None, finished_at=None)
        .execution_options(synchronize_session=False)
    )


async def clear_checkpoint(session: AsyncSession, migration_id: uuid.UUID) -> None:
    await session.execute(
        update(Migration).where(Migration.id == migration_id)
        .values(checkpoint=None, bytes_done=0)
        .execution_options(synchronize_session=False)
    )
