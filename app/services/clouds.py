"""Use cases for clouds: register, list, read, change, remove.

Credentials are sealed with the :class:`SecretBox` before they reach the repository
and leave this module only as the names of the fields set (``credentials_set``); the
engines decrypt them for a driver (:func:`app.engines.clouds.open_cloud`). Which kinds
can be registered, and their settings and credentials models, come from the driver
registry (:mod:`app.drivers.registry`): a kind no driver serves is refused with a 422.
Services never commit: the request's transaction does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from app.crypto import SecretBox
from app.drivers import registry
from app.drivers.kit.spec import Role
from app.errors import AppError, Conflict, InvalidInput, NotFound
from app.models.db import Cloud
from app.models.enums import CloudKind
from app.models.schemas.clouds import (
    CloudCreateBase,
    CloudKindBase,
    CloudOut,
    CloudUpdate,
    cloud_create_union,
    cloud_kind_out_model,
    reveal,
)
from app.repositories import clouds as repo

if TYPE_CHECKING:
    CloudCreate = CloudCreateBase
    CloudKindOut = CloudKindBase
else:
    #: The ``POST /v1/clouds`` body: one model per registered kind, by ``kind``.
    CloudCreate = cloud_create_union(registry.kind_schemas())
    #: One registered kind as ``GET /v1/clouds/kinds`` shows it.
    CloudKindOut = cloud_kind_out_model([s.placement for s in registry.SPECS])


def cloud_kinds() -> list[CloudKindOut]:
    """The kinds this deployment can register, with their roles, formats and schemas."""
    out = []
    for spec in registry.SPECS:
        for schema in spec.kinds:
            out.append(CloudKindOut(
                kind=schema.kind, platform=spec.platform,
                roles=[r.value for r in Role if registry.can_play(schema.kind, r)],
                import_formats=list(spec.capabilities.import_formats),
                export_formats=list(spec.capabilities.export_formats),
                settings_schema=schema.settings.__name__,
                credentials_schema=schema.credentials.__name__,
                placement=spec.placement(),
            ))
    return out


class PreconditionFailed(AppError):
    status = 412
    code = "precondition-failed"
    title = "Precondition failed"


class CloudInUse(Conflict):
    code = "cloud-in-use"
    title = "Cloud in use"


@dataclass(frozen=True, slots=True)
class CloudPage:
    items: list[CloudOut]
    #: Whether rows follow the last item (the API turns it into a cursor).
    more: bool


def _not_found(cloud_id: uuid.UUID) -> NotFound:
    return NotFound(f"no cloud {cloud_id}")


def to_out(box: SecretBox, row: Cloud) -> CloudOut:
    """The API view of a row. Decrypts only to list the credential field names."""
    return CloudOut(
        id=row.id, name=row.name, kind=CloudKind(row.kind), settings=row.settings,
        credentials_set=sorted(box.open(row.credentials)), version=row.version,
        created_at=row.created_at, updated_at=row.updated_at,
    )


def _check(
    model: type[BaseModel], value: dict[str, Any], pointer: str, errors: list[dict[str, str]]
) -> BaseModel | None:
    """Validate a sub-document, adding its errors (pointers into the request) to ``errors``.

    Only pydantic's message goes out, never the offending input: it may be a secret.
    """
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            parts = [str(p).replace("~", "~0").replace("/", "~1") for p in err["loc"]]
            detail = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            errors.append({"pointer": "/".join([pointer, *parts]), "detail": detail})
        return None


async def create_cloud(
    session: AsyncSession, box: SecretBox, tenant: str, body: CloudCreate
) -> CloudOut:
    """Register a cloud. Raises ``DuplicateCloudName`` (409) for a taken name."""
    sealed = box.seal(reveal(body.credentials)) if body.credentials is not None else None
    row = Cloud(
        tenant=tenant, kind=body.kind, name=body.name,
        settings=body.settings.model_dump(mode="json"), credentials=sealed,
    )
    return to_out(box, await repo.insert_cloud(session, row))


async def list_clouds(
    session: AsyncSession, box: SecretBox, tenant: str, *,
    kind: CloudKind | None, after: tuple[datetime, uuid.UUID] | None, limit: int,
) -> CloudPage:
    """Up to ``limit`` of the tenant's clouds, newest first, after the ``after`` key."""
    rows = await repo.list_clouds(
        session, tenant, kind=kind.value if kind else None, after=after, limit=limit + 1
    )
    return CloudPage(items=[to_out(box, r) for r in rows[:limit]], more=len(rows) > limit)


