"""The one error root of the service.

Every library's exceptions are translated into an :class:`AppError` subclass at the
boundary where they enter, so code above that boundary handles one family of errors.
An ``AppError`` knows the HTTP status it maps to, a stable machine-readable ``code``
(the last segment of the problem ``type`` URI) and whether retrying may help.
"""

from __future__ import annotations

from typing import Any, ClassVar


class AppError(Exception):
    """Base of every error the service raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra: dict[str, Any] = dict(extra or {})

    def __str__(self) -> str:
        return self.message


class NotFound(AppError):
    status = 404
    code = "not-found"
    title = "Not found"


class Conflict(AppError):
    status = 409
    code = "conflict"
    title = "Conflict"


class InvalidInput(AppError):
    status = 422
    code = "invalid-input"
    title = "Invalid input"


class TransientError(AppError):
    """A failure that may succeed when tried again (network, timeouts, throttling)."""

    status = 503
    code = "transient"
    title = "Temporarily unavailable"
    retryable = True
