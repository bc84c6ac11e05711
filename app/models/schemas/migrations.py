"""Request and response schemas for ``/v1/migrations``, mirroring the spec's wizard.

``POST /v1/migrations`` takes one of three bodies, told apart by ``type`` alone (one
discriminator keeps generated clients to one clean class per type). Everything is
``extra="forbid"`` and built from the strict types in :mod:`.fields`.

Secrets (passwords, private keys) are ``SecretStr`` and *write-only*: on create they
are split out (:func:`split_secrets`) and sealed; the stored spec and every response
carry ``<field>_set: true`` instead. The ``...Out`` models are those secret-free
views. Rules that relate top-level fields (``mode`` vs ``destination``) are checked
by :meth:`HypervisorCreate.field_problems`, not a model validator, so each error can
name its own field's JSON pointer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    PrivateAttr,
    SecretStr,
    StrictBool,
    StrictInt,
    Tag,
    TypeAdapter,
    model_validator,
)

from app.models.db import MigrationEvent
from app.models.enums import (
    HypervisorMode,
    MigrationStatus,
    Platform,
    StepStatus,
    StoreFormat,
)
from app.models.schemas.fields import (
    AccountName,
    BlockDevice,
    Fingerprint,
    Host,
    Label,
    LvDevice,
    Name,
    Password,
    Port,
    PosixUser,
    PrivateKey,
    PublicKey,
    ServerId,
    SnapshotSize,
    Throttle,
    WindowsPath,
    WindowsUser,
    WinRMPort,
    invalid,
)
from app.models.schemas.images import ConversionFormat


class _Strict(BaseModel):
    """Unknown fields are errors: a misspelt option must never be silently ignored."""

    model_config = ConfigDict(extra="forbid")
    #: Field names holding secrets: split out on create, shown as ``<name>_set``.
    SECRETS: ClassVar[tuple[str, ...]] = ()


class ServerRef(_Strict):
    """The source server, by the platform's id or by name: exactly one of them."""

    id: ServerId | None = None
    name: Label | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.id is None) == (self.name is None):
            raise invalid("give exactly one of id and name")
        return self


class Options(_Strict):
    throttle_bytes_per_second: Throttle | None = Field(
        default=None, description="Cap on transfer bandwidth; unlimited if null.")
    verify: StrictBool = Field(
        default=True, description="Verify the destination against the source digest.")


class LiveStreamOptions(Options):
    snapshot_size_bytes: SnapshotSize | None = Field(
        default=None, description="Copy-on-write space of the LVM snapshot; default the "
        "volume's size (the spec: free space of the capacity to be streamed), which can "
        "never overflow. Smaller is fine for a volume written little during the copy; an "
        "overflow fails the migration, never a silent bad copy. Rounded up to whole extents.")
    freeze: StrictBool = Field(
        default=False, description="Freeze the volume's mounted filesystem (fsfreeze) "
        "while the snapshot is taken: application writes pause for a consistent point in "
        "time. Bounded by freeze_timeout_seconds, always thawed.")
    freeze_timeout_seconds: Annotated[StrictInt, Field(ge=1, le=30)] = Field(
        default=5, description="Longest the filesystem stays frozen, whatever happens.")
    sync: Literal["full", "warm"] = Field(
        default="full", description="full: stream the snapshot. warm: first copy the "
        "running volume, then repeat passes that send only blocks whose hashes differ on "
        "the two sides until a pass sends at most warm_delta_bytes (or warm_max_passes "
        "ran); then snapshot and send the last difference. The snapshot lives only for "
        "that last pass.")
    warm_max_passes: Annotated[StrictInt, Field(ge=1, le=20)] = Field(
        default=5, description="Warm mode: most passes before the snapshot.")
    warm_delta_bytes: SnapshotSize | None = Field(
        default=None, description="Warm mode: a pass that sends at most this many bytes "
        "is the last before the snapshot; default 1 % of the volume, at least 4 MiB.")


class HypervisorOptions(Options):
    power_off: StrictBool = Field(
        default=True, description="Power the source off for a consistent image (the "
        "spec's disruptive mode); false snapshots it running (crash-consistent).")


# --- hypervisor ---------------------------------------------------------------------


class _HypervisorSourceBase(_Strict):
    cloud_id: uuid.UUID = Field(description="The source cloud (vmware, esxi, openstack, ...).")
    server: ServerRef
    host: Host | None = Field(default=None, description="Hypervisor host to export from.")
    port: Port | None = Field(default=None, description="The wizard's Remote Port.")
    username: AccountName | None = None


