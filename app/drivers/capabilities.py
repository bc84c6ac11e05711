"""Which cloud kinds can play which part in which migration: the capability matrix.

Derived, never written by hand: a kind can play a role when a registered driver spec
declares it and an engine runs it (:func:`app.drivers.registry.can_play`). The API
consults the matrix before anything runs, so an impossible pair is a 422 naming the
field, the kind and the role, and the kinds that would work, rather than a migration
that fails later for want of a driver.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.registry import ENGINES, SPECS, EngineSupport, can_play, spec_for
from app.models.enums import CloudKind, ImageFormat

__all__ = ["IMPORT_FORMATS", "MATRIX", "CapabilityMatrix", "Role",
           "import_formats", "matrix_from"]



class CapabilityMatrix:
    """Role -> the cloud kinds that can fill it, with why the others cannot."""

    def __init__(self, specs: Sequence[DriverSpec], engines: Mapping[Role, EngineSupport]) -> None:
        self._specs = tuple(specs)
        self._engines = dict(engines)
        self._table: dict[Role, frozenset[CloudKind]] = {
            role: frozenset(k for k in CloudKind if can_play(k, role, specs, engines))
            for role in Role
        }

    def allows(self, role: Role, kind: str) -> bool:
        return kind in self._table[role]

    def kinds(self, role: Role) -> tuple[CloudKind, ...]:
        """The kinds that can fill ``role``, sorted (stable error messages)."""
        return tuple(sorted(self._table[role]))

    def refusal(self, role: Role, kind: str, cloud_name: str) -> str:
        """Why a cloud of ``kind`` cannot fill ``role``, naming the kinds that can."""
        head = f"cloud {cloud_name!r} is of kind {kind}, which cannot {role.described}"
        if self._engines.get(role, EngineSupport.no_engine) is EngineSupport.no_engine:
            why = "no engine runs this yet"
        elif spec_for(kind, self._specs) is None:
            why = f"vmigrate has no {kind} driver yet"
        else:
            why = f"the {kind} driver does not support it"
        allowed = self.kinds(role)
        if not allowed:
            return f"{head} ({why}); no cloud kind can {role.described} yet"
        return f"{head} ({why}); allowed kinds: {', '.join(allowed)}"


def matrix_from(specs: Sequence[DriverSpec], engines: Mapping[Role, EngineSupport] = ENGINES
                ) -> CapabilityMatrix:
    return CapabilityMatrix(specs, engines)


def import_formats(
    specs: Sequence[DriverSpec] = SPECS,
) -> Mapping[CloudKind, tuple[ImageFormat, ...]]:
    """Disk formats each destination kind imports, preferred first (from the specs)."""
    return {
        kind: spec.capabilities.import_formats
        for spec in specs if Role.hypervisor_destination in spec.roles
        for kind in spec.kind_names
    }


#: The process-wide matrix, from the registered specs.
MATRIX = matrix_from(SPECS)

#: Disk formats each destination kind imports, preferred first: the ``convert`` step of
#: a mode-``new`` migration converts to the first format the destination accepts.
IMPORT_FORMATS: Mapping[CloudKind, tuple[ImageFormat, ...]] = import_formats()
