"""Live stream: an LVM snapshot of a running Linux volume, streamed over SSH onto
another Linux host's block device (``docs/live-stream.md``).

- :mod:`.engine`: the steps (validate, snapshot, transfer, verify, cleanup).
- :mod:`.lvm`: LVM and device checks on the hosts.
- :mod:`.data`: the data path through the pipeline (or handed over host to host).
- :mod:`.delta`: the warm-mode delta pass and the destination's digest.
- :mod:`.wire`: the service's side of the helper protocol.
- :mod:`.remote`: the helper itself, standard library only; its source file is shipped
  to the hosts as it is (:func:`.wire.helper_script` reads it by ``__file__``), so it
  must stay one self-contained module that imports nothing from ``app``.
"""

from app.engines.live_stream.data import HostDevice, SourceReadError, StreamResult, stream
from app.engines.live_stream.delta import DeltaResult, delta_stream, destination_digest
from app.engines.live_stream.engine import LiveStreamEngine, Tuning, live_stream_engine

__all__ = [
    "DeltaResult",
    "HostDevice",
    "LiveStreamEngine",
    "SourceReadError",
    "StreamResult",
    "Tuning",
    "delta_stream",
    "destination_digest",
    "live_stream_engine",
    "stream",
]
