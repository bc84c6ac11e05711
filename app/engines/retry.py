"""Retry policy as data: which errors are worth another try, and how long to wait.

A step that raises is retried when the error is transient (connection reset, timeout,
5xx, throttling: :class:`~app.errors.AppError` with ``retryable`` set, or the OS-level
network errors below) and attempts remain; anything else fails the step at once.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from app.errors import AppError

#: Exceptions that mean "the network or the peer hiccuped", whatever library raised them
#: before translation.
TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,  # reset, refused, aborted, broken pipe
    TimeoutError,
    asyncio.TimeoutError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_delay: float = 1.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    #: Fraction of each delay that is randomised (spreads retries of many workers).
    jitter: float = 0.2
    non_retryable: tuple[type[BaseException], ...] = field(default=())

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, self.non_retryable):
            return False
        if isinstance(exc, AppError):
            return exc.retryable
        return isinstance(exc, TRANSIENT_TYPES)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        return attempt < self.max_attempts and self.is_retryable(exc)
