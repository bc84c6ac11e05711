"""Translate pyvmomi, httpx, ssl and socket exceptions into the service's errors.

One context manager, :func:`map_exceptions`, wraps every call into pyvmomi and every
NFC transfer of :mod:`app.drivers.vmware`, so nothing above the driver sees an SDK
exception. Permanent versus retryable follows what a retry could change:

================================================  ===================  =========
vSphere / transport failure                        becomes              retryable
================================================  ===================  =========
``InvalidLogin``, HTTP 401/403                     CloudAuthError       no
``NoPermission`` (not ``NotAuthenticated``)        CloudAuthError       no
certificate verification failed                    CloudTlsError        no
``ManagedObjectNotFound``, ``NotFound``, HTTP 404  NotFound             no
``InvalidState``/``InvalidPowerState``/duplicate   CloudStateError      no
``NotAuthenticated`` (session expired)             CloudUnavailable     yes
``HostCommunication``, ``HostConnectFault``,       CloudUnavailable     yes
``TaskInProgress``, ``Timedout``, ``SystemError``,
reset/refused/timeout, HTTP 408/429/5xx
any other vSphere fault, other HTTP status         CloudError           no
================================================  ===================  =========

Messages name the action, the endpoint and the platform's own text. Secrets (the
password, the session cookie) are removed from every message as a last line of
defence, and authentication failures are raised ``from None`` so no library text that
might echo a credential travels along in the cause chain.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import httpx
from pyVmomi import vim, vmodl

from app.drivers.base import (
    CloudAuthError,
    CloudError,
    CloudStateError,
    CloudTlsError,
    CloudUnavailable,
)
from app.drivers.tls import is_verification_failure
from app.errors import AppError, NotFound

_RETRYABLE_FAULTS: tuple[type[Any], ...] = (
    vim.fault.NotAuthenticated,
    vmodl.fault.HostCommunication,
    vim.fault.TaskInProgress,
    vim.fault.Timedout,
    vmodl.fault.SystemError,
    vmodl.fault.RequestCanceled,
)
_STATE_FAULTS: tuple[type[Any], ...] = (vim.fault.InvalidState, vim.fault.DuplicateName)
_NOT_FOUND_FAULTS: tuple[type[Any], ...] = (vmodl.fault.ManagedObjectNotFound, vim.fault.NotFound)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Who we talk to, for messages; ``secrets`` are scrubbed from every message."""

    label: str  # "vCenter" or "ESXi host"
    host: str
    port: int
    username: str
    trust: str  # how TLS is verified, e.g. "the cloud's CA bundle"
    secrets: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.label} {self.host}:{self.port}"

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def fault_text(fault: BaseException) -> str:
    """The platform's own words for a fault: its ``msg`` (else its first localized
    message) after the fault's type name. A vSphere fault's ``str()`` is a multi-line
    dump of every field, so it is used only for other exceptions."""
    name = type(fault).__name__.rsplit(".", 1)[-1]
    if isinstance(fault, vmodl.MethodFault):
        messages = getattr(fault, "faultMessage", None) or []
        msg = getattr(fault, "msg", None) or next(
            (m.message for m in messages if getattr(m, "message", None)), ""
        )
    else:
        msg = str(fault)
    msg = str(msg).strip()
    return f"{name}: {msg}" if msg and name not in msg else (msg or name)


