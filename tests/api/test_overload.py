"""The in-flight bound: past it, an immediate 503 problem with Retry-After; a client
that disconnects has its request cancelled. Driven by events, never by timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from app.api.overload import InFlightLimit
from app.config import Settings
from app.db import Database
from app.main import create_app
from tests.conftest import TokenFactory, auth


class Gate:
    """An ASGI app whose requests wait until released (or are cancelled)."""

    def __init__(self) -> None:
        self.entered = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        self.entered += 1
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def test_past_the_bound_a_503_problem_with_retry_after_at_once() -> None:
    gate = Gate()
    limited = InFlightLimit(gate, max_in_flight=2, retry_after=3)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        held = [asyncio.create_task(client.get("/v1/x")) for _ in range(2)]
        while gate.entered < 2:
            await asyncio.sleep(0)
        assert limited.in_flight == 2
        # Answered while the two admitted ones still wait: nothing queued behind them.
        refused = await client.get("/v1/x")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "3"
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["status"] == 503
        assert problem["type"].endswith("/overloaded")
        assert "2 requests in flight" in problem["detail"]
        gate_calls = gate.entered
        gate.release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert limited.in_flight == 0
        assert limited.refused == 1
        assert (await client.get("/v1/x")).status_code == 200
        assert gate.entered == gate_calls + 1


async def _late_sample(limited: InFlightLimit, samples: int) -> None:
    """Block the loop 0.4 s (as a flood of work would) and let the sampler record the
    late wake-up (at least 0.4 - 0.05 s late), until ``samples`` late ones in a row."""
    for _ in range(20):
        if limited.late_samples >= samples:
            return
        seen = limited.samples
        time.sleep(0.4)
        for _ in range(1000):
            if limited.samples > seen:
                break
            await asyncio.sleep(0)
    raise AssertionError(f"the sampler recorded {limited.late_samples} late samples")


async def test_a_lagging_event_loop_refuses_new_requests() -> None:
    """Requests waiting for the loop are not in flight yet: a loop that keeps running
    late refuses new requests; one late sample (a single stall) refuses nothing."""
    gate = Gate()
    gate.release.set()
    limited = InFlightLimit(gate, max_in_flight=100, max_loop_lag=0.25)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/v1/x")).status_code == 200  # starts the sampler
        await _late_sample(limited, 1)
        assert limited.lag > 0.25
        assert (await client.get("/v1/x")).status_code == 200  # one late sample: admitted
        await _late_sample(limited, 2)
        r = await client.get("/v1/x")
        assert r.status_code == 503
        assert "retry-after" in r.headers
        limited.late_samples = 0  # caught up (the next sample on time says so)
        assert (await client.get("/v1/x")).status_code == 200


async def test_probes_and_event_streams_are_not_counted() -> None:
    gate = Gate()
    gate.release.set()
    limited = InFlightLimit(gate, max_in_flight=1)
    limited.in_flight = 1  # as if full
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/v1/events", headers={"Accept": "text/event-stream"})
        assert r.status_code == 200
        assert (await client.get("/v1/x")).status_code == 503


async def test_a_client_that_disconnects_has_its_request_cancelled() -> None:
    gate = Gate()
    limited = InFlightLimit(gate, max_in_flight=4)
    left = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if not gate.started.is_set():
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "GET", "path": "/v1/x", "headers": []}
    call = asyncio.create_task(limited(scope, receive, send))
    await gate.started.wait()
    assert limited.in_flight == 1
    left.set()
    await call  # returns (nobody to answer), does not raise
    assert gate.cancelled == 1
    assert limited.cancelled == 1
    assert limited.in_flight == 0
    assert sent == []


async def test_a_finished_response_is_not_cancelled_by_the_closing_disconnect() -> None:
    gate = Gate()
    gate.release.set()
    limited = InFlightLimit(gate, max_in_flight=4)
    sent: list[Message] = []
    done = asyncio.Event()

    async def receive() -> Message:
        if not sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body":
            done.set()

    await limited({"type": "http", "method": "GET", "path": "/v1/x", "headers": []},
                  receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert limited.cancelled == 0
    assert gate.cancelled == 0


@pytest.fixture
async def tight_app(settings: Settings, db: Database) -> AsyncIterator[
        tuple[httpx.AsyncClient, FastAPI]]:
    app = create_app(settings.model_copy(update={"api_max_in_flight": 1,
                                                 "api_retry_after_seconds": 2}), db=db)
    transport = httpx.ASGITransport(app=app)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=transport, base_url="http://t") as client):
        yield client, app


def _limiter(app: FastAPI) -> InFlightLimit:
    layer: Any = app.middleware_stack
    for _ in range(20):
        if isinstance(layer, InFlightLimit):
            return layer
        layer = layer.app
    raise AssertionError("no InFlightLimit in the middleware stack")


async def test_the_app_answers_overload_with_its_problem(
    tight_app: tuple[httpx.AsyncClient, FastAPI], make_token: TokenFactory
) -> None:
    """The service itself: one slot (``api_max_in_flight=1``) held by a request whose
    body is still arriving; another request gets the 503 at once."""
    client, app = tight_app
    headers = auth(await make_token())
    assert (await client.get("/v1/migrations", headers=headers)).status_code == 200
    limiter = _limiter(app)
    more = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"items": ['
        await more.wait()
        yield b"]}"

    held = asyncio.create_task(client.post(
        "/v1/migrations/batch", content=slow_body(),
        headers={**headers, "Content-Type": "application/json"}))
    for _ in range(1000):
        if limiter.in_flight == 1:
            break
        await asyncio.sleep(0)
    assert limiter.in_flight == 1
    refused = await client.get("/v1/migrations", headers=headers)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert refused.json()["type"].endswith("/overloaded")
    more.set()
    assert (await held).status_code == 422  # an empty batch: the held request completed
    assert limiter.in_flight == 0
    assert (await client.get("/v1/migrations", headers=headers)).status_code == 200
