"""The registered platforms, and everything derived from their specs.

One line per platform in :data:`SPECS`. From the specs come: the kinds
``POST /v1/clouds`` accepts and their models (:func:`kind_schemas`), the driver for a
cloud (:func:`source_driver`, :func:`destination_driver`), the placement model of a
destination (:func:`parse_placement`), and, with what the engines run
(:data:`ENGINES`), the capability matrix (:mod:`app.drivers.capabilities`) and the
"what works" table (:func:`what_works`). A kind no spec declares is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import SecretStr, ValidationError

from app.drivers.base import DestinationDriver, Placement, SourceDriver
from app.drivers.kit.connection import CloudConnection
from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.linux import SPEC as LINUX
from app.drivers.vmware.spec import SPEC as VMWARE
from app.errors import InvalidInput
from app.models.enums import CloudKind
from app.models.schemas.clouds import KindSchema

#: The registered platforms.
SPECS: tuple[DriverSpec, ...] = (VMWARE, LINUX)


class EngineSupport(StrEnum):
    """What an engine needs of a cloud to let it play a role."""

    declared = "declared"  # a spec that declares the role (its driver does the work)
    any_registered_kind = "any_registered_kind"  # the engine does the work itself
    no_engine = "no_engine"  # nothing runs this role yet: refused


#: What the engines run. The live-stream engine reads its source over SSH, so any
#: registered kind can be its source; image extract has no engine yet.
ENGINES: Mapping[Role, EngineSupport] = {
    Role.hypervisor_source: EngineSupport.declared,
    Role.hypervisor_destination: EngineSupport.declared,
    Role.image_extract_source: EngineSupport.no_engine,
    Role.image_extract_destination: EngineSupport.no_engine,
    Role.live_stream_source: EngineSupport.any_registered_kind,
    Role.live_stream_new_destination: EngineSupport.declared,
}


class NoDriver(InvalidInput):
    code = "no-driver"
    title = "No driver for this cloud kind"


def spec_for(kind: CloudKind | str, specs: Sequence[DriverSpec] = SPECS) -> DriverSpec | None:
    return next((s for s in specs if kind in s.kind_names), None)


def registered_kinds(specs: Sequence[DriverSpec] = SPECS) -> tuple[CloudKind, ...]:
    return tuple(k for s in specs for k in s.kind_names)


def kind_schemas(specs: Sequence[DriverSpec] = SPECS) -> tuple[KindSchema, ...]:
    """The models of every registered kind, for the cloud schemas."""
    return tuple(k for s in specs for k in s.kinds)


def kind_schema(kind: CloudKind) -> KindSchema:
    """Raises :class:`NoDriver` for a kind no spec declares."""
    spec = spec_for(kind)
    if spec is None:
        raise NoDriver(f"vmigrate has no driver for {kind} clouds (registered kinds: "
                       f"{', '.join(registered_kinds())})")
    return spec.schema(kind)


def _missing(conn: CloudConnection, role: Role) -> NoDriver:
    able = [k.value for s in SPECS if role in s.roles for k in s.kind_names]
    return NoDriver(f"vmigrate has no driver for {conn.kind} clouds that can {role.described} "
                    f"(available: {', '.join(sorted(able)) or 'none'})")


def source_driver(conn: CloudConnection) -> SourceDriver:
    """A (not yet connected) driver reading VMs from this cloud; raises :class:`NoDriver`."""
    spec = spec_for(conn.kind)
    if spec is None or spec.source is None:
        raise _missing(conn, Role.hypervisor_source)
    return spec.source(conn)


def destination_driver(conn: CloudConnection) -> DestinationDriver:
    """A (not yet connected) driver provisioning VMs on this cloud; raises :class:`NoDriver`."""
    spec = spec_for(conn.kind)
    if spec is None or spec.destination is None:
        raise _missing(conn, Role.hypervisor_destination)
    return spec.destination(conn)


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    detail: str


def placement_errors(kind: CloudKind | str, fields: Mapping[str, str | None]) -> list[FieldError]:
    """What is wrong with these destination placement fields for a cloud of ``kind``:
    a field its placement model does not have, or a value it refuses."""
    spec = spec_for(kind)
    model = spec.placement if spec is not None else Placement
    given = {k: v for k, v in fields.items() if v is not None}
    known = set(model.model_fields)
    errors = [
        FieldError(name, f"{kind} clouds have no placement field {name!r} (they take: "
                         f"{', '.join(sorted(known)) or 'none'})")
        for name in given if name not in known
    ]
    if errors:
        return errors
    try:
        model.model_validate(given)
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            errors.append(FieldError(".".join(str(p) for p in err["loc"]), err["msg"]))
    return errors


def parse_placement(kind: CloudKind | str, fields: Mapping[str, str | None]) -> Placement:
    """The destination's placement model built from the migration's destination fields.

    Raises ``InvalidInput`` naming every field the model does not have or refuses.
    """
    errors = placement_errors(kind, fields)
    if errors:
        raise InvalidInput(
            "; ".join(f"/destination/{e.field}: {e.detail}" for e in errors),
            extra={"errors": [{"pointer": f"/destination/{e.field}", "detail": e.detail}
                              for e in errors]},
        )
    spec = spec_for(kind)
    model = spec.placement if spec is not None else Placement
    return model.model_validate({k: v for k, v in fields.items() if v is not None})


def with_source_overrides(conn: CloudConnection, *, host: str | None, port: int | None,
                          username: str | None, password: str | None) -> CloudConnection:
    """The wizard's Host / Remote Port / Username / Password over the cloud's own.

    Host and port replace the settings fields the spec names (``endpoint_fields``);
    user name and password replace the credentials when the kind's credentials model
    has exactly those two fields.
    """
    spec = spec_for(conn.kind)
    settings, creds = conn.settings, conn.credentials
    try:
        if spec is not None and spec.endpoint_fields and (host or port):
            host_field, port_field = spec.endpoint_fields
            update = {k: v for k, v in ((host_field, host), (port_field, port)) if v}
            settings = type(settings).model_validate({**settings.model_dump(), **update})
        if spec is not None and username and password:
            model = spec.schema(conn.kind).credentials
            if set(model.model_fields) == {"username", "password"}:
                creds = model.model_validate({"username": username,
                                              "password": SecretStr(password)})
    except ValidationError as exc:  # only the field names: a value may be a secret
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise InvalidInput(f"the source's host, port or login do not fit a {conn.kind} "
                           f"cloud ({fields})") from None
    return dataclasses.replace(conn, settings=settings, credentials=creds)


# --- what works --------------------------------------------------------------------------


#: The columns of the "what works" table: a role, in the words of the README.
WHAT_WORKS_COLUMNS: tuple[tuple[Role, str], ...] = (
    (Role.hypervisor_source, "hypervisor source (store / new)"),
    (Role.hypervisor_destination, "hypervisor destination (new)"),
    (Role.image_extract_source, "image extract source"),
    (Role.image_extract_destination, "image extract destination"),
    (Role.live_stream_source, "live stream source"),
    (Role.live_stream_new_destination, "live stream new destination"),
)


def can_play(kind: CloudKind | str, role: Role, specs: Sequence[DriverSpec] = SPECS,
             engines: Mapping[Role, EngineSupport] = ENGINES) -> bool:
    """Whether a cloud of ``kind`` can play ``role``: a driver and an engine for it."""
    spec = spec_for(kind, specs)
    if spec is None:
        return False
    support = engines.get(role, EngineSupport.no_engine)
    if support is EngineSupport.any_registered_kind:
        return True
    return support is EngineSupport.declared and role in spec.roles


@dataclass(frozen=True, slots=True)
class WhatWorksRow:
    kind: CloudKind
    platform: str | None  # None: no driver registered
    roles: tuple[bool, ...]  # in the order of WHAT_WORKS_COLUMNS


@dataclass(frozen=True, slots=True)
class WhatWorks:
    columns: tuple[str, ...]
    rows: tuple[WhatWorksRow, ...]

    def markdown(self) -> str:
        """The table as Markdown (yes / —), for the README."""
        head = ["kind", "platform", *self.columns]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.kind.value, row.platform or "no driver yet",
                     *("yes" if ok else "—" for ok in row.roles)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def what_works(specs: Sequence[DriverSpec] = SPECS,
               engines: Mapping[Role, EngineSupport] = ENGINES) -> WhatWorks:
    """Every kind of the product spec x every role: what runs today."""
    rows = []
    for kind in CloudKind:
        spec = spec_for(kind, specs)
        rows.append(WhatWorksRow(
            kind=kind, platform=spec.platform if spec else None,
            roles=tuple(can_play(kind, role, specs, engines) for role, _ in WHAT_WORKS_COLUMNS),
        ))
    return WhatWorks(columns=tuple(label for _, label in WHAT_WORKS_COLUMNS), rows=tuple(rows))
