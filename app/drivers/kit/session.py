"""The session every driver is: connect, close, ``async with``, SDK calls in threads.

:class:`DriverSession` holds the life cycle and the error boundary; a platform
subclass implements :meth:`_open` (log in) and :meth:`_close` (log out; may raise:
:meth:`close` swallows it) and calls its SDK through :meth:`call`, which runs the
blocking call in a thread with its exceptions translated by the platform's
:class:`~app.errormap.ErrorTable`. :func:`poll` is the one polling loop (deadline,
exponential backoff) for tasks, leases and power states.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import ClassVar, Self, TypeVar

from app.drivers.base import CloudUnavailable
from app.drivers.kit.errors import CLOUD_NETWORK
from app.errormap import Boundary, ErrorTable

log = logging.getLogger(__name__)
T = TypeVar("T")


class DriverSession:
    """Base class of a driver: one session with one cloud; use ``async with``."""

    #: The platform's error table (extends :data:`~app.drivers.kit.errors.CLOUD_NETWORK`).
    errors_table: ClassVar[ErrorTable] = CLOUD_NETWORK

    def __init__(self, boundary: Boundary) -> None:
        self.boundary = boundary
        self._connected = False

    # --- what a platform implements ----------------------------------------------------

    async def _open(self) -> None:
        """Log in. Raise through :meth:`call`/:meth:`errors` so errors are translated."""
        raise NotImplementedError

    async def _close(self) -> None:
        """Log out and release clients; may raise (it is swallowed and logged)."""

    # --- life cycle ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        if self._connected:
            return
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        self._connected = True

    async def close(self) -> None:
        """End the session; never raises, safe to call twice."""
        self._connected = False
        try:
            await self._close()
        except Exception as exc:  # closing must not hide the error that got us here
            log.info("closing the session with %s failed: %s", self.boundary.where,
                     self.boundary.scrub(str(exc)))

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # --- calls ------------------------------------------------------------------------

    def errors(self, action: str) -> AbstractContextManager[None]:
        """Translate what the block raises (SDK, HTTP, TLS, socket) for ``action``."""
        return self.errors_table.mapping(self.boundary, action)

    async def call(self, action: str, fn: Callable[[], T]) -> T:
        """Run one blocking SDK call in a thread, its errors translated."""
        with self.errors(action):
            return await asyncio.to_thread(fn)


async def poll(probe: Callable[[], Awaitable[T | None]], *, what: str, limit: float,
               first_delay: float = 0.05, max_delay: float = 1.0,
               on_timeout: Callable[[], Exception] | None = None) -> T:
    """Call ``probe`` until it returns something other than None; return that.

    Waits ``first_delay`` after the first miss, doubling up to ``max_delay``. Past
    ``limit`` seconds raises ``on_timeout()`` (default: ``CloudUnavailable``, as a
    slow cloud may well finish on a later try).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    delay = first_delay
    while True:
        result = await probe()
        if result is not None:
            return result
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise (on_timeout() if on_timeout else CloudUnavailable(
                f"{what}: not done after {limit:g} s"))
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay)
