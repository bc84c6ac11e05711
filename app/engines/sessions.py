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
from app.drivers.kit.connection import CloudConnection

log = logging.getLogger(__name__)

ConnectionFactory = Callable[[], Awaitable[CloudConnection]]


class DriverSessions:
    """The connected drivers of one run, by role.

    A driver serves every role its class implements: when the destination is the same
    cloud, reached with the same settings and credentials, as the source (a VM copied
    within one vCenter), and one driver class serves both roles, the one session does
    both. So a run logs into each cloud once.
    """

    def __init__(self, source: ConnectionFactory, destination: ConnectionFactory) -> None:
        self._source_conn = source
        self._destination_conn = destination
        self._source: SourceDriver | None = None
        self._destination: DestinationDriver | None = None
        self._destination_reader: SourceDriver | None = None
        self._open: list[tuple[CloudConnection, Driver]] = []
        #: Sessions opened so far in this run.
        self.opened = 0

    async def _session(self, conn: CloudConnection, driver: Driver) -> Driver:
        """An open session with ``conn`` of ``driver``'s class (or a subclass): one
        opened earlier in the run, else ``driver`` itself, connected now."""
        for known, opened in self._open:
            if known == conn and isinstance(opened, type(driver)):
                return opened
        try:
            await driver.connect()
        except BaseException:
            await driver.close()
            raise
        self._open.append((conn, driver))
        self.opened += 1
        log.debug("opened a %s session with cloud %s", type(driver).__name__, conn.id)
        return driver

    async def source(self) -> SourceDriver:
        """The source cloud's driver, connected (opened on first use)."""
        if self._source is None:
            conn = await self._source_conn()
            # source_driver() builds a driver without connecting: it costs no login
            self._source = cast(SourceDriver,
                                await self._session(conn, drivers.source_driver(conn)))
        return self._source

    async def destination(self) -> DestinationDriver:
        """The destination cloud's driver, connected (opened on first use)."""
        if self._destination is None:
            conn = await self._destination_conn()
            self._destination = cast(DestinationDriver, await self._session(
                conn, drivers.destination_driver(conn)))
        return self._destination

    async def destination_reader(self) -> SourceDriver:
        """The destination cloud read as a source (to verify what was provisioned)."""
        if self._destination_reader is None:
            conn = await self._destination_conn()
            self._destination_reader = cast(SourceDriver, await self._session(
                conn, drivers.source_driver(conn)))
        return self._destination_reader

    async def reset(self) -> None:
        """Close every session; the next use opens new ones."""
        opened, self._open = [d for _, d in self._open], []
        self._source = self._destination = self._destination_reader = None
        for driver in opened:
            with contextlib.suppress(Exception):
                await driver.close()

    async def aclose(self) -> None:
        await self.reset()


__all__ = ["ConnectionFactory", "DriverSessions"]