def _verify_reason(exc: BaseException) -> str:
    """OpenSSL's reason ("unable to get local issuer certificate"), found through wrappers."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        reason = getattr(current, "verify_message", None)
        if isinstance(reason, str) and reason:
            return reason
        current = current.__cause__ or current.__context__
    return "certificate verify failed"


def tls_error(ep: Endpoint, exc: BaseException, thumbprint: str | None = None) -> CloudTlsError:
    """The error for a failed certificate check, naming the trust used and the cert."""
    reason = _verify_reason(exc)
    presented = (
        f"; the server presented a certificate with SHA-256 thumbprint {thumbprint}: check it "
        "out of band, then pin it (tls_fingerprint) or supply its CA (ca_bundle)"
        if thumbprint
        else ""
    )
    return CloudTlsError(
        ep.scrub(
            f"TLS certificate of {ep.where} is not trusted by {ep.trust} ({reason}){presented}"
        ),
        thumbprint=thumbprint,
    )


def _http_status(ep: Endpoint, action: str, exc: httpx.HTTPStatusError) -> AppError:
    code = exc.response.status_code
    text = f"{action}: {ep.where} answered HTTP {code} {exc.response.reason_phrase}"
    if code in (401, 403):
        return CloudAuthError(ep.scrub(f"{text} (user {ep.username!r} not allowed)"))
    if code == 404:
        return NotFound(ep.scrub(f"{text} (the transfer lease has ended or the file is gone)"))
    if code in (408, 429) or code >= 500:
        return CloudUnavailable(ep.scrub(text))
    return CloudError(ep.scrub(text))


def translate(ep: Endpoint, action: str, exc: BaseException) -> AppError:
    """The :class:`AppError` for ``exc`` raised while doing ``action`` against ``ep``."""
    where = ep.where
    if isinstance(exc, vim.fault.InvalidLogin):
        return CloudAuthError(f"authentication failed for user {ep.username!r} on {where}")
    if isinstance(exc, vim.fault.NoPermission) and not isinstance(
        exc, vim.fault.NotAuthenticated
    ):
        privilege = getattr(exc, "privilegeId", None) or "a privilege"
        return CloudAuthError(
            ep.scrub(f"{action}: user {ep.username!r} lacks {privilege} on {where}")
        )
    if is_verification_failure(exc):
        return tls_error(ep, exc)
    detail = ep.scrub(fault_text(exc))
    if isinstance(exc, _NOT_FOUND_FAULTS):
        return NotFound(f"{action}: not found on {where}: {detail}")
    if isinstance(exc, _STATE_FAULTS):
        return CloudStateError(f"{action} refused by {where}: {detail}")
    if isinstance(exc, (*_RETRYABLE_FAULTS, vim.fault.HostConnectFault)):
        return CloudUnavailable(f"{action}: {where} unavailable: {detail}")
    if isinstance(exc, vmodl.MethodFault):
        return CloudError(f"{action} failed on {where}: {detail}")
    if isinstance(exc, httpx.HTTPStatusError):
        return _http_status(ep, action, exc)
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return CloudUnavailable(f"{action}: {where}: {type(exc).__name__}: {detail}")
    if isinstance(exc, httpx.HTTPError):
        return CloudError(f"{action}: {where}: {type(exc).__name__}: {detail}")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return CloudUnavailable(f"{action}: {where}: TLS connection closed: {detail}")
    if isinstance(exc, ssl.SSLError):
        return CloudError(f"{action}: TLS handshake with {where} failed: {detail}")
    if isinstance(exc, OSError | http.client.HTTPException | EOFError):
        return CloudUnavailable(f"{action}: cannot reach {where}: {type(exc).__name__}: {detail}")
    return CloudError(f"{action} failed on {where}: {type(exc).__name__}: {detail}")


@contextmanager
def map_exceptions(ep: Endpoint, action: str) -> Iterator[None]:
    """Translate anything but ``AppError``/cancellation raised inside into an ``AppError``.

    Works around ``await`` too: it only inspects what propagates out of the block.
    """
    try:
        yield
    except AppError:
        raise
    except Exception as exc:
        error = translate(ep, action, exc)
        if isinstance(error, CloudAuthError):
            raise error from None
        raise error from exc


def raise_fault(ep: Endpoint, action: str, fault: object) -> NoReturn:
    """Raise a task's ``info.error`` (a fault object, or something odd) translated."""
    if isinstance(fault, AppError):
        raise fault
    if isinstance(fault, BaseException):
        error = translate(ep, action, fault)
        raise error from (None if isinstance(error, CloudAuthError) else fault)
    raise CloudError(ep.scrub(f"{action} failed on {ep.where}: {fault}"))