class HypervisorSource(_HypervisorSourceBase):
    SECRETS = ("password",)
    password: Password | None = None


class HypervisorSourceOut(_HypervisorSourceBase):
    password_set: bool


class LibraryImageSource(_Strict):
    """A library image instead of a VM: the spec's "re-provisioned" (mode ``new`` only)."""

    image_id: uuid.UUID = Field(description="The library image to provision a VM from.")


def _source_kind(value: Any) -> str:
    """Which source a hypervisor body names: a library image if it has ``image_id``.

    (A tag, not a smart union, so a bad VM source gets the VM source's errors only.)
    """
    if isinstance(value, dict):
        return "source:image" if "image_id" in value else "source:vm"
    return "source:image" if isinstance(value, LibraryImageSource) else "source:vm"


class HypervisorDestination(_Strict):
    """Where mode ``new`` provisions the VM; placement names are the target's own."""

    cloud_id: uuid.UUID
    server_name: Label | None = Field(default=None, description="Defaults to the source's.")
    datacenter: Label | None = None
    cluster: Label | None = None
    host: Label | None = None
    datastore: Label | None = None
    resource_pool: Label | None = None
    folder: Label | None = None
    network: Label | None = None
    flavor: Label | None = None
    zone: Label | None = None


class _HypervisorCommon(_Strict):
    type: Literal["hypervisor"]
    name: Name
    mode: HypervisorMode = Field(description="store: into the image library; new: a new VM.")
    platform: Platform = Field(description="Guest OS type.")
    destination: HypervisorDestination | None = Field(
        default=None, description="Mode new only: where to provision.")
    format: StoreFormat | None = Field(
        default=None, description="Mode store only: library image format (default qcow2).")
    options: HypervisorOptions = Field(default_factory=HypervisorOptions)


class HypervisorCreate(_HypervisorCommon):
    """Snapshot a VM and store it in the library (``store``) or provision it (``new``)."""

    run: StrictBool = Field(default=False, description="Queue it at once (else pending).")
    source: Annotated[
        Annotated[HypervisorSource, Tag("source:vm")]
        | Annotated[LibraryImageSource, Tag("source:image")],
        Discriminator(_source_kind),
    ] = Field(description="A VM in a cloud, or (mode new) a library image to re-provision "
                          "(`image_id`).")

    def field_problems(self) -> list[FieldProblem]:
        problems = []
        if isinstance(self.source, LibraryImageSource) and self.mode is HypervisorMode.store:
            problems.append(FieldProblem(
                "/source/image_id", "a library image is stored already: convert it with "
                "POST /v1/images/{id}/conversions, or provision it with mode new"))
        if self.mode is HypervisorMode.new:
            if self.destination is None:
                problems.append(FieldProblem("/destination", "required when mode is new"))
            if self.format is not None:
                problems.append(FieldProblem(
                    "/format", "only for mode store: a new VM gets the format its "
                    "destination imports"))
        elif self.destination is not None:
            problems.append(FieldProblem(
                "/destination", "only for mode new: mode store writes to the image library"))
        return problems


# --- image extract ------------------------------------------------------------------


class _ImageExtractSourceBase(_Strict):
    existing: StrictBool = Field(
        default=True, description="The wizard's Existing or New: true, `server` is in the "
        "cloud's inventory; false, a machine not inventoried yet, named by `server.name`.")
    cloud_id: uuid.UUID
    server: ServerRef
    host: Host
    port: WinRMPort = 5986
    username: WindowsUser
    snapshot_path: WindowsPath = Field(
        description="Disk or share on the source sized for the image (the staging path).")


class ImageExtractSource(_ImageExtractSourceBase):
    SECRETS = ("password",)
    password: Password

    @model_validator(mode="after")
    def _new_by_name(self) -> Self:
        if not self.existing and self.server.name is None:
            raise invalid("a new (not inventoried) server is named by server.name")
        return self


class ImageExtractSourceOut(_ImageExtractSourceBase):
    password_set: bool


class LibraryDestination(_Strict):
    kind: Literal["library"]
    image_name: Label | None = Field(default=None, description="Defaults to the migration's.")


class CloudDestination(_Strict):
    kind: Literal["cloud"]
    cloud_id: uuid.UUID = Field(description="A SoftLayer cloud to import the image into.")
    image_name: Label | None = None


ImageExtractDestination = Annotated[
    LibraryDestination | CloudDestination, Field(discriminator="kind")]