async def get_cloud(
    session: AsyncSession, box: SecretBox, tenant: str, cloud_id: uuid.UUID
) -> CloudOut:
    row = await repo.get_cloud(session, tenant, cloud_id)
    if row is None:
        raise _not_found(cloud_id)
    return to_out(box, row)


async def update_cloud(
    session: AsyncSession, box: SecretBox, tenant: str, cloud_id: uuid.UUID,
    patch: CloudUpdate, *, versions: frozenset[int] | None,
) -> CloudOut:
    """Change name, settings and/or credentials if the version matches ``versions``.

    ``versions`` None means unconditional (no ``If-Match``). Raises ``NotFound``,
    ``PreconditionFailed`` (412), ``InvalidInput`` or ``DuplicateCloudName``.
    """
    current = await repo.get_cloud(session, tenant, cloud_id)
    if current is None:
        raise _not_found(cloud_id)
    kind = CloudKind(current.kind)
    sent = patch.model_fields_set
    errors: list[dict[str, str]] = []
    settings = credentials = None
    models = registry.kind_schema(kind)
    if patch.settings is not None:
        settings = _check(models.settings, patch.settings, "/settings", errors)
    if patch.credentials is not None:
        credentials = _check(models.credentials, patch.credentials, "/credentials", errors)
    if errors:
        summary = "; ".join(f"{e['pointer']}: {e['detail']}" for e in errors[:5])
        raise InvalidInput(summary, extra={"errors": errors})
    changes = repo.CloudChanges(
        name=patch.name,
        settings=settings.model_dump(mode="json") if settings is not None else None,
        replace_credentials="credentials" in sent,
        sealed_credentials=box.seal(reveal(credentials)) if credentials is not None else None,
    )
    if not sent:
        _check_version(current, versions)
        return to_out(box, current)
    row = await repo.update_cloud(session, tenant, cloud_id, changes, versions=versions)
    if row is None:
        # It existed a moment ago: either the version moved on or it was just deleted.
        if await repo.get_cloud(session, tenant, cloud_id) is None:
            raise _not_found(cloud_id)
        raise _stale(versions)
    return to_out(box, row)


def _stale(versions: frozenset[int] | None) -> PreconditionFailed:
    wanted = ", ".join(f'"v{v}"' for v in sorted(versions or ())) or "none parseable"
    return PreconditionFailed(
        f"the cloud has changed (If-Match: {wanted}); GET it again and retry with its ETag"
    )


def _check_version(row: Cloud, versions: frozenset[int] | None) -> None:
    if versions is not None and row.version not in versions:
        raise _stale(versions)


async def delete_cloud(
    session: AsyncSession, tenant: str, cloud_id: uuid.UUID, *, versions: frozenset[int] | None
) -> None:
    """Remove a cloud no unfinished migration uses.

    The row is locked first, so a migration being created against it (which takes a
    ``FOR SHARE`` lock, see ``repositories.clouds.lock_cloud``) either commits before
    the in-use check sees it, or waits and then finds the cloud gone.
    """
    row = await repo.lock_cloud(session, tenant, cloud_id)
    if row is None:
        raise _not_found(cloud_id)
    _check_version(row, versions)
    if await repo.cloud_in_use(session, tenant, cloud_id):
        raise CloudInUse(
            f"cloud {cloud_id} is used by a migration that has not finished; "
            "cancel or remove it first"
        )
    await repo.delete_cloud(session, tenant, cloud_id)
