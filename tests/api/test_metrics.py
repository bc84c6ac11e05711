"""``GET /metrics``: the scope it needs, and what a real migration leaves in a scrape.

The metrics are process-wide (other tests in the session add to them), so every check
compares a scrape after the action with one before it."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.db import Database
from tests.api.observability_support import DATA, run_conversion
from tests.conftest import TokenFactory, auth

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient, token: str) -> Samples:
    r = await client.get("/metrics", headers=auth(token))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return parse(r.text)


async def test_metrics_need_the_metrics_scope(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    assert (await client.get("/metrics")).status_code == 401
    others = await make_token("acme")  # every read/write scope of the API, not metrics
    denied = await client.get("/metrics", headers=auth(others))
    assert denied.status_code == 403
    assert "metrics:read" in denied.json()["detail"]
    reader = await make_token("ops", "metrics:read")
    ok = await client.get("/metrics", headers=auth(reader))
    assert ok.status_code == 200
    assert "vmigrate_http_requests_total" in ok.text
    assert "process_cpu_seconds_total" in ok.text


async def test_scrape_after_a_conversion(
    client: httpx.AsyncClient, make_token: TokenFactory, settings: Settings, db: Database,
    tmp_path: Path,
) -> None:
    token = await make_token("acme")
    ops = await make_token("ops", "metrics:read")
    before = await scrape(client, ops)

    job = await run_conversion(client, token, settings, db, tmp_path)
    assert job["status"] == "completed", job
    after = await scrape(client, ops)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # the outcome, by type and status
    assert grew("vmigrate_migrations_finished_total", type="conversion",
                status="completed") == 1
    assert grew("vmigrate_migration_runs_started_total", type="conversion") == 1
    assert value(after, "vmigrate_migrations_running", type="conversion") == 0
    # its bytes: at least the data of the source went through a step
    assert grew("vmigrate_migration_bytes_total", type="conversion") >= DATA
    assert grew("vmigrate_step_throughput_bytes_per_second_count", type="conversion") >= 1
    # its steps: each one that completed was timed once, as completed
    steps = [s["name"] for s in job["steps"] if s["status"] == "completed"]
    assert len(steps) >= 3, job["steps"]
    for step in steps:
        assert grew("vmigrate_step_duration_seconds_count", type="conversion", step=step,
                    outcome="completed") == 1, step
    # the lease it held is released, and it was a new (not reclaimed) claim
    assert grew("vmigrate_worker_leases_claimed_total", kind="new") == 1
    assert value(after, "vmigrate_worker_leases_held") == 0
    # the API calls, by route template (not by id) and status
    assert grew("vmigrate_http_requests_total", method="POST",
                route="/v1/images/{image_id}/conversions", status="202") == 1
    assert grew("vmigrate_http_requests_total", method="GET",
                route="/v1/migrations/{migration_id}", status="200") >= 1
    assert grew("vmigrate_http_request_duration_seconds_count", method="POST",
                route="/v1/images") == 1
    assert not any(job["id"] in labels_text for labels_text in map(str, after))


async def test_unmatched_paths_share_one_label(
    client: httpx.AsyncClient, make_token: TokenFactory
) -> None:
    ops = await make_token("ops", "metrics:read")
    before = await scrape(client, ops)
    for n in range(3):
        assert (await client.get(f"/no/such/{n}")).status_code == 404
    after = await scrape(client, ops)
    key = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert value(after, "vmigrate_http_requests_total", **key) \
        - value(before, "vmigrate_http_requests_total", **key) == 3

