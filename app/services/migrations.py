"""Migration use cases: create, read, list, run, cancel, delete, read events.

The service checks what a schema cannot (cross-field rules, referenced clouds exist
and belong to the caller, the capability matrix), keeps secrets out of the spec and
writes rows and events through :mod:`app.engines.machine` and the repository. It
never commits: the request's transaction does, so a failure anywhere leaves nothing.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.crypto import SecretBox
from app.drivers.capabilities import MATRIX, CapabilityMatrix, Role
from app.drivers.registry import placement_errors
from app.engines import machine
from app.engines.machine import Action
from app.engines.plans import flags_from_spec, plan_for
from app.errors import Conflict, InvalidInput, NotFound
from app.models.db import Cloud, Migration
from app.models.enums import (
    HypervisorMode,
    ImageFormat,
    ImageStatus,
    MigrationStatus,
    MigrationType,
    StepStatus,
)
from app.models.json import JSON
from app.models.schemas.migrations import (
    CloudDestination,
    EventOut,
    EventPage,
    FieldProblem,
    HypervisorCreate,
    HypervisorSource,
    ImageExtractCreate,
    LibraryImageSource,
    LiveStreamCreate,
    MigrationView,
    NewVmDestination,
    dump_view,
    split_secrets,
    view_of,
)
from app.models.schemas.specs import load_spec, source_key
from app.repositories import clouds as clouds_repo
from app.repositories import events as events_repo
from app.repositories import images as images_repo
from app.repositories import migrations as repo

CreateBody = HypervisorCreate | ImageExtractCreate | LiveStreamCreate


@dataclass(frozen=True, slots=True)
class CloudRef:
    pointer: str
    cloud_id: uuid.UUID
    role: Role


#: Where a page of the newest-first listing starts: the (created_at, id) of the row
#: before it.
PageKey = tuple[datetime, uuid.UUID]


def _cloud_refs(body: CreateBody) -> list[CloudRef]:
    """Every cloud the body names, with the part it must be able to play."""
    match body:
        case HypervisorCreate():
            refs = []
            if isinstance(body.source, HypervisorSource):
                refs.append(
                    CloudRef("/source/cloud_id", body.source.cloud_id, Role.hypervisor_source))
            if body.mode is HypervisorMode.new and body.destination is not None:
                refs.append(
                    CloudRef(
                        "/destination/cloud_id",
                        body.destination.cloud_id,
                        Role.hypervisor_destination,
                    )
                )
        case ImageExtractCreate():
            refs = [CloudRef("/source/cloud_id", body.source.cloud_id, Role.image_extract_source)]
            if isinstance(body.destination, CloudDestination):
                refs.append(
                    CloudRef(
                        "/destination/cloud_id",
                        body.destination.cloud_id,
                        Role.image_extract_destination,
                    )
                )
        case LiveStreamCreate():
            refs = [CloudRef("/source/cloud_id", body.source.cloud_id, Role.live_stream_source)]
            if isinstance(body.destination, NewVmDestination):
                refs.append(
                    CloudRef(
                        "/destination/cloud_id",
                        body.destination.cloud_id,
                        Role.live_stream_new_destination,
                    )
                )
    return refs


async def check(
    session: AsyncSession, tenant: str, body: CreateBody, matrix: CapabilityMatrix = MATRIX,
    clouds: _CloudLookup | None = None,
) -> list[FieldProblem]:
    """Everything wrong with ``body`` beyond its schema, each at its JSON pointer."""
    clouds = clouds or _CloudLookup(session, tenant)
    problems = body.field_problems()
    if isinstance(body, HypervisorCreate) and isinstance(body.source, LibraryImageSource):
        image = await images_repo.get_image(session, tenant, body.source.image_id)
        if image is None or image.status != ImageStatus.ready:
            problems.append(FieldProblem("/source/image_id",
                                         f"no ready library image {body.source.image_id}"))
    for ref in _cloud_refs(body):
        cloud = await clouds.get(ref.cloud_id)
        if cloud is None:
            problems.append(FieldProblem(ref.pointer, f"no such cloud: {ref.cloud_id}"))
        elif not matrix.allows(ref.role, cloud.kind):
            problems.append(
                FieldProblem(ref.pointer, matrix.refusal(ref.role, cloud.kind, cloud.name))
            )
        elif ref.role is Role.hypervisor_destination and isinstance(body, HypervisorCreate):
            problems.extend(_placement_problems(body, cloud.kind))
    return problems


def _placement_problems(body: HypervisorCreate, kind: str) -> list[FieldProblem]:
    """Destination fields the destination's placement model does not have (``flavor``
    on VMware) or refuses: named, never silently dropped."""
    assert body.destination is not None
    fields = body.destination.model_dump(exclude={"cloud_id", "server_name"},
                                         exclude_none=True)
    return [FieldProblem(f"/destination/{e.field}", e.detail)
            for e in placement_errors(kind, fields)]


def _rejection(problems: Sequence[FieldProblem]) -> InvalidInput:
    detail = "; ".join(f"{p.pointer}: {p.detail}" for p in problems[:5])
    return InvalidInput(
        f"the migration cannot be created as requested: {detail}",
        extra={"errors": [{"pointer": p.pointer, "detail": p.detail} for p in problems]},
    )


class _CloudLookup:
    """Clouds by id for one request: a batch naming one cloud a thousand times reads it
    once."""

    def __init__(self, session: AsyncSession, tenant: str) -> None:
        self.session = session
        self.tenant = tenant
        self._seen: dict[uuid.UUID, Cloud | None] = {}

    async def get(self, cloud_id: uuid.UUID) -> Cloud | None:
        if cloud_id not in self._seen:
            self._seen[cloud_id] = await clouds_repo.get_cloud(self.session, self.tenant,
                                                                cloud_id)
        return self._seen[cloud_id]


async def create(
    session: AsyncSession,
    box: SecretBox,
    tenant: str,
    body: CreateBody,
    matrix: CapabilityMatrix = MATRIX,
) -> MigrationView:
    """Validate, store (secrets sealed apart), write the plan's step rows and the
    ``migration.created`` event; with ``run``, queue it in the same transaction."""
    problems = await check(session, tenant, body, matrix)
    if problems:
        raise _rejection(problems)
    new = _prepare_body(box, tenant, body)
    return (await _store(session, [new]))[0]


#: Most migrations one batch request may create.
MAX_BATCH = 1000


async def create_many(
    session: AsyncSession,
    box: SecretBox,
    tenant: str,
    bodies: Sequence[CreateBody],
    matrix: CapabilityMatrix = MATRIX,
) -> list[bytes]:
    """Create every one of ``bodies`` or none: each is checked as :func:`create` checks
    one (problems are reported at ``/items/<index>/...``), then all are written with a
    few multi-row statements. Items with ``run`` are queued one transition each.
    Returns their views as JSON, in the order of ``bodies`` (rendered by PostgreSQL in
    one more statement)."""
    if len(bodies) > MAX_BATCH:
        raise InvalidInput(f"at most {MAX_BATCH} migrations per batch, got {len(bodies)}")
    lookup = _CloudLookup(session, tenant)
    problems: list[FieldProblem] = []
    for index, body in enumerate(bodies):
        problems.extend(FieldProblem(f"/items/{index}{p.pointer}", p.detail)
                        for p in await check(session, tenant, body, matrix, lookup))
    if problems:
        raise _rejection(problems)
    news = [_prepare_body(box, tenant, body) for body in bodies]
    await _store(session, news, views=False)
    rendered = {r.id: r for r in await repo.rendered_many(session, tenant,
                                                           [n.row["id"] for n in news])}
    return [_json_of(rendered[n.row["id"]]) for n in news]


@dataclass(slots=True)
class _New:
    """One migration ready to be written: its row, its step rows, its created event."""

    row: dict[str, Any]
    steps: list[dict[str, Any]]
    event: dict[str, Any]
    run: bool


def _prepare_body(box: SecretBox, tenant: str, body: CreateBody) -> _New:
    if isinstance(body, HypervisorCreate) and body.mode is HypervisorMode.store:
        body = body.model_copy(update={"format": body.format or ImageFormat.qcow2})
    spec, secrets = split_secrets(body)
    mode = body.mode if isinstance(body, HypervisorCreate) else None
    return _prepare(tenant, MigrationType(body.type), mode, body.name, spec,
                    box.seal(secrets), run=body.run)


def _prepare(
    tenant: str, type_: MigrationType, mode: HypervisorMode | None, name: str,
    spec: dict[str, Any], sealed: bytes | None, *, run: bool,
) -> _New:
    typed = load_spec(spec)
    plan = plan_for(type_, mode, flags_from_spec(typed))
    migration_id = uuid.uuid4()
    row: dict[str, Any] = {
        "id": migration_id, "tenant": tenant, "name": name, "type": type_.value,
        "mode": mode.value if mode else None, "status": MigrationStatus.pending.value,
        "phase": None, "spec": spec, "source_key": source_key(typed), "secrets": sealed,
        "attempt": 0, "epoch": 0, "version": 1,
        # The migration.created event below is seq 1.
        "event_seq": 1,
        "bytes_total": 0, "bytes_done": 0, "rate": 0, "cancel_requested": False,
    }
    steps = [
        {"migration_id": migration_id, "position": i, "name": step.name,
         "cleanup": step.cleanup, "status": StepStatus.pending.value,
         "bytes_total": 0, "bytes_done": 0}
        for i, step in enumerate(plan.steps)
    ]
    created: dict[str, Any] = {
        "type": type_.value, "mode": row["mode"], "name": name, "steps": list(plan.names),
    }
    event = {"tenant": tenant, "migration_id": migration_id, "seq": 1,
             "type": "migration.created", "payload": created}
    return _New(row, steps, event, run)


async def _store(session: AsyncSession, news: Sequence[_New], *, views: bool = True
                 ) -> list[MigrationView]:
    """Write prepared migrations (three statements), queue those with ``run``, and
    (``views``) return their views: built from what was written, read back only when
    queued."""
    stamps = await repo.insert_many(
        session,
        [n.row for n in news],
        [step for n in news for step in n.steps],
        [n.event for n in news],
    )
    out: list[MigrationView] = []
    for new, (migration_id, created_at) in zip(news, stamps, strict=True):
        if new.run:
            await machine.apply(session, migration_id, new.row["tenant"], Action.run)
            if views:
                out.append(await get(session, new.row["tenant"], migration_id))
        elif views:
            out.append(_fresh_view(new, created_at))
    return out


def _fresh_view(new: _New, created_at: datetime) -> MigrationView:
    row = new.row
    steps: list[JSON] = [
        {**{k: v for k, v in step.items() if k != "migration_id"},
         "started_at": None, "finished_at": None, "error": None, "result": None}
        for step in new.steps
    ]
    return _view(repo.Record(
        id=row["id"], name=row["name"], type=row["type"], status=row["status"], phase=None,
        spec=row["spec"], error=None, attempt=0, cancel_requested=False, version=1,
        bytes_done=0, bytes_total=0, rate=0, created_at=created_at, updated_at=created_at,
        started_at=None, finished_at=None, steps=steps,
    ))


def _view(rec: repo.Record) -> MigrationView:
    """The API view of a migration read as a :class:`~app.repositories.migrations.Record`
    (validated once, straight from the columns: no ORM object in between)."""
    left = rec.bytes_total - rec.bytes_done
    eta = math.ceil(left / rec.rate) if rec.rate > 0 and left > 0 else None
    spec = rec.spec if isinstance(rec.spec, dict) else {}
    return view_of({
        **spec,
        "id": rec.id, "name": rec.name, "type": rec.type, "status": rec.status,
        "phase": rec.phase, "error": rec.error, "attempt": rec.attempt,
        "cancel_requested": rec.cancel_requested, "version": rec.version,
        "progress": {"bytes_done": rec.bytes_done, "bytes_total": rec.bytes_total,
                     "rate": rec.rate, "eta_seconds": eta},
        "steps": rec.steps,
        "created_at": rec.created_at, "updated_at": rec.updated_at,
        "started_at": rec.started_at, "finished_at": rec.finished_at,
    })


async def insert(
    session: AsyncSession, tenant: str, type_: MigrationType, mode: HypervisorMode | None,
    name: str, spec: dict[str, Any], sealed: bytes | None, *, run: bool,
) -> MigrationView:
    """Store a validated migration (or job) with its plan's step rows and the
    ``migration.created`` event; with ``run``, queue it in the same transaction.

    ``spec`` is the secret-free request as stored; it must validate as its type's
    stored-spec model (:func:`~app.models.schemas.specs.load_spec`), which is what
    workers will read back."""
    new = _prepare(tenant, type_, mode, name, spec, sealed, run=run)
    return (await _store(session, [new]))[0]


async def _row(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> Migration:
    row = await repo.get(session, tenant, migration_id)
    if row is None:
        raise NotFound(f"no migration {migration_id}")
    return row


async def get(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> MigrationView:
    """One statement: the migration and its steps."""
    rec = await repo.record(session, tenant, migration_id)
    if rec is None:
        raise NotFound(f"no migration {migration_id}")
    return _view(rec)


#: Types whose stored spec holds every field of their API view, so PostgreSQL's
#: rendering of it is the view as is (tests/api/test_migration_reads.py checks each
#: shape against the models). Others (conversions store a short spec) go through the
#: models.
RENDERED_AS_STORED = frozenset({
    MigrationType.hypervisor.value, MigrationType.image_extract.value,
    MigrationType.live_stream.value,
})


def _json_of(item: repo.Rendered) -> bytes:
    if item.type in RENDERED_AS_STORED:
        return item.body.encode()
    return dump_view(view_of(json.loads(item.body)))


async def get_json(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> bytes:
    """The migration's view as JSON, rendered by PostgreSQL in one statement."""
    item = await repo.rendered(session, tenant, migration_id)
    if item is None:
        raise NotFound(f"no migration {migration_id}")
    return _json_of(item)


