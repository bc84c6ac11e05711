"""Prometheus metrics: the metric objects every layer records into, in one registry.

This module sits at the bottom of the layers (it imports nothing from ``app``), so the
engines, the worker and the webhook dispatcher record what they do without knowing how
it is exposed; ``app.api.metrics`` serves :data:`REGISTRY` over HTTP (``GET /metrics``,
scope ``metrics:read``).

Label values are always bounded sets (route templates, migration types, step names,
statuses, outcomes): never an id, a tenant, a host name or an error message.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

__all__ = ["CONTENT_TYPE", "REGISTRY", "exposition"]

#: Every vmigrate metric, plus the process (CPU, memory, file descriptors) and Python
#: platform collectors. Its own registry rather than prometheus_client's global one, so
#: a library that registers metrics of its own never shows up (or clashes) here.
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

#: Seconds: from a fast API call to a long step.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
#: Bytes per second: 1 MiB/s to 4 GiB/s.
_THROUGHPUT = tuple(float(2**n) for n in range(20, 33))

# --- HTTP ------------------------------------------------------------------------------

http_requests = Counter(
    "vmigrate_http_requests", "HTTP requests answered, by route template and status.",
    ["method", "route", "status"], registry=REGISTRY,
)
http_request_seconds = Histogram(
    "vmigrate_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response body.",
    ["method", "route"], buckets=_LATENCY, registry=REGISTRY,
)

# --- migrations ------------------------------------------------------------------------

migrations_started = Counter(
    "vmigrate_migration_runs_started", "Runs a worker of this process started (a resumed "
    "migration counts once per run).", ["type"], registry=REGISTRY,
)
migrations_finished = Counter(
    "vmigrate_migrations_finished", "Migrations this process brought to an end, by type "
    "and final status (completed, failed, cancelled).", ["type", "status"], registry=REGISTRY,
)
migrations_running = Gauge(
    "vmigrate_migrations_running", "Migrations running in this process now.", ["type"],
    registry=REGISTRY,
)
step_seconds = Histogram(
    "vmigrate_step_duration_seconds", "Duration of one try of a step, by migration type, "
    "step and outcome (completed, failed, retried, cancelled).",
    ["type", "step", "outcome"], buckets=_STEP, registry=REGISTRY,
)
step_retries = Counter(
    "vmigrate_step_retries", "Step tries that failed with a transient error and were "
    "retried.", ["type", "step"], registry=REGISTRY,
)
bytes_moved = Counter(
    "vmigrate_migration_bytes", "Bytes of disk data moved by migration steps, by migration "
    "type.", ["type"], registry=REGISTRY,
)
throughput = Histogram(
    "vmigrate_step_throughput_bytes_per_second", "Average rate of each completed step that "
    "moved data (bytes moved / step duration), by migration type.",
    ["type"], buckets=_THROUGHPUT, registry=REGISTRY,
)

# --- worker leases ---------------------------------------------------------------------

leases_held = Gauge(
    "vmigrate_worker_leases_held", "Migration leases the workers of this process hold now.",
    registry=REGISTRY,
)
leases_claimed = Counter(
    "vmigrate_worker_leases_claimed", "Leases taken: kind=new for a queued migration, "
    "kind=reclaimed for one whose previous lease had expired.", ["kind"], registry=REGISTRY,
)
leases_lost = Counter(
    "vmigrate_worker_leases_lost", "Runs stopped because another worker took the migration "
    "over (this worker's epoch went stale).", registry=REGISTRY,
)

# --- webhooks --------------------------------------------------------------------------

webhook_deliveries = Counter(
    "vmigrate_webhook_deliveries", "Webhook delivery attempts by outcome: succeeded, "
    "retrying (failed, will be retried) or dead (failed, retry window over).",
    ["outcome"], registry=REGISTRY,
)
webhook_seconds = Histogram(
    "vmigrate_webhook_delivery_duration_seconds", "Time of one delivery attempt (POST to "
    "the endpoint and its answer).", ["outcome"], buckets=_LATENCY, registry=REGISTRY,
)


def exposition() -> bytes:
    """Every metric of :data:`REGISTRY` in the Prometheus text format."""
    return generate_latest(REGISTRY)


def listen(host: str, port: int) -> Callable[[], None]:
    """Serve :data:`REGISTRY` at ``http://host:port/metrics`` (any path answers) from a
    thread, without authentication: for ``vmigrate worker`` and ``dispatch``, which have
    no API to put ``GET /metrics`` on. Bind it to loopback or a private network only.
    Returns the function that stops it; raises ``OSError`` when the address is taken."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return close