class _ImageExtractCommon(_Strict):
    type: Literal["image_extract"]
    name: Name
    platform: Literal["windows"] = "windows"
    destination: ImageExtractDestination
    options: Options = Field(default_factory=Options)


class ImageExtractCreate(_ImageExtractCommon):
    """Image a running Windows machine over WinRM into the library or SoftLayer."""

    run: StrictBool = False
    source: ImageExtractSource

    def field_problems(self) -> list[FieldProblem]:
        return []


# --- live stream --------------------------------------------------------------------


class _SshBase(_Strict):
    host: Host
    port: Port = 22
    username: PosixUser
    host_key_fingerprint: Fingerprint | None = Field(
        default=None, description="Pin the host key; else known_hosts decides.")


class _SshSecrets(_Strict):
    SECRETS = ("password", "private_key")
    password: Password | None = None
    private_key: PrivateKey | None = None

    @model_validator(mode="after")
    def _one_way_in(self) -> Self:
        if self.password is None and self.private_key is None:
            raise invalid("give a password, a private_key or both")
        return self


class _SshOut(BaseModel):
    password_set: bool
    private_key_set: bool


class _LiveStreamSourceBase(_SshBase):
    existing: StrictBool = Field(default=True, description="As for image extract.")
    cloud_id: uuid.UUID
    server: ServerRef
    public_key: PublicKey | None = None
    device: LvDevice = Field(description="The logical volume to snapshot and stream.")


class LiveStreamSource(_LiveStreamSourceBase, _SshSecrets):
    pass


class LiveStreamSourceOut(_LiveStreamSourceBase, _SshOut):
    pass


class _ExistingHostBase(_SshBase):
    kind: Literal["existing"]
    device: BlockDevice = Field(description="Overwritten from the root down.")
    overwrite_mounted: StrictBool = Field(
        default=False, description="Overwrite the device even when it (or a partition or "
        "volume on it) is mounted read-write, e.g. the running root disk; else refused.")
    reboot_after: StrictBool = Field(
        default=False, description="Reboot the destination host after a successful copy "
        "(useful after overwriting its running root).")


class ExistingHostDestination(_ExistingHostBase, _SshSecrets):
    pass


class ExistingHostDestinationOut(_ExistingHostBase, _SshOut):
    pass


class NewVmDestination(_Strict):
    kind: Literal["new"]
    cloud_id: uuid.UUID
    plan: Label = Field(description="Size or flavor of the new VM.")
    server_name: Label | None = None
    zone: Label | None = None
    network: Label | None = None


class _LiveStreamCommon(_Strict):
    type: Literal["live_stream"]
    name: Name
    platform: Literal["linux"] = "linux"
    options: LiveStreamOptions = Field(default_factory=LiveStreamOptions)


class LiveStreamCreate(_LiveStreamCommon):
    """Stream an LVM snapshot of a Linux volume over SSH onto another Linux machine."""

    run: StrictBool = False
    source: LiveStreamSource
    destination: Annotated[
        ExistingHostDestination | NewVmDestination, Field(discriminator="kind")]

    def field_problems(self) -> list[FieldProblem]:
        return []


# --- the create union and secrets ---------------------------------------------------


MigrationCreate = Annotated[
    HypervisorCreate | ImageExtractCreate | LiveStreamCreate, Field(discriminator="type")]


@dataclass(frozen=True, slots=True)
class FieldProblem:
    pointer: str
    detail: str


def split_secrets(body: BaseModel) -> tuple[dict[str, Any], dict[str, str]]:
    """``(spec, secrets)``: the body as JSON without ``run`` and without secrets (each
    replaced by ``<name>_set``), and the secrets by dotted path (``source.password``)."""
    spec = body.model_dump(mode="json", exclude={"run"})
    secrets: dict[str, str] = {}
    _strip(body, spec, "", secrets)
    return spec, secrets


def _strip(model: BaseModel, dumped: dict[str, Any], prefix: str,
           secrets: dict[str, str]) -> None:
    names = getattr(type(model), "SECRETS", ())
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name in names:
            dumped.pop(name, None)
            dumped[f"{name}_set"] = value is not None
            if isinstance(value, SecretStr):
                secrets[prefix + name] = value.get_secret_value()
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _strip(value, dumped[name], f"{prefix}{name}.", secrets)


# --- responses ----------------------------------------------------------------------


