"""Real servers for the webhook and event tests: a receiver that records deliveries and
verifies them with the ``standardwebhooks`` library, the app under uvicorn, and an SSE
reader. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from aiohttp import web
from fastapi import FastAPI
from standardwebhooks.webhooks import Webhook

from app.config import Settings
from app.server import DrainingServer


def webhook_settings(settings: Settings, **overrides: Any) -> Settings:
    """Loopback receivers allowed (over http), short timeouts and retries."""
    values: dict[str, Any] = {
        "webhook_allow_hosts": ["127.0.0.0/8"],
        "webhook_allow_http_hosts": ["127.0.0.1/32"],
        "webhook_timeout_seconds": 3.0,
        "webhook_retry_base_seconds": 0.05,
        "webhook_retry_max_seconds": 0.2,
        "webhook_poll_seconds": 0.05,
        "events_keepalive_seconds": 0.3,
    }
    values.update(overrides)
    return settings.model_copy(update=values)


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def verify(self, secret: str) -> Any:
        """The parsed body if ``secret`` verifies the signature, else raises."""
        return Webhook(secret).verify(self.body, self.headers)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1. ``respond(path, 500, 200)`` makes the first
    request to ``path`` get 500 and the later ones 200; ``"hang"`` never answers,
    ``"redirect"`` sends a 307 to ``/elsewhere``."""

    received: list[Delivery] = field(default_factory=list)
    plans: dict[str, list[int | str]] = field(default_factory=dict)
    port: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(self, path: str, *answers: int | str) -> None:
        self.plans[path] = list(answers)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Delivery(request.path, dict(request.headers), body,
                                      time.monotonic()))
        self._arrived.set()
        plan = self.plans.get(request.path, [])
        answer = plan.pop(0) if len(plan) > 1 else (plan[0] if plan else 200)
        if answer == "hang":
            await self._release.wait()
            return web.Response(status=504)
        if answer == "redirect":
            return web.Response(status=307, headers={"Location": self.url("/elsewhere")})
        return web.Response(status=int(answer), text="x" * 100_000)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *_: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def at(self, path: str) -> list[Delivery]:
        return [d for d in self.received if d.path == path]

    async def wait_for(self, count: int, path: str = "/hook", timeout: float = 10.0
                       ) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while len(self.at(path)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{path}: {len(self.at(path))} of {count} deliveries "
                                     f"after {timeout} s")
            self._arrived.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.1))
        return self.at(path)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[tuple[str, DrainingServer]]:
    """``app`` under uvicorn on 127.0.0.1 (lifespan on); yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on")
    server = DrainingServer(config, app)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise AssertionError("uvicorn stopped before it started")
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@dataclass
class Frame:
    id: str | None = None
    event: str | None = None
    data: str = ""
    comment: str | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.data)


async def frames(response: httpx.Response) -> AsyncIterator[Frame]:
    """Parse a ``text/event-stream`` body into frames (comments become frames too)."""
    current = Frame()
    async for line in response.aiter_lines():
        if line == "":
            if current.data or current.id or current.event:
                yield current
            current = Frame()
        elif line.startswith(":"):
            yield Frame(comment=line[1:].strip())
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "id":
                current.id = value
            elif key == "event":
                current.event = value
            elif key == "data":
                current.data += value


class EventReader:
    """Reads one ``text/event-stream`` response in pieces (comments skipped)."""

    def __init__(self, response: httpx.Response) -> None:
        self._frames = frames(response)

    async def take(self, count: int, timeout: float = 10.0) -> list[Frame]:
        got: list[Frame] = []

        async def read() -> None:
            while len(got) < count:
                f = await anext(self._frames)
                if f.comment is None:
                    got.append(f)

        await asyncio.wait_for(read(), timeout)
        return got


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client on ``app`` with its lifespan run."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://vmigrate.test") as c:
            yield c
