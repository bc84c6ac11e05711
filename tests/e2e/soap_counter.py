"""A TLS-terminating loopback proxy in front of vcsim that counts SOAP logins.

The driver is pointed at the proxy instead of the simulator. The proxy presents the
simulator's own certificate (so the driver's TLS verification passes unchanged), opens
a verified TLS connection to the simulator for each client connection and copies bytes
both ways, looking at what the client sends for ``<Login `` and ``<Logout `` SOAP
bodies. It sees exactly the requests the driver makes on the wire: no SDK is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tests.infra.vcsim import Vcsim

_LOGIN = b"<Login "
_LOGOUT = b"<Logout "


@dataclass
class SoapCounter:
    host: str
    port: int
    logins: int = 0
    logouts: int = 0
    connections: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _count(window: bytes, needle: bytes) -> int:
    return window.count(needle)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                counter: SoapCounter | None) -> None:
    tail = b""
    try:
        while data := await reader.read(65536):
            if counter is not None:
                # keep the last bytes: a body may be split across reads
                window = tail + data
                counter.logins += _count(window, _LOGIN) - _count(tail, _LOGIN)
                counter.logouts += _count(window, _LOGOUT) - _count(tail, _LOGOUT)
                tail = window[-(len(_LOGOUT) - 1):]
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.asynccontextmanager
async def counting_proxy(vcsim: Vcsim) -> AsyncIterator[SoapCounter]:
    """Serve on 127.0.0.1 (a free port) until the block ends, from a thread and event
    loop of its own (so a blocking call of the code under test cannot stall it)."""
    pki = vcsim.workdir / "pki"
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    client_ctx = vcsim.ssl_context()
    counter = SoapCounter(host="127.0.0.1", port=0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        counter.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(
                vcsim.host, vcsim.port, ssl=client_ctx, server_hostname=vcsim.host)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(_pipe(c_reader, u_writer, counter),
                             _pipe(u_reader, c_writer, None))

    def track(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        counter._tasks.add(task)
        task.add_done_callback(counter._tasks.discard)

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        server = await asyncio.start_server(track, "127.0.0.1", 0, ssl=server_ctx)
        counter.port = server.sockets[0].getsockname()[1]
        ready.set()
        try:
            await stop.wait()
        finally:
            server.close()
            for task in list(counter._tasks):
                task.cancel()
            await asyncio.gather(*counter._tasks, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),),
                              name="soap-counter", daemon=True)
    thread.start()
    await asyncio.to_thread(ready.wait, 10)
    try:
        yield counter
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(thread.join, 10)
        loop.close()
