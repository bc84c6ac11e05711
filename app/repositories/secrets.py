"""SQL over every column that holds sealed (Fernet-encrypted) secrets.

Key rotation walks these columns in id order and swaps each token for its
re-encryption, compare-and-set on the old token so a concurrent write is never lost.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Column, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.models.db import Base


class SealedColumn(StrEnum):
    """``table.column`` of each place secrets are stored."""

    cloud_credentials = "clouds.credentials"
    migration_secrets = "migrations.secrets"
    webhook_secrets = "webhooks.secrets"

    def columns(self) -> tuple[Column[uuid.UUID], Column[bytes | None]]:
        table_name, column = self.value.split(".")
        table = Base.metadata.tables[table_name]
        return table.c.id, table.c[column]


@dataclass(frozen=True, slots=True)
class SealedValue:
    row_id: uuid.UUID
    token: bytes


async def sealed_batch(
    session: AsyncSession, column: SealedColumn, *, after: uuid.UUID | None, limit: int
) -> list[SealedValue]:
    """The next ``limit`` non-null tokens after ``after`` (by id)."""
    id_col, value_col = column.columns()
    stmt = select(id_col, value_col).where(value_col.is_not(None))
    if after is not None:
        stmt = stmt.where(id_col > after)
    rows = await session.execute(stmt.order_by(id_col).limit(limit))
    return [SealedValue(row_id, token) for row_id, token in rows if token is not None]


async def replace_sealed(
    session: AsyncSession, column: SealedColumn, row_id: uuid.UUID, old: bytes, new: bytes
) -> bool:
    """Swap ``old`` for ``new`` unless the row changed meanwhile; True if swapped."""
    id_col, value_col = column.columns()
    result = await session.execute(
        update(value_col.table).where(id_col == row_id, value_col == old).values({value_col: new})
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
