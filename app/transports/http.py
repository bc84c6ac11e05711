"""Back-pressured HTTP(S) streaming: the byte path of every driver that moves disks over HTTP.

* :class:`HttpDownload` is a :class:`~app.formats.base.SequentialSource` over a streamed
  GET. Nothing is read from the socket until the consumer asks, so a slow pipeline
  slows the server down through TCP flow control. A connection that drops mid-body is
  resumed with a ``Range: bytes=<received>-`` request (up to ``max_resumes`` times);
  the server must answer ``206`` from exactly that offset, else the download fails
  (retryable: a new attempt starts over).
* :func:`upload` streams what a filler writes into a :class:`BoundedSink` (at most
  ``depth`` buffers wait for the socket: a slow server blocks the filler, memory stays
  at ``depth`` x chunk size) as the body of one request; a failure on either side
  cancels the other.

TLS is verified by default: :func:`http_client` takes the caller's ``ssl.SSLContext``
(a driver's trust policy) or the system store, and never reads proxy or CA variables
from the environment (``trust_env=False``). Errors are translated by the caller's
``errors`` (a driver passes its own boundary) or else by the shared network table
(:data:`app.errormap.NETWORK`) into :class:`HttpError`/:class:`HttpUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import httpx

from app.errormap import NETWORK, Boundary, ErrorFamily
from app.errors import AppError, TransientError
from app.formats.base import SequentialSink

log = logging.getLogger(__name__)

#: Opens an error-translating block for an action ("download the disk").
Errors = Callable[[str], AbstractContextManager[None]]
#: Writes a whole body into the sink and returns.
Filler = Callable[[SequentialSink], Awaitable[None]]


class HttpError(AppError):
    status = 502
    code = "http-error"
    title = "HTTP transfer failed"


class HttpUnavailable(TransientError):
    code = "http-unavailable"
    title = "HTTP endpoint temporarily unavailable"


HTTP = ErrorFamily(failed=HttpError, unavailable=HttpUnavailable, auth=HttpError,
                   untrusted=HttpError)


def default_errors(url: str) -> Errors:
    """The shared network table, naming the URL's host (never its path: it may be a ticket)."""
    parts = httpx.URL(url)
    boundary = Boundary(where=f"{parts.host}:{parts.port or 443}", family=HTTP)
    return lambda action: NETWORK.mapping(boundary, action)


def http_client(context: ssl.SSLContext | None = None, *, timeout: float = 120.0,
                connect_timeout: float = 30.0) -> httpx.AsyncClient:
    """A client that verifies TLS (``context``, else the system store) and ignores the
    environment's proxies and CA variables."""
    verify = context if context is not None else ssl.create_default_context()
    return httpx.AsyncClient(verify=verify, trust_env=False,
                             timeout=httpx.Timeout(timeout, connect=connect_timeout))


def _resumable(exc: BaseException) -> bool:
    """A dropped connection mid-body, as httpx reports it."""
    return isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError | httpx.ReadTimeout)


