"""Run the ASGI app under uvicorn, ending event streams as soon as shutdown begins.

uvicorn waits for open responses to finish before it runs the lifespan shutdown, and
a Server-Sent Events stream never finishes by itself. So when the signal arrives,
:class:`DrainingServer` first tells the event bus to close every stream (clients
reconnect to another replica with ``Last-Event-ID``), then shuts down as usual.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.close_streams)

    def close_streams(self) -> None:
        ctx = getattr(self.app.state, "ctx", None)
        if ctx is not None and ctx.events is not None:
            ctx.events.close_streams()


def serve(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level)
    DrainingServer(config, app).run()
