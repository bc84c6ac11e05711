"""The virtual image library's storage backends."""

from __future__ import annotations

from pydantic import SecretStr

from app.config import Settings
from app.storage.base import ImageStore
from app.storage.local import LocalStore


def build_store(settings: Settings) -> ImageStore:
    """The backend the settings choose: S3 when a bucket is set, else a local directory."""
    if settings.library_s3_bucket:
        from app.storage.s3 import S3Store

        def secret(value: SecretStr | None) -> str | None:
            return value.get_secret_value() if value is not None else None

        return S3Store(
            settings.library_dir / "staging",
            bucket=settings.library_s3_bucket,
            prefix=settings.library_s3_prefix,
            endpoint_url=settings.library_s3_endpoint_url,
            region=settings.library_s3_region,
            access_key_id=secret(settings.library_s3_access_key_id),
            secret_access_key=secret(settings.library_s3_secret_access_key),
        )
    return LocalStore(settings.library_dir)
