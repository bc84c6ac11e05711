"""Webhook signing secrets are sealed at rest and follow an encryption key rotation."""

from __future__ import annotations

from cryptography.fernet import Fernet
from sqlalchemy import select

from app.crypto import SecretBox
from app.db import Database
from app.models.db import Webhook
from app.services.keys import rotate_keys
from app.webhooks.signing import new_secret, seal, signing_secrets


async def test_webhook_secrets_are_sealed_and_rotated(db: Database) -> None:
    key_a, key_b = Fernet.generate_key(), Fernet.generate_key()
    secret = new_secret()
    async with db.session() as session:
        session.add(Webhook(tenant="acme", url="https://example.com/", description="",
                            event_types=[], active=True, version=1,
                            secrets=seal(SecretBox([key_a]), secret)))
    async with db.session() as session:
        stored = (await session.scalars(select(Webhook))).one().secrets
    assert secret.encode() not in stored
    assert secret.removeprefix("whsec_").encode() not in stored

    report = await rotate_keys(db, SecretBox([key_b, key_a]))
    assert report.rotated["webhooks.secrets"] == 1
    async with db.session() as session:
        row = (await session.scalars(select(Webhook))).one()
    assert signing_secrets(SecretBox([key_b]), row.secrets, None, row.created_at) == [secret]
