"""Signatures are Standard Webhooks signatures: the reference library verifies them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.webhooks.signing import headers, new_secret


def test_new_secrets_are_distinct_standard_secrets() -> None:
    a, b = new_secret(), new_secret()
    assert a != b
    assert a.startswith("whsec_")
    Webhook(a)  # parses


def test_one_secret_verifies() -> None:
    secret = new_secret()
    body = '{"type":"migration.created","data":{}}'
    h = headers([secret], "msg_1", datetime.now(UTC), body)
    assert Webhook(secret).verify(body, h) == {"type": "migration.created", "data": {}}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, h)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + " ", h)


def test_two_secrets_each_verify() -> None:
    old, new = new_secret(), new_secret()
    body = "{}"
    h = headers([new, old], "msg_2", datetime.now(UTC), body)
    assert len(h["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, h)
    Webhook(new).verify(body, h)


def test_signing_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="secret"):
        headers([], "msg_3", datetime.now(UTC), "{}")
