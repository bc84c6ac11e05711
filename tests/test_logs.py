"""Structured logs: the formats, the context fields the worker and runner bind, and the
lines a real run writes (its transitions, steps, retries and failure), parsed as JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import logs
from app.config import Settings
from app.db import Database, current_revision
from app.engines.plans import Plan, Step
from app.engines.retry import RetryPolicy
from app.engines.runner import Engine, MigrationRun, Runner, StepContext, StepResult, StepRow
from app.errors import AppError
from app.models.enums import MigrationType
from app.models.json import EventPayload
from app.models.schemas.specs import MigrationSecrets, load_spec
from tests.api.observability_support import run_conversion
from tests.conftest import TokenFactory


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() rewires the root logger: put pytest's set-up back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LIBRARIES}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)
    logging.getLogger("alembic.runtime.migration").removeFilter(logs._alembic_filter)


@pytest.fixture
def json_lines(restore_logging: None) -> io.StringIO:
    """Every log record of the process, as JSON lines, into a buffer."""
    out = io.StringIO()
    assert logs.configure("INFO", "json", out) == "json"
    return out


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_bound_fields_and_extras(json_lines: io.StringIO) -> None:
    log = logging.getLogger("app.test")
    with logs.bind(tenant="acme", migration_id="m-1"):
        with logs.bind(step="transfer", attempt=2):
            log.info("moving %d bytes", 10, extra={"bytes": 10})
        log.warning("after the step")
    log.info("outside")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")
    first, second, third, fourth = parsed(json_lines)
    assert first["msg"] == "moving 10 bytes"
    assert (first["level"], first["logger"]) == ("INFO", "app.test")
    assert first["ts"].endswith("Z")
    assert {k: first[k] for k in ("tenant", "migration_id", "step", "attempt", "bytes")} == {
        "tenant": "acme", "migration_id": "m-1", "step": "transfer", "attempt": 2, "bytes": 10}
    assert second["migration_id"] == "m-1"
    assert "step" not in second
    assert "attempt" not in second
    assert "migration_id" not in third
    assert "ValueError: boom" in fourth["exc"]


def test_text_on_a_terminal_json_elsewhere(restore_logging: None) -> None:
    tty = Tty()
    assert logs.configure("INFO", "auto", tty) == "text"
    with logs.bind(migration_id="m-2", step="verify"):
        logging.getLogger("app.test").info("checked")
    line = tty.getvalue().strip()
    assert " INFO app.test: checked [migration_id=m-2 step=verify]" in line
    assert logs.configure("INFO", "auto", io.StringIO()) == "json"
    assert logs.configure("INFO", "text", io.StringIO()) == "text"


async def test_no_alembic_lines_per_revision_check(json_lines: io.StringIO,
                                                   db: Database) -> None:
    """What /readyz does on every probe; Alembic used to log two INFO lines each time."""
    for _ in range(3):
        assert await current_revision(db) is not None
    assert [line["msg"] for line in parsed(json_lines)] == []


async def test_readyz_probes_are_quiet(json_lines: io.StringIO,
                                       client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await client.get("/readyz")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/v1/nothing")).status_code == 404
    text = json_lines.getvalue()
    for noise in ("readyz", "healthz", "Context impl", "Will assume"):
        assert noise not in text
    access = [line for line in parsed(json_lines) if line["logger"] == "app.access"]
    assert len(access) == 1
    assert access[0]["msg"].startswith("GET /v1/nothing 404 ")
    assert (access[0]["http_route"], access[0]["http_status"]) == ("<unmatched>", 404)


async def test_a_real_run_logs_with_its_migration_id(
    json_lines: io.StringIO, client: httpx.AsyncClient, make_token: TokenFactory,
    settings: Settings, db: Database, tmp_path: Path,
) -> None:
    token = await make_token("acme")
    job = await run_conversion(client, token, settings, db, tmp_path)
    assert job["status"] == "completed", job
    mine = [line for line in parsed(json_lines) if line.get("migration_id") == job["id"]]
    messages = [line["msg"] for line in mine]
    assert any(m.startswith(f"claimed migration {job['id']}") for m in messages), messages
    assert f"migration {job['id']}: claim, queued -> running" in messages
    assert f"migration {job['id']}: complete, running -> completed" in messages
    assert f"migration {job['id']} completed" in messages
    steps = [s["name"] for s in job["steps"] if not s["cleanup"]]
    for step in steps:
        started = [line for line in mine if line["msg"] == f"step {step} started (try 1)"]
        assert len(started) == 1, (step, messages)
        assert started[0]["step"] == step
        assert started[0]["attempt"] == 1
        assert started[0]["tenant"] == "acme"
        assert started[0]["migration_type"] == "conversion"
    assert any(line.get("bytes", 0) > 0 for line in mine)
    assert not any(token in json_lines.getvalue() for token in (token, token[4:]))


# --- retries and failure, from the runner with a stand-in engine ------------------------


class Flaky(AppError):
    code = "flaky"
    title = "Flaky"
    retryable = True


class Broken(AppError):
    code = "broken"
    title = "Broken"


class Engine2(Engine):
    platform = "test"

    def __init__(self) -> None:
        self.tries = 0

    async def run_step(self, ctx: StepContext) -> StepResult | None:
        if ctx.step.name == "first":
            self.tries += 1
            if self.tries == 1:
                raise Flaky("the endpoint answered 503")
            return None
        if ctx.step.name == "second":
            raise Broken("the disk is gone")
        return None


class Store:
    async def step_started(self, position: int) -> None: ...
    async def step_finished(self, position: int, status: str, result: StepResult | None,
                            error: str | None) -> None: ...
    async def progress(self, position: int, done: int, total: int, rate: int) -> None: ...
    async def checkpoint(self, data: Any) -> None: ...
    async def event(self, type: str, payload: EventPayload) -> None: ...
    async def cancel_requested(self) -> bool:
        return False


async def test_retries_and_failure_are_logged_with_reason(json_lines: io.StringIO) -> None:
    import asyncio

    spec = load_spec({"type": "conversion", "image_id": "6f1d1a8e-3a55-4b0a-9a43-96d6a1f4c2b7",
                      "format": "raw"})
    run = MigrationRun(id="m-3", tenant="acme", type=MigrationType.conversion, mode=None,
                       spec=spec, secrets=MigrationSecrets(), checkpoint=None, attempt=1,
                       steps=[StepRow(0, "first", False, "pending"),
                              StepRow(1, "second", False, "pending")])
    plan = Plan((Step("first"), Step("second")))

    async def no_wait(_: float) -> None:
        return None

    with logs.bind(migration_id="m-3", tenant="acme"):
        outcome = await Runner(Engine2(), Store(), RetryPolicy(max_attempts=3),
                               asyncio.Event(), sleep=no_wait).run(run, plan)
    assert outcome.status == "failed"
    lines = parsed(json_lines)
    retry = [line for line in lines if "retrying" in line["msg"]]
    assert len(retry) == 1
    assert retry[0]["level"] == "WARNING"
    assert (retry[0]["step"], retry[0]["attempt"], retry[0]["migration_id"]) == \
        ("first", 1, "m-3")
    assert "the endpoint answered 503" in retry[0]["msg"]
    second_try = [line for line in lines if line["msg"].startswith("step first completed")]
    assert second_try[0]["attempt"] == 2
    failed = [line for line in lines if line["level"] == "ERROR"]
    assert len(failed) == 1
    assert failed[0]["step"] == "second"
    assert "the disk is gone" in failed[0]["msg"]
