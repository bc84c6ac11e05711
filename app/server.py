"""Run the ASGI app under uvicorn, ending event streams as soon as shutdown begins.

uvicorn waits for open responses to finish before it runs the lifespan shutdown, and
a Server-Sent Events stream never finishes by itself. So when the signal arrives,
:class:`DrainingServer` first tells the event bus to close every stream (clients
reconnect to another replica with ``Last-Event-ID``), then shuts down as usual.
"""

from __future__ import annotations

import asyncio
import errno
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


class PortInUse(Exception):
    """The address ``vmigrate serve`` was asked to listen on is taken."""


def bind(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before any database or worker starts) so a
    busy port is reported at once; uvicorn listens on it later. Raises
    :class:`PortInUse`, or ``OSError`` for any other failure (bad address, no
    permission)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"{host}:{port} is already in use (another vmigrate serve?); "
                            "choose another with --port or VMIGRATE_PORT") from exc
        raise
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, sock: socket.socket, *, log_level: str) -> bool:
    """Serve ``app`` on the bound ``sock`` until SIGTERM/SIGINT. Returns False when the
    app did not start (its lifespan failed; uvicorn has logged why).

    uvicorn writes through the process's logging setup (:mod:`app.logs`): its own
    handlers and access log are off; the request middleware logs requests."""
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None,
                            access_log=False)
    server = DrainingServer(config, app)
    server.run(sockets=[sock])
    return server.started