class Progress(BaseModel):
    bytes_done: int
    bytes_total: int
    rate: int = Field(description="Current transfer rate, bytes per second.")
    eta_seconds: int | None = Field(description="Estimated time left; null when unknown.")


class MigrationError(BaseModel):
    """Why the last attempt failed (a problem-document-like object)."""

    model_config = ConfigDict(extra="ignore")
    type: str
    title: str
    detail: str
    step: str | None = None
    retryable: bool = False


class StepOut(BaseModel):
    position: int
    name: str
    cleanup: bool = Field(description="Releases what earlier steps acquired; also runs, "
                                      "newest first, after a failure or cancel.")
    status: StepStatus
    bytes_done: int
    bytes_total: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: dict[str, Any] | None = Field(
        default=None, description="What the step found or made (server id, snapshot, "
        "digests, image ids); never secrets.")


class _MigrationOutBase(BaseModel):
    """Common part of every migration as the API shows it (never any secret)."""

    model_config = ConfigDict(extra="ignore")
    id: uuid.UUID
    status: MigrationStatus
    phase: str | None = Field(description="The step being run, or last run.")
    progress: Progress
    error: MigrationError | None
    attempt: int = Field(description="How many times it was run (queued).")
    cancel_requested: bool
    version: int = Field(description="Bumped on every state change.")
    steps: list[StepOut]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class HypervisorMigration(_HypervisorCommon, _MigrationOutBase):
    model_config = ConfigDict(extra="ignore")
    source: HypervisorSourceOut | LibraryImageSource


class ImageExtractMigration(_ImageExtractCommon, _MigrationOutBase):
    model_config = ConfigDict(extra="ignore")
    mode: None = None
    source: ImageExtractSourceOut


class LiveStreamMigration(_LiveStreamCommon, _MigrationOutBase):
    model_config = ConfigDict(extra="ignore")
    mode: None = None
    source: LiveStreamSourceOut
    destination: Annotated[
        ExistingHostDestinationOut | NewVmDestination, Field(discriminator="kind")]


class ConversionMigration(_MigrationOutBase):
    """A library image being converted into another format (a job run by workers like a
    migration; created with ``POST /v1/images/{id}/conversions``)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["conversion"]
    name: str
    mode: None = None
    image_id: uuid.UUID = Field(description="The library image converted.")
    format: ConversionFormat = Field(description="The format of the new image.")
    options: Options = Field(default_factory=Options)


MigrationOut = Annotated[
    HypervisorMigration | ImageExtractMigration | LiveStreamMigration | ConversionMigration,
    Field(discriminator="type"),
]
#: A migration as the API shows it (the type behind :data:`MigrationOut`).
MigrationView = (HypervisorMigration | ImageExtractMigration | LiveStreamMigration
                 | ConversionMigration)
_OUT: TypeAdapter[MigrationView] = TypeAdapter(MigrationOut)


def view_of(data: dict[str, Any]) -> MigrationView:
    """Validate a migration's view from plain data (columns, the stored spec, steps as
    JSON objects), in one pass: the read paths build no ORM objects on the way."""
    return _OUT.validate_python(data)


def dump_view(view: MigrationView) -> bytes:
    """The JSON of a view, as the API sends it."""
    return _OUT.dump_json(view)


class EventOut(BaseModel):
    id: int = Field(description="Unique across the tenant's events and allocated in the "
                    "order they are written (the `after` of /v1/events). An event can "
                    "commit shortly after one with a greater id; event streams therefore "
                    "resume by their own SSE `id`, not by this one.")
    migration_id: uuid.UUID | None = Field(
        description="The migration it belongs to; null for tenant-level events "
        "(image.created, webhook.disabled, migration.deleted).")
    seq: int = Field(description="1, 2, 3, ... per migration, without gaps.")
    type: str = Field(description="e.g. migration.created, migration.queued.")
    payload: dict[str, JsonValue]
    created_at: datetime

    #: The row's commit-ordered position (``MigrationEvent.position``): the SSE ``id``.
    _position: int | None = PrivateAttr(default=None)

    @property
    def position(self) -> int | None:
        return self._position

    @classmethod
    def of(cls, row: MigrationEvent) -> EventOut:
        out = cls(id=row.id, migration_id=row.migration_id, seq=row.seq, type=row.type,
                  payload=row.payload, created_at=row.created_at)
        out._position = row.position
        return out


class EventPage(BaseModel):
    items: list[EventOut]
    next_after: int | None = Field(
        description="Pass as `after` for the next page; null when there is none yet.")
