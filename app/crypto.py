"""Encryption at rest for credentials (cloud credentials, migration passwords and keys).

Fernet (AES-128-CBC + HMAC-SHA256) through ``MultiFernet``: the first key encrypts,
every key decrypts, so a key can be rotated by putting the new one first and
re-encrypting (``vmigrate keys rotate``) before dropping the old one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.errors import AppError


class SecretsUnreadable(AppError):
    status = 500
    code = "secrets-unreadable"
    title = "Stored credentials cannot be decrypted"


class SecretBox:
    """Encrypts and decrypts JSON objects of secrets."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def seal(self, secrets: dict[str, Any]) -> bytes | None:
        """Encrypt a mapping of secrets; None when there is nothing to keep."""
        clean = {k: v for k, v in secrets.items() if v is not None}
        if not clean:
            return None
        return self._fernet.encrypt(json.dumps(clean, sort_keys=True).encode())

    def open(self, token: bytes | None) -> dict[str, Any]:
        if token is None:
            return {}
        try:
            value: dict[str, Any] = json.loads(self._fernet.decrypt(token))
        except InvalidToken as exc:
            raise SecretsUnreadable(
                "stored credentials were encrypted with a key that is not configured"
            ) from exc
        return value

    def rotate(self, token: bytes) -> bytes:
        """Re-encrypt a token under the newest key."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken as exc:
            raise SecretsUnreadable("cannot re-encrypt: no configured key opens it") from exc


def load_keys(configured: list[str], key_file: Path) -> list[bytes]:
    """The configured keys, or the key in ``key_file`` (created with mode 0600 if absent)."""
    if configured:
        keys = [k.encode() for k in configured]
        for k in keys:
            Fernet(k)  # raises ValueError for a malformed key, before anything is encrypted
        return keys
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
    return [line.strip() for line in key_file.read_bytes().splitlines() if line.strip()]
