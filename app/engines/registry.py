"""Which engine runs which migration type, and what engines get from the process."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.engines.runner import EngineFactory
from app.storage.base import ImageStore


@dataclass(frozen=True, slots=True)
class EngineDeps:
    """Process-wide things engines use (built once, passed in)."""

    settings: Settings
    db: Database
    box: SecretBox
    store: ImageStore


def default_engines(deps: EngineDeps) -> Mapping[str, EngineFactory]:
    """The engines this build ships. A type without an engine fails at claim time with
    "this worker cannot run <type> migrations" rather than hanging in ``queued``."""
    from app.engines.hypervisor import conversion_engine, hypervisor_engine
    from app.engines.live_stream import live_stream_engine

    engines: dict[str, EngineFactory] = {
        "hypervisor": hypervisor_engine(deps),
        "conversion": conversion_engine(deps),
        "live_stream": live_stream_engine(deps),
    }
    return engines