class HttpDownload:
    """A streamed GET of ``url`` as a :class:`SequentialSource`, resumed with Range.

    :meth:`start` sends the request and buffers the first ``head`` bytes (to probe the
    format; they are not consumed). ``size`` is the Content-Length, else
    ``fallback_size``. ``on_bytes`` is told every byte that arrives (progress).
    """

    def __init__(self, client: httpx.AsyncClient, url: str, *,
                 headers: Mapping[str, str] | None = None, errors: Errors | None = None,
                 on_bytes: Callable[[int], None] | None = None, fallback_size: int = 0,
                 max_resumes: int = 3) -> None:
        self._client = client
        self.url = url  # may carry a ticket: never log it
        self._headers = dict(headers or {})
        self._errors = errors or default_errors(url)
        self._on_bytes = on_bytes or (lambda n: None)
        self._max_resumes = max_resumes
        self._response: httpx.Response | None = None
        self._chunks: AsyncIterator[bytes] | None = None
        self._buf = b""
        self._pos = 0
        self._eof = False
        #: Bytes received from the server so far: where a resumed request starts.
        self.received = 0
        self.resumes = 0
        self.content_length: int | None = None
        self.size = fallback_size

    async def _request(self, offset: int) -> None:
        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = self._client.build_request("GET", self.url, headers=headers)
        response = await self._client.send(request, stream=True)
        self._response = response
        response.raise_for_status()
        if offset:
            expected = f"bytes {offset}-"
            if response.status_code != 206 or not response.headers.get(
                "content-range", ""
            ).startswith(expected):
                # Retryable: the drop was transient, a fresh attempt starts from 0.
                raise HttpUnavailable(
                    f"the connection dropped and the server cannot resume the download at "
                    f"byte {offset} "
                    f"(HTTP {response.status_code}, Content-Range "
                    f"{response.headers.get('content-range')!r})"
                )
        self._chunks = response.aiter_raw()

    async def start(self, head: int = 512) -> bytes:
        """Open the stream; returns its first bytes (up to ``head``, not consumed)."""
        with self._errors("start the download"):
            await self._request(0)
        assert self._response is not None
        length = self._response.headers.get("content-length")
        if length is not None and length.isdigit():
            self.content_length = self.size = int(length)
        while len(self._buf) - self._pos < head and not self._eof:
            await self._fill()
        return self._buf[self._pos : self._pos + head]

    async def _next_chunk(self) -> bytes | None:
        assert self._chunks is not None
        while True:
            try:
                return await anext(self._chunks)
            except StopAsyncIteration:
                return None
            except httpx.HTTPError as exc:
                if not _resumable(exc) or self.resumes >= self._max_resumes:
                    raise
                self.resumes += 1
                log.info("download dropped at byte %d (%s); resuming (%d/%d)", self.received,
                         type(exc).__name__, self.resumes, self._max_resumes)
                await self._drop_response()
                await self._request(self.received)

    async def _fill(self) -> None:
        if self._chunks is None:
            await self.start()
            return
        with self._errors("download"):
            chunk = await self._next_chunk()
        if chunk is None:
            self._eof = True
            if self.content_length is not None and self.received != self.content_length:
                raise HttpUnavailable(
                    f"the download ended at byte {self.received} of {self.content_length}")
            return
        self.received += len(chunk)
        self._on_bytes(len(chunk))
        rest = self._buf[self._pos :]
        self._buf = rest + chunk if rest else chunk
        self._pos = 0

    async def read(self, n: int) -> bytes:
        if self._chunks is None:
            await self.start()
        while self._pos >= len(self._buf) and not self._eof:
            await self._fill()
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    async def _drop_response(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            with contextlib.suppress(httpx.HTTPError, OSError):
                await response.aclose()

    async def close(self) -> None:
        await self._drop_response()


class BoundedSink:
    """A :class:`SequentialSink` whose writes wait for room among ``depth`` buffers.

    ``in_flight`` counts buffers written and not yet handed to the socket (queued, or
    being sent); ``peak`` is its highest value; ``waits`` counts writes that had to
    wait for room (the back-pressure at work).
    """

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=depth)
        self.in_flight = 0
        self.peak = 0
        self.waits = 0

    async def write(self, data: bytes | memoryview) -> None:
        if not data:
            return
        if self._queue.full():
            self.waits += 1
        await self._queue.put(bytes(data))  # a copy: writers may reuse their buffers
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    async def finish(self) -> None:
        await self._queue.put(None)

    async def close(self) -> None:
        return None

    async def drain(self) -> AsyncIterator[bytes]:
        """The buffers in order, until :meth:`finish`; each is released when the next
        one is asked for (the client has sent it by then)."""
        held = False
        while True:
            chunk = await self._queue.get()
            if held:
                self.in_flight -= 1
            if chunk is None:
                return
            held = True
            yield chunk


@dataclass(frozen=True, slots=True)
class UploadResult:
    sent: int
    peak_in_flight: int
    waits: int


async def upload(client: httpx.AsyncClient, url: str, fill: Filler, *, size: int | None,
                 depth: int = 4, method: str = "POST", content_type: str | None = None,
                 headers: Mapping[str, str] | None = None, errors: Errors | None = None,
                 on_bytes: Callable[[int], None] | None = None) -> UploadResult:
    """Send what ``fill`` writes as the body of one request; at most ``depth`` buffers
    wait for the socket.

    With ``size`` the request has a Content-Length and the byte count is checked
    (:class:`HttpError` when it differs); without, it is sent chunked. The first
    failure of the filler or the request cancels the other and propagates.
    """
    errors = errors or default_errors(url)
    count = on_bytes or (lambda n: None)
    sink = BoundedSink(depth)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        async for chunk in sink.drain():
            sent += len(chunk)
            if size is not None and sent > size:
                raise HttpError(f"the body encodes to more than the declared {size} bytes")
            count(len(chunk))
            yield chunk

    async def produce() -> None:
        await fill(sink)
        await sink.finish()

    async def send() -> None:
        all_headers = dict(headers or {})
        if content_type:
            all_headers["Content-Type"] = content_type
        if size is not None:
            all_headers["Content-Length"] = str(size)
        with errors("upload"):
            response = await client.request(method, url, content=body(), headers=all_headers)
            response.raise_for_status()

    tasks = [asyncio.create_task(produce(), name="http-upload-fill"),
             asyncio.create_task(send(), name="http-upload-send")]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            failure = task.exception()
            if failure is not None:
                raise failure
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if size is not None and sent != size:
        raise HttpError(f"the body encoded to {sent} bytes, {size} were declared")
    return UploadResult(sent=sent, peak_in_flight=sink.peak, waits=sink.waits)
