"""A cloud's connection for a driver: the engines read it from the database.

Drivers never touch the database; an engine step calls :func:`open_cloud` and hands
the :class:`~app.drivers.kit.connection.CloudConnection` to
:func:`app.drivers.registry.source_driver` / ``destination_driver``.
"""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from app.crypto import SecretBox
from app.drivers import registry
from app.drivers.kit.connection import CloudConnection
from app.errors import NotFound
from app.models.enums import CloudKind
from app.repositories import clouds as repo


async def open_cloud(
    session: AsyncSession, box: SecretBox, tenant: str, cloud_id: uuid.UUID
) -> CloudConnection:
    """Settings and decrypted credentials of a cloud, typed by kind, for a driver.

    Raises ``NotFound``, ``NoDriver`` (a kind no registered driver serves) or
    ``SecretsUnreadable`` (the key that sealed them is gone).
    """
    row = await repo.get_cloud(session, tenant, cloud_id)
    if row is None:
        raise NotFound(f"no cloud {cloud_id}")
    kind = CloudKind(row.kind)
    models = registry.kind_schema(kind)
    secrets = box.open(row.credentials)
    return CloudConnection(
        id=row.id, kind=kind,
        settings=models.settings.model_validate(row.settings),
        credentials=models.credentials.model_validate(secrets) if secrets else None,
    )
