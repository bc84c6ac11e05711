"""A Python client generated from the checked-in ``openapi.yaml`` by
``openapi-python-client`` (no hand edits) drives the service end to end: register a
webhook, upload an image to the library, convert it (a job workers run like a
migration), watch the events, and receive every delivery at a local receiver that
verifies the signatures with the ``standardwebhooks`` library."""

from __future__ import annotations

import asyncio
import importlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app.config import Settings
from app.db import Database
from app.main import create_app
from tests.conftest import TokenFactory
from tests.webhooks.support import Receiver, running, webhook_settings

OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"
PACKAGE = "vmigrate_generated_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """Generate the client (offline, no post hooks needed) and import it."""
    root = tmp_path_factory.mktemp("client")
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")
    done = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(OPENAPI),
         "--output-path", str(root / PACKAGE), "--meta", "none", "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "warning" not in output.lower(), f"generation warned; fix the OpenAPI:\n{output}"
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def part(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


async def test_generated_client_end_to_end(
    generated: ModuleType, settings: Settings, db: Database, make_token: TokenFactory
) -> None:
    client_mod = part(generated, "client")
    models = part(generated, "models")
    types = part(generated, "types")
    webhooks = part(generated, "api.webhooks")
    images = part(generated, "api.images")
    events = part(generated, "api.events")
    migrations = part(generated, "api.migrations")
    for name in ("create_webhook", "upload_image", "convert_image", "list_events",
                 "list_webhook_deliveries", "get_migration"):
        importlib.import_module(f"{generated.__name__}.api.{_area(name)}.{name}")

    fast = webhook_settings(settings, worker_poll_seconds=0.1, worker_heartbeat_seconds=0.5)
    token = await make_token()
    app = create_app(fast, db=db, run_worker=True)
    async with Receiver() as receiver, running(app) as (url, _):
        api = client_mod.AuthenticatedClient(base_url=url, token=token, timeout=30.0)
        async with api:
            hook = await webhooks.create_webhook.asyncio(client=api, body=models.WebhookCreate(
                url=receiver.url(), event_types=["image.*", "migration.*"],
                description="generated client"))
            assert isinstance(hook, models.WebhookCreated), hook
            assert hook.secret.startswith("whsec_")

            disk = bytes(range(256)) * 4096  # 1 MiB, raw
            # The generated async call cannot stream a file body (httpx refuses a sync
            # stream on an AsyncClient): the generated sync call does it, in a thread.
            image = await asyncio.to_thread(
                images.upload_image.sync, client=api, name="e2e disk",
                body=types.File(payload=io.BytesIO(disk), mime_type="application/octet-stream"))
            assert isinstance(image, models.ImageOut), image
            assert image.format_ == "raw"
            assert image.virtual_size == len(disk)

            job = await images.convert_image.asyncio(
                image.id, client=api,
                body=models.ConversionRequest(format_=models.ConversionRequestFormat.QCOW2))
            assert isinstance(job, models.ConversionMigration), job

            deadline = time.monotonic() + 60
            seen: list[Any] = []
            while "migration.completed" not in [e.type_ for e in seen]:
                assert time.monotonic() < deadline, [e.type_ for e in seen]
                assert "migration.failed" not in [e.type_ for e in seen], seen[-1].payload
                page = await events.list_events.asyncio(
                    client=api, after=seen[-1].id if seen else 0, limit=200)
                assert isinstance(page, models.EventPage), page
                seen.extend(page.items)
                await asyncio.sleep(0.2)
            done = await migrations.get_migration.asyncio(job.id, client=api)
            assert done.status == models.MigrationStatus.COMPLETED
            kinds = [e.type_ for e in seen]
            assert kinds[0] == "image.created"
            assert kinds[1:3] == ["migration.created", "migration.queued"]
            assert all(e.migration_id == job.id for e in seen[1:])

            # Every event reaches the receiver, signed with the secret shown at creation.
            got = await receiver.wait_for(len(seen), timeout=30)
            bodies = [d.verify(hook.secret) for d in got]
            assert sorted(b["data"]["id"] for b in bodies) == sorted(e.id for e in seen)
            created = next(b for b in bodies if b["type"] == "image.created")
            assert created["data"]["payload"]["image_id"] == str(image.id)
            deliveries = await webhooks.list_webhook_deliveries.asyncio(
                hook.id, client=api, limit=200)
            assert isinstance(deliveries, models.DeliveryPage), deliveries
            statuses = {d.status for d in deliveries.items}
            assert statuses == {models.DeliveryStatus.SUCCEEDED}
        api.get_httpx_client().close()  # the sync side, used for the upload


def _area(operation: str) -> str:
    return {"create_webhook": "webhooks", "list_webhook_deliveries": "webhooks",
            "upload_image": "images", "convert_image": "images", "list_events": "events",
            "get_migration": "migrations"}[operation]