@dataclass(frozen=True, slots=True)
class RenderedPage:
    items: list[bytes]
    next_key: PageKey | None


async def list_json(
    session: AsyncSession,
    tenant: str,
    *,
    statuses: Sequence[MigrationStatus],
    types: Sequence[MigrationType],
    limit: int,
    before: PageKey | None,
) -> RenderedPage:
    """Newest first, after ``before`` (a previous page's ``next_key``); each item JSON
    as PostgreSQL rendered it, the page and its steps in one statement."""
    rows = await repo.rendered_page(
        session, tenant, statuses=[s.value for s in statuses],
        types=[t.value for t in types], before=before, limit=limit + 1,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_key = (rows[-1].created_at, rows[-1].id) if more else None
    return RenderedPage([_json_of(r) for r in rows], next_key)


async def run(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> MigrationView:
    """Queue it (from pending, failed or cancelled); a new attempt resumes where the
    last one stopped (see :func:`app.engines.machine.resume_reset`)."""
    await machine.apply(session, migration_id, tenant, Action.run)
    return await get(session, tenant, migration_id)


async def cancel(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> MigrationView:
    """Cancelled at once if nothing has been done yet; else ``cancelling`` until a worker
    has unwound what the started steps did (it sees the request within a heartbeat, or
    claims the migration to unwind it when no worker holds it)."""
    row = await _row(session, tenant, migration_id)
    started = any(s.status != StepStatus.pending for s in row.steps if not s.cleanup)
    action = Action.cancel_started if started else Action.cancel
    await machine.apply(session, migration_id, tenant, action)
    return await get(session, tenant, migration_id)


async def delete(session: AsyncSession, tenant: str, migration_id: uuid.UUID) -> None:
    """Remove it with its steps and events; refused while a worker may hold it.

    A tenant-level ``migration.deleted`` event (no migration id, payload names it)
    outlives the row for consumers such as webhooks.
    """
    seq = await repo.delete_unless_active(session, tenant, migration_id, machine.DELETABLE)
    if seq is None:
        current = await repo.state(session, migration_id, tenant)
        if current is None:
            raise NotFound(f"no migration {migration_id}")
        allowed = ", ".join(sorted(s.value for s in machine.DELETABLE))
        raise Conflict(
            f"cannot delete a migration that is {current.status}; cancel it and "
            f"wait until it is cancelled (deletable when: {allowed})"
        )
    # Tenant-level, like every event without a migration: seq 0 (docs/webhooks.md).
    await events_repo.record(session, tenant, "migration.deleted",
                             {"migration_id": str(migration_id)})


async def events(
    session: AsyncSession, tenant: str, migration_id: uuid.UUID, *, after: int, limit: int
) -> EventPage:
    """Events with ``seq > after``, oldest first."""
    await _row(session, tenant, migration_id)
    rows = await repo.events(session, tenant, migration_id, after=after, limit=limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return EventPage(
        items=[EventOut.of(r) for r in rows], next_after=rows[-1].seq if more else None
    )
