"""Settings: one object, built once at start-up from ``VMIGRATE_*`` environment variables.

Nothing below ``app/api`` reads settings globally: the lifespan builds a
:class:`Settings` and passes what each component needs through its constructor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VMIGRATE_", extra="ignore")

    database_url: SecretStr | None = Field(
        default=None,
        description="`postgresql+asyncpg://user:pass@host:5432/db`. Unset: an embedded "
        "PostgreSQL is started under `DATA_DIR/postgres`.",
    )
    data_dir: Path = Field(
        default=Path(".vmigrate"),
        description="Where the embedded database, the generated key file and the local "
        "image library live.",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address `vmigrate serve` binds; `vmigrate serve --host` overrides it.",
    )
    port: int = Field(
        default=8080, ge=1, le=65535,
        description="Port `vmigrate serve` binds; `vmigrate serve --port` overrides it.",
    )
    encryption_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated Fernet keys for credentials at rest, newest first: the "
        "first encrypts, all decrypt (rotation: `vmigrate keys rotate`). Unset: "
        "`DATA_DIR/secret.key` is generated with mode 0600.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024,
        description="Largest JSON request body accepted (bytes); a larger one gets a 413 "
        "problem.",
    )
    idempotency_ttl_seconds: int = Field(
        default=24 * 3600, ge=60,
        description="How long an `Idempotency-Key` is remembered (seconds).",
    )
    db_pool_size: int = Field(
        default=10, ge=1, description="Database connections per process (pool size)."
    )
    auth_cache_seconds: float = Field(
        default=10.0, ge=0, le=300,
        description="How long an API process trusts a token it has read from the database: "
        "a revoked token is refused by every process within this many seconds. 0 reads the "
        "token on every request.",
    )
    api_max_in_flight: int = Field(
        default=32, ge=1,
        description="Requests one API process works on at once (event streams and health "
        "checks aside); past it a request is answered at once with a 503 problem and "
        "`Retry-After` instead of waiting in a queue.",
    )
    serve_worker_processes: int = Field(
        default=1, ge=0, le=64,
        description="`vmigrate serve --workers N`: how many migration worker processes run "
        "beside the N API processes.",
    )
    api_max_loop_lag_seconds: float = Field(
        default=0.5, gt=0, le=10,
        description="An API process whose event loop runs later than this (seconds: "
        "requests are waiting to be run) answers new requests with the overload 503 until "
        "it has caught up.",
    )
    api_retry_after_seconds: int = Field(
        default=1, ge=1, le=3600,
        description="The `Retry-After` of an overload 503 (seconds).",
    )
    db_connect_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Bound on opening a database connection (and on "
        "waiting for a free pooled one); past it the request answers 503."
    )
    db_retry_max_seconds: float = Field(
        default=5.0, gt=0, description="Longest wait between two attempts of a worker, "
        "dispatcher or event listener loop that waits for the database to come back."
    )
    library_s3_bucket: str | None = Field(
        default=None,
        description="Keep library images in this S3 bucket instead of `DATA_DIR/library`.",
    )
    library_s3_prefix: str = Field(
        default="images", description="Key prefix of library images in the bucket."
    )
    library_s3_endpoint_url: str | None = Field(
        default=None, description="An S3-compatible endpoint (MinIO, Ceph RGW); unset: AWS."
    )
    library_s3_region: str | None = Field(
        default=None, description="S3 region; unset: the AWS SDK's default."
    )
    library_s3_access_key_id: SecretStr | None = Field(
        default=None, description="S3 access key id; unset: the usual AWS credential chain."
    )
    library_s3_secret_access_key: SecretStr | None = Field(
        default=None, description="S3 secret access key, with the key id."
    )
    max_image_bytes: int = Field(
        default=2 * 1024**4, ge=1,
        description="Largest image upload accepted (bytes; the default is 2 TiB).",
    )
    log_level: str = Field(
        default="INFO", description="Python log level: DEBUG, INFO, WARNING, ERROR."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="`json`: one JSON object per log line (with tenant, "
        "migration_id, step and attempt where they apply); `text`: the same for people; "
        "`auto`: text when stderr is a terminal, else json.",
    )
    image_check_min_seconds: float = Field(
        default=60.0, gt=0, description="Checking an uploaded image (parse and digest) may "
        "take this long, or longer for a large file (image_check_min_bytes_per_second); "
        "past it the upload is refused and nothing is stored."
    )
    image_check_min_bytes_per_second: float = Field(
        default=20 * 1024 * 1024, gt=0, description="The slowest rate, in bytes of the "
        "uploaded file per second, at which checking it may proceed before it is refused."
    )
    worker_concurrency: int = Field(
        default=4, ge=1, description="Migrations one worker process runs at once."
    )
    worker_per_source_limit: int = Field(
        default=2, ge=1,
        description="Migrations running at once against one source host, across all "
        "workers.",
    )
    worker_lease_seconds: float = Field(
        default=30.0, gt=0, description="A worker that stops heartbeating loses its "
        "migration after this long; another worker resumes it."
    )
    worker_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker renews its leases and looks "
        "for cancel requests."
    )
    worker_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for queued work."
    )
    vm_shutdown_grace_seconds: float = Field(
        default=300.0, ge=0, description="How long a source VM's guest gets to shut down "
        "before it is powered off (disruptive migrations)."
    )
    ssh_known_hosts_file: Path | None = Field(
        default=None, description="OpenSSH known_hosts file trusted for live-stream hosts. "
        "A host whose key is neither there nor pinned in the request (host_key_fingerprint) "
        "is refused; ~/.ssh is never read.",
    )
    ssh_connect_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Bound on connecting and logging in to an SSH host."
    )
    step_max_attempts: int = Field(
        default=5, ge=1,
        description="Tries per step for transient errors (exponential backoff with jitter).",
    )

    events_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="Idle Server-Sent Events streams get a comment this "
        "often, so proxies and clients keep the connection open."
    )
    events_stream_max_seconds: float = Field(
        default=3600.0, gt=0, description="A Server-Sent Events stream ends after this long; "
        "clients reconnect with Last-Event-ID and lose nothing."
    )
    events_stream_buffer: int = Field(
        default=1000, ge=1, description="Events queued for one slow stream before it is "
        "closed (the client resumes with Last-Event-ID)."
    )
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names and CIDRs webhooks may target although they "
        "are (or resolve to) loopback, private, link-local or metadata addresses.",
    )
    webhook_allow_http_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated host names and CIDRs webhooks may target over plain "
        "http; every other target must be https.",
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Whole time allowed for one delivery attempt."
    )
    webhook_retry_window_seconds: float = Field(
        default=24 * 3600.0, gt=0, description="A delivery is retried for this long after its "
        "event (or a redeliver), then marked dead."
    )
    webhook_retry_base_seconds: float = Field(
        default=10.0, gt=0, description="First retry delay; doubled per attempt (jittered)."
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0, gt=0, description="Longest delay between two attempts."
    )
    webhook_disable_after_seconds: float = Field(
        default=5 * 24 * 3600.0, gt=0, description="An endpoint whose deliveries have failed "
        "continuously for this long is disabled (event `webhook.disabled`)."
    )
    webhook_secret_overlap_seconds: float = Field(
        default=24 * 3600.0, ge=0, description="After a secret rotation, deliveries are also "
        "signed with the previous secret for this long."
    )
    webhook_concurrency: int = Field(
        default=16, ge=1, description="Deliveries in flight at once per dispatcher."
    )
    webhook_per_endpoint_concurrency: int = Field(
        default=2, ge=1, description="Deliveries in flight at once to one endpoint per "
        "dispatcher, so a slow receiver never holds up the others."
    )
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle dispatcher looks for due deliveries."
    )

    @field_validator(
        "encryption_keys", "webhook_allow_hosts", "webhook_allow_http_hosts", mode="before"
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def key_file(self) -> Path:
        return self.data_dir / "secret.key"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def library_dir(self) -> Path:
        return self.data_dir / "library"


# --- the reference table (README "Configuration", `vmigrate config --markdown`) ----------


def env_var(name: str, model: type[BaseSettings] = Settings) -> str:
    """The environment variable that sets the field ``name`` (``VMIGRATE_<NAME>``)."""
    field = model.model_fields[name]
    if field.alias is not None or field.validation_alias is not None:
        raise ValueError(f"{name}: aliased settings are not described by env_var()")
    return f"{model.model_config.get('env_prefix', '')}{name}".upper()


def _shown(value: object) -> str:
    """A value as it is written in the environment (lists comma-separated)."""
    if value is None or value == []:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, list):
        return ",".join(_shown(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _description(model: type[BaseSettings], name: str, field: FieldInfo) -> str:
    if not (field.description or "").strip():
        raise ValueError(f"{model.__name__}.{name} has no Field(description=...)")
    return _cell(field.description or "")


def settings_markdown(model: type[BaseSettings] = Settings) -> str:
    """Every setting as one Markdown table: environment variable, default, description.

    The README holds this table between ``<!-- settings:start -->`` and
    ``<!-- settings:end -->``; ``vmigrate config --markdown --readme README.md`` rewrites
    it. Raises ``ValueError`` for a field without a description."""
    rows = ["| env var | default | description |", "|---|---|---|"]
    for name, field in model.model_fields.items():
        default = _shown(field.get_default(call_default_factory=True))
        shown = default if default == "unset" else f"`{_cell(default)}`"
        rows.append(f"| `{env_var(name, model)}` | {shown} | "
                    f"{_description(model, name, field)} |")
    return "\n".join(rows) + "\n"


def settings_in_effect(settings: Settings) -> list[tuple[str, str]]:
    """``(env var, value)`` for every setting as ``settings`` holds it; secrets masked."""
    return [(env_var(name), _shown(getattr(settings, name))) for name in Settings.model_fields]
