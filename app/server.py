"""Run the ASGI app under uvicorn: one process, or several (``serve --workers N``).

One process (:func:`serve`): uvicorn waits for open responses to finish before it runs
the lifespan shutdown, and a Server-Sent Events stream never finishes by itself. So
when the signal arrives, :class:`DrainingServer` first tells the event bus to close
every stream (clients reconnect to another replica with ``Last-Event-ID``), then shuts
down as usual.

Several processes (:func:`serve_processes`): uvicorn's own process manager runs N API
processes on one socket; the migration workers run as ``vmigrate worker`` processes of
their own beside them. Sizing both: docs/performance.md.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)


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


# --- several API processes: `vmigrate serve --workers N` -----------------------------

#: How long an API process lets open responses (event streams) run after SIGTERM before
#: cancelling them; clients reconnect to another process with ``Last-Event-ID``.
STREAM_GRACE_SECONDS = 5
#: How long migration workers get to hand their runs back after SIGTERM.
WORKER_STOP_SECONDS = 60.0


def _prepare(settings: Settings) -> dict[str, str]:
    """Done once in the parent, before any child starts: start the embedded PostgreSQL
    when no URL is configured, upgrade the schema and create the key file, so that the
    children neither race to do it nor need to. Returns the children's environment."""
    import asyncio

    from app.crypto import load_keys
    from app.db import Database, embedded_postgres_url, upgrade

    async def ready() -> str:
        if settings.database_url is not None:
            url = settings.database_url.get_secret_value()
        else:
            url = await embedded_postgres_url(settings.postgres_dir)
        db = Database(url, pool_size=1)
        try:
            await upgrade(db)
        finally:
            await db.dispose()
        return url

    url = asyncio.run(ready())
    load_keys([k.get_secret_value() for k in settings.encryption_keys], settings.key_file)
    return {**os.environ, "VMIGRATE_DATABASE_URL": url}


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "app.cli", "worker"]


class WorkerProcesses:
    """The migration workers of ``serve --workers N``: ``count`` ``vmigrate worker``
    processes, restarted (at most one restart per ``min_gap`` seconds each) if one
    exits while serving, and stopped with SIGTERM (so they hand their runs back) when
    serving ends."""

    def __init__(self, count: int, env: dict[str, str], min_gap: float = 5.0) -> None:
        self.count = count
        self.env = env
        self.min_gap = min_gap
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        self._watcher = threading.Thread(target=self._watch, name="worker-watch", daemon=True)
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(_worker_command(), env=self.env)
        log.info("started migration worker process [%d]", proc.pid)
        return proc

    def _watch(self) -> None:
        while not self._stopping.wait(self.min_gap):
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self._stopping.is_set():
                    log.error("migration worker [%d] exited with %s; starting another",
                              proc.pid, proc.returncode)
                    self.procs[i] = self._spawn()

    def stop(self, timeout: float = WORKER_STOP_SECONDS) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("migration worker [%d] did not stop in %.0f s; killing it",
                          proc.pid, timeout)
                proc.kill()
                proc.wait()


def serve_processes(
    settings: Settings, sock: socket.socket, *, log_level: str, workers: int,
    migration_workers: int,
) -> None:
    """``vmigrate serve --workers N``: N API processes under uvicorn's process manager
    (one listening socket, a dead process replaced) and ``migration_workers`` separate
    ``vmigrate worker`` processes, so that no API process ever does disk I/O.

    Blocks until SIGINT/SIGTERM; then the API processes finish their requests (event
    streams are ended after :data:`STREAM_GRACE_SECONDS`) and the workers hand their
    runs back."""
    from uvicorn.supervisors import Multiprocess

    env = _prepare(settings)
    os.environ.update(env)  # the API processes are spawned with the parent's environment
    # Each API process builds the app from the environment prepared above (the URL of
    # the one database) with create_app()'s defaults: the API alone, no worker.
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        "app.main:create_app", factory=True, host=host, port=port, log_level=log_level,
        workers=workers, timeout_graceful_shutdown=STREAM_GRACE_SECONDS,
    )
    background = WorkerProcesses(migration_workers, env)
    if migration_workers:
        background.start()
    try:
        Multiprocess(config, sockets=[sock]).run()
    finally:
        background.stop()
