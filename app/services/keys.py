"""Encryption key rotation: re-encrypt every stored secret under the newest key.

The procedure: configure ``VMIGRATE_ENCRYPTION_KEYS=new,old`` on every process (the
first key encrypts, all decrypt), run ``vmigrate keys rotate``, then drop the old key.
Rows are re-encrypted in small batches, each its own transaction, so a large table
is never locked as a whole and an interrupted run can simply be repeated.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from app.crypto import SecretBox, SecretsUnreadable
from app.db import Database
from app.repositories.secrets import SealedColumn, replace_sealed, sealed_batch


@dataclass(slots=True)
class RotationReport:
    #: Tokens re-encrypted, per ``table.column``.
    rotated: dict[str, int] = field(default_factory=dict)
    #: Rows no configured key opens (``table.column``, id): left untouched.
    unreadable: list[tuple[str, uuid.UUID]] = field(default_factory=list)
    #: Rows changed by someone else while rotating (already under a current key).
    skipped: int = 0


async def rotate_keys(db: Database, box: SecretBox, *, batch_size: int = 200) -> RotationReport:
    """Re-encrypt every sealed column under ``box``'s newest key."""
    report = RotationReport()
    for column in SealedColumn:
        count = 0
        after: uuid.UUID | None = None
        while True:
            async with db.session() as session:
                batch = await sealed_batch(session, column, after=after, limit=batch_size)
                for value in batch:
                    try:
                        new = box.rotate(value.token)
                    except SecretsUnreadable:
                        report.unreadable.append((column.value, value.row_id))
                        continue
                    if await replace_sealed(session, column, value.row_id, value.token, new):
                        count += 1
                    else:
                        report.skipped += 1
            if len(batch) < batch_size:
                break
            after = batch[-1].row_id
        report.rotated[column.value] = count
    return report
