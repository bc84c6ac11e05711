"""Driver sessions of one migration run: each opened once, lazily, and closed at the end.

A run's steps (validate, power off, snapshot, transfer, cleanup, ...) used to log in
again each time they needed a cloud. :class:`DriverSessions` opens the source and the
destination driver the first time a step asks for it and hands every later step the
same connected driver; the engine closes them all from :meth:`Engine.aclose
<app.engines.runner.Engine.aclose>`, which the runner calls once when the run ends,
whatever the outcome. After a step failed with an error that may have broken a session
(a transient, retryable one) the engine calls :meth:`DriverSessions.reset`, so the
retry logs in afresh.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from app.drivers import registry as drivers
from app.drivers.base import DestinationDriver, Driver, SourceDriver
from app.services.clouds import CloudConnection

log = logging.getLogger(__name__)

ConnectionFactory = Callable[[], Awaitable[CloudConnection]]


class DriverSessions:
    """The connected drivers of one run, by role."""

    def __init__(self, source: ConnectionFactory, destination: ConnectionFactory) -> None:
        self._source_conn = source
        self._destination_conn = destination
        self._source: SourceDriver | None = None
        self._destination: DestinationDriver | None = None
        self._destination_reader: SourceDriver | None = None
        #: Sessions opened so far in this run (what tests and logs can count).
        self.opened = 0

    async def _open(self, driver: Driver) -> None:
        try:
            await driver.connect()
        except BaseException:
            await driver.close()
            raise
        self.opened += 1

    async def source(self) -> SourceDriver:
        """The source cloud's driver, connected (opened on first use)."""
        if self._source is None:
            driver = drivers.source_driver(await self._source_conn())
            await self._open(driver)
            self._source = driver
        return self._source

    async def destination(self) -> DestinationDriver:
        """The destination cloud's driver, connected (opened on first use)."""
        if self._destination is None:
            driver = drivers.destination_driver(await self._destination_conn())
            await self._open(driver)
            self._destination = driver
        return self._destination

    async def destination_reader(self) -> SourceDriver:
        """The destination cloud read as a source (to verify what was provisioned).

        When one driver class serves both roles for that cloud, the destination's
        session is reused (one login per cloud per run); else a reader session opens.
        """
        if self._destination_reader is None:
            conn = await self._destination_conn()
            reader = drivers.source_driver(conn)  # not connected: costs no login
            destination = await self.destination()
            if isinstance(destination, type(reader)):  # one class serves both roles
                self._destination_reader = cast(SourceDriver, destination)
            else:
                await self._open(reader)
                self._destination_reader = reader
        return self._destination_reader

    async def reset(self) -> None:
        """Close every session; the next use opens new ones."""
        opened: list[Driver] = []
        held: tuple[Driver | None, ...] = (self._source, self._destination,
                                           self._destination_reader)
        for driver in held:
            if driver is not None and not any(driver is d for d in opened):
                opened.append(driver)
        self._source = self._destination = self._destination_reader = None
        for driver in opened:
            with contextlib.suppress(Exception):
                await driver.close()

    async def aclose(self) -> None:
        await self.reset()


__all__ = ["ConnectionFactory", "DriverSessions"]
