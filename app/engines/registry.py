"""Which engine runs which migration type."""

from __future__ import annotations

from collections.abc import Mapping

from app.engines.deps import EngineDeps
from app.engines.hypervisor import conversion_engine, hypervisor_engine
from app.engines.live_stream import live_stream_engine
from app.engines.runner import EngineFactory


def default_engines(deps: EngineDeps) -> Mapping[str, EngineFactory]:
    """The engines this build ships. A type without an engine fails at claim time with
    "this worker cannot run <type> migrations" rather than hanging in ``queued``."""
    engines: dict[str, EngineFactory] = {
        "hypervisor": hypervisor_engine(deps),
        "conversion": conversion_engine(deps),
        "live_stream": live_stream_engine(deps),
    }
    return engines
