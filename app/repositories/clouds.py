"""SQL for clouds. Every query filters by tenant: another tenant's ids are simply absent."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import Cloud


async def get_cloud(session: AsyncSession, tenant: str, cloud_id: uuid.UUID) -> Cloud | None:
    """The tenant's cloud with this id, or None (also for another tenant's id)."""
    result = await session.execute(
        select(Cloud).where(Cloud.id == cloud_id, Cloud.tenant == tenant)
    )
    return result.scalar_one_or_none()
