"""Standard Webhooks signatures, made by the ``standardwebhooks`` library.

A delivery carries ``webhook-id`` (stable across retries, so receivers can drop
duplicates), ``webhook-timestamp`` (seconds, fresh per attempt) and
``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` values, one per
valid secret. During a rotation's overlap there are two, so receivers holding either
the old or the new secret accept the delivery.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from app.crypto import SecretBox

SECRET_PREFIX = "whsec_"  # noqa: S105 - a public prefix, not a secret
#: Bytes of key material in a generated secret (Standard Webhooks: 24 to 64).
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh ``whsec_<base64>`` signing secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def seal(box: SecretBox, current: str, previous: str | None = None) -> bytes:
    """A webhook's secrets as stored: the current one and, during a rotation's overlap,
    the previous one, encrypted together."""
    token = box.seal({"current": current, "previous": previous})
    assert token is not None  # current is never None
    return token


def signing_secrets(box: SecretBox, sealed: bytes, previous_expires_at: datetime | None,
                    now: datetime) -> list[str]:
    """The secrets to sign with now: the current one, plus the previous one during a
    rotation's overlap."""
    opened = box.open(sealed)
    out = [str(opened["current"])]
    previous = opened.get("previous")
    if previous and previous_expires_at is not None and now < previous_expires_at:
        out.append(str(previous))
    return out


def signature(signing_secrets: Sequence[str], msg_id: str, timestamp: datetime,
              body: str) -> str:
    """The ``webhook-signature`` value: one ``v1,...`` per secret, space-separated."""
    if not signing_secrets:
        raise ValueError("at least one secret is needed to sign")
    when = timestamp.astimezone(UTC)
    return " ".join(Webhook(s).sign(msg_id, when, body) for s in signing_secrets)


def headers(signing_secrets: Sequence[str], msg_id: str, timestamp: datetime,
            body: str) -> dict[str, str]:
    """All three Standard Webhooks headers for one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature(signing_secrets, msg_id, timestamp, body),
    }
