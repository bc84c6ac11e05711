"""The VMware error table: vSphere faults, in front of the shared network/TLS/HTTP table.

================================================  ===================  =========
vSphere fault                                      becomes              retryable
================================================  ===================  =========
``InvalidLogin``                                   CloudAuthError       no
``NoPermission`` (not ``NotAuthenticated``)        CloudAuthError       no
``ManagedObjectNotFound``, ``NotFound``            NotFound             no
``InvalidState``/``InvalidPowerState``/duplicate   CloudStateError      no
``NotAuthenticated`` (session expired),            CloudUnavailable     yes
``HostCommunication``, ``HostConnectFault``,
``TaskInProgress``, ``Timedout``, ``SystemError``
any other vSphere fault                            CloudError           no
================================================  ===================  =========

Everything else (certificate verification, HTTP 401/403/404/408/429/5xx of the NFC
transfers, refused/reset connections, timeouts) is the shared table's
(:data:`app.errormap.NETWORK`). A fault wrapping a certificate failure (pyvmomi's
``HostConnectFault`` carrying OpenSSL's text) is a TLS error, so that rule comes first.
"""

from __future__ import annotations

from typing import Any, NoReturn

from pyVmomi import vim, vmodl

from app.drivers.base import CloudAuthError, CloudError, CloudStateError, CloudUnavailable
from app.drivers.kit.errors import CLOUD_NETWORK
from app.errormap import Boundary, ErrorRule, ErrorTable, is_verification_failure, untrusted
from app.errors import AppError, NotFound

_RETRYABLE_FAULTS: tuple[type[Any], ...] = (
    vim.fault.NotAuthenticated,
    vmodl.fault.HostCommunication,
    vim.fault.TaskInProgress,
    vim.fault.Timedout,
    vmodl.fault.SystemError,
    vmodl.fault.RequestCanceled,
    vim.fault.HostConnectFault,
)
_STATE_FAULTS: tuple[type[Any], ...] = (vim.fault.InvalidState, vim.fault.DuplicateName)
_NOT_FOUND_FAULTS: tuple[type[Any], ...] = (vmodl.fault.ManagedObjectNotFound, vim.fault.NotFound)


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


def _login(exc: BaseException, b: Boundary, action: str) -> AppError:
    return CloudAuthError(f"authentication failed for user {b.username!r} on {b.where}")


def _no_permission(exc: BaseException) -> bool:
    return isinstance(exc, vim.fault.NoPermission) and not isinstance(
        exc, vim.fault.NotAuthenticated)


def _privilege(exc: BaseException, b: Boundary, action: str) -> AppError:
    privilege = getattr(exc, "privilegeId", None) or "a privilege"
    return CloudAuthError(b.scrub(f"{action}: user {b.username!r} lacks {privilege} on {b.where}"))


def _fault(cls: type[AppError], template: str) -> Any:
    def build(exc: BaseException, b: Boundary, action: str) -> AppError:
        return cls(template.format(action=action, where=b.where, detail=b.scrub(fault_text(exc))))
    return build


#: The VMware table: its fault rules in front of the shared network table.
VMWARE: ErrorTable = CLOUD_NETWORK.extend([
    ErrorRule(vim.fault.InvalidLogin, _login, hide_cause=True),
    ErrorRule(_no_permission, _privilege, hide_cause=True),
    ErrorRule(is_verification_failure, lambda exc, b, action: untrusted(b, exc)),
    ErrorRule(_NOT_FOUND_FAULTS, _fault(NotFound, "{action}: not found on {where}: {detail}")),
    ErrorRule(_STATE_FAULTS, _fault(CloudStateError, "{action} refused by {where}: {detail}")),
    ErrorRule(_RETRYABLE_FAULTS,
              _fault(CloudUnavailable, "{action}: {where} unavailable: {detail}")),
    ErrorRule(vmodl.MethodFault, _fault(CloudError, "{action} failed on {where}: {detail}")),
])


def raise_fault(b: Boundary, action: str, fault: object) -> NoReturn:
    """Raise a task's ``info.error`` (a fault object, or something odd) translated."""
    if isinstance(fault, BaseException):
        VMWARE.raise_translated(fault, b, action)
    raise CloudError(b.scrub(f"{action} failed on {b.where}: {fault}"))
