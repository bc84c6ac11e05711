"""Clocks and a token-bucket bandwidth limit for the extent pipeline.

Time is always read through a :class:`Clock`, so tests drive it with a fake clock
(``sleep`` advances the fake time) and never depend on the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time in seconds and a way to wait."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: :func:`time.monotonic` and :func:`asyncio.sleep`."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


SYSTEM_CLOCK: Clock = SystemClock()

#: Default bucket size as a fraction of the rate: bytes sent in any window of T
#: seconds stay at or below ``rate * (T + BURST_FRACTION)``.
BURST_FRACTION = 0.05


class TokenBucket:
    """Allows ``rate`` bytes/s on average with bursts of at most ``burst`` bytes.

    The bucket starts full. :meth:`acquire` takes ``n <= burst`` tokens, sleeping on
    the clock until they have accumulated; callers split larger amounts into pieces of
    at most :attr:`piece` bytes. Over any window of ``T`` seconds at most
    ``burst + rate * T`` bytes pass.
    """

    def __init__(
        self, rate: float, *, burst: float | None = None, clock: Clock | None = None
    ) -> None:
        if rate <= 0:
            raise ValueError(f"throttle rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(self.rate * BURST_FRACTION, 1.0)
        if self.burst < 1:
            raise ValueError("throttle burst must be at least one byte")
        self.clock = clock or SYSTEM_CLOCK
        self._tokens = self.burst
        self._last = self.clock.monotonic()

    @property
    def piece(self) -> int:
        """Largest amount to ask for at once: the burst, rounded down to 4 KiB if possible."""
        whole = int(self.burst)
        return whole - whole % 4096 if whole >= 4096 else max(whole, 1)

    def _refill(self) -> None:
        now = self.clock.monotonic()
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes may pass (``n`` is clamped to the burst size)."""
        need = min(float(n), self.burst)
        self._refill()
        # A small tolerance: float rounding must not turn into endless tiny sleeps.
        while need - self._tokens > 1e-6 * need + 1e-3:
            await self.clock.sleep((need - self._tokens) / self.rate)
            self._refill()
        self._tokens = max(self._tokens - need, 0.0)
