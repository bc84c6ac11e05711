"""The HTTP streaming transport against a real HTTP(S) server on loopback.

The server is the standard library's ``ThreadingHTTPServer`` in a thread: it can drop a
connection in the middle of a body, refuse ranges, read an upload slowly, and speak
TLS with a throw-away CA, so the transport's own socket code runs for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from app.errors import NotFound
from app.formats.base import SequentialSink
from app.transports.http import (
    BoundedSink,
    Filler,
    HttpDownload,
    HttpError,
    HttpUnavailable,
    http_client,
    upload,
)
from tests.infra.vcsim import make_test_pki

KiB, MiB = 1024, 1024 * 1024
BODY = random.Random(7).randbytes(3 * MiB + 123)


@dataclass
class Behaviour:
    """What the server does; what it saw."""

    drop_after: int | None = None  # first GET: send this many bytes, then drop the socket
    drops: int = 1  # how many GETs are dropped
    ranges: bool = True  # honour Range
    status: int = 200  # answer every request with this status instead
    read_delay: float = 0.0  # seconds slept per 64 KiB of an upload read
    seen_ranges: list[str | None] = field(default_factory=list)
    uploaded: bytearray = field(default_factory=bytearray)
    upload_headers: dict[str, str] = field(default_factory=dict)


class BehavingServer(ThreadingHTTPServer):
    behaviour: Behaviour


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BehavingServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_GET(self) -> None:
        b = self.server.behaviour
        wanted = self.headers.get("Range")
        b.seen_ranges.append(wanted)
        if b.status != 200:
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if wanted and b.ranges:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(BODY) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        body = BODY[start:]
        if b.drop_after is not None and b.drops > 0:
            b.drops -= 1
            self.wfile.write(body[: b.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
            self.close_connection = True
            return
        self.wfile.write(body)

    def _read_exactly(self, n: int, b: Behaviour) -> bytes:
        out = bytearray()
        while len(out) < n:
            part = self.rfile.read(min(64 * KiB, n - len(out)))
            if not part:
                break
            out += part
            if b.read_delay:
                time.sleep(b.read_delay)
        return bytes(out)

    def do_PUT(self) -> None:
        b = self.server.behaviour
        b.upload_headers.update({k.lower(): v for k, v in self.headers.items()})
        length = self.headers.get("Content-Length")
        if length is not None:
            b.uploaded += self._read_exactly(int(length), b)
        else:  # chunked
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                b.uploaded += self._read_exactly(size, b)
                self.rfile.readline()
        self.send_response(b.status if b.status != 200 else 201)
        self.send_header("Content-Length", "0")
        self.end_headers()


@dataclass
class Server:
    url: str
    behaviour: Behaviour


def _serve(context: ssl.SSLContext | None = None) -> Iterator[Server]:
    httpd = BehavingServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    behaviour = httpd.behaviour = Behaviour()
    scheme = "http"
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"{scheme}://127.0.0.1:{httpd.server_address[1]}/disk-0", behaviour)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    yield from _serve()


async def _read_all(download: HttpDownload, size: int = 256 * KiB) -> bytes:
    out = bytearray()
    while chunk := await download.read(size):
        out += chunk
    return bytes(out)


async def test_download_streams_and_probes_without_consuming(server: Server) -> None:
    seen: list[int] = []
    async with http_client() as client:
        download = HttpDownload(client, server.url, on_bytes=seen.append, fallback_size=1)
        head = await download.start(512)
        assert head == BODY[:512]
        assert download.size == len(BODY)
        # Only what the probe needed came off the socket: the rest waits for the reader.
        assert download.received < 1 * MiB
        assert await _read_all(download) == BODY
        await download.close()
    assert sum(seen) == len(BODY)
    assert server.behaviour.seen_ranges == [None]


async def test_a_connection_dropped_mid_download_resumes_with_range(server: Server) -> None:
    server.behaviour.drop_after = 1 * MiB + 17
    async with http_client() as client:
        download = HttpDownload(client, server.url)
        data = await _read_all(download)
        await download.close()
    assert hashlib.sha256(data).digest() == hashlib.sha256(BODY).digest()
    assert download.resumes == 1
    first, resumed = server.behaviour.seen_ranges
    assert first is None
    assert resumed is not None
    offset = int(resumed.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 1 * MiB + 17  # where the client's bytes ended


async def test_resumes_are_bounded(server: Server) -> None:
    server.behaviour.drop_after, server.behaviour.drops = 64 * KiB, 10
    async with http_client() as client:
        download = HttpDownload(client, server.url, max_resumes=2)
        with pytest.raises(HttpUnavailable) as info:
            await _read_all(download)
        await download.close()
    assert info.value.retryable
    assert download.resumes == 2


async def test_a_server_without_ranges_cannot_resume(server: Server) -> None:
    server.behaviour.drop_after, server.behaviour.ranges = 100 * KiB, False
    async with http_client() as client:
        download = HttpDownload(client, server.url)
        with pytest.raises(HttpUnavailable, match="cannot resume the download at byte") as info:
            await _read_all(download)
        assert info.value.retryable  # a new attempt starts over
        await download.close()


@pytest.mark.parametrize(("status", "error"), [(404, NotFound), (503, HttpUnavailable),
                                               (400, HttpError)])
async def test_statuses_are_translated(server: Server, status: int,
                                       error: type[Exception]) -> None:
    server.behaviour.status = status
    async with http_client() as client:
        download = HttpDownload(client, server.url)
        with pytest.raises(error, match=f"HTTP {status}"):
            await download.start()
        await download.close()


def _filler(total: int, chunk: int, lead: list[int]) -> tuple[bytes, Filler]:
    data = random.Random(11).randbytes(total)

    async def fill(sink: SequentialSink) -> None:
        for offset in range(0, total, chunk):
            await sink.write(data[offset : offset + chunk])
            lead.append(offset + chunk)

    return data, fill


@pytest.mark.parametrize("sized", [True, False])
async def test_an_upload_to_a_slow_server_stays_within_its_buffers(
    server: Server, sized: bool
) -> None:
    """The server reads 64 KiB every 2 ms; the filler could go much faster. At most
    ``depth`` buffers wait (plus the one being sent): the filler is held back."""
    server.behaviour.read_delay = 0.002
    depth, chunk, total = 3, 256 * KiB, 8 * MiB
    written: list[int] = []
    data, fill = _filler(total, chunk, written)
    sent: list[int] = []
    async with http_client() as client:
        result = await upload(client, server.url, fill, size=total if sized else None,
                              depth=depth, method="PUT", content_type="application/octet-stream",
                              on_bytes=sent.append)
    assert result.sent == total == sum(sent)
    assert 1 <= result.peak_in_flight <= depth + 1
    assert result.waits > 0  # the filler had to wait for room: back-pressure
    assert bytes(server.behaviour.uploaded) == data
    headers = server.behaviour.upload_headers
    assert headers["content-type"] == "application/octet-stream"
    if sized:
        assert headers["content-length"] == str(total)
    else:
        assert headers["transfer-encoding"] == "chunked"


async def test_bounded_sink_counts_what_is_in_flight() -> None:
    sink = BoundedSink(2)
    await sink.write(b"a")
    await sink.write(memoryview(b"b"))
    assert (sink.in_flight, sink.peak, sink.waits) == (2, 2, 0)
    third = asyncio.create_task(sink.write(b"c"))  # no room: waits for the reader
    await asyncio.sleep(0.01)
    assert not third.done()
    assert sink.waits == 1
    chunks = sink.drain()
    assert await anext(chunks) == b"a"
    await third
    assert sink.in_flight == 3  # "a" is being sent, "b" and "c" wait
    finish = asyncio.create_task(sink.finish())
    assert [c async for c in chunks] == [b"b", b"c"]
    await finish
    assert sink.in_flight == 0
    assert sink.peak == 3
    with pytest.raises(ValueError, match="at least 1"):
        BoundedSink(0)


async def test_an_upload_the_server_refuses_fails(server: Server) -> None:
    server.behaviour.status = 503
    _, fill = _filler(256 * KiB, 64 * KiB, [])
    async with http_client() as client:
        with pytest.raises(HttpUnavailable, match="HTTP 503"):
            await upload(client, server.url, fill, size=None, method="PUT")


async def test_tls_is_verified_by_default(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    for srv in _serve(context):
        async with http_client() as client:  # the system store does not know our CA
            with pytest.raises(HttpError, match="not trusted"):
                await HttpDownload(client, srv.url).start()
        trusted = ssl.create_default_context(cafile=str(pki.ca_cert))
        async with http_client(trusted) as client:
            download = HttpDownload(client, srv.url)
            assert await download.start(4) == BODY[:4]
            await download.close()


def test_the_client_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    client = http_client()
    assert client._trust_env is False
    assert isinstance(client, httpx.AsyncClient)
