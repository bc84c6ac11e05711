"""The drivers' error family on top of :mod:`app.errormap`.

:data:`CLOUD` says which :mod:`app.drivers.base` error each kind of failure becomes at
a driver boundary; :data:`CLOUD_NETWORK` is the shared network/TLS/HTTP table that a
platform's own table extends (VMware: :data:`app.drivers.vmware.errors.VMWARE`).
"""

from __future__ import annotations

from app.drivers.base import CloudAuthError, CloudError, CloudTlsError, CloudUnavailable
from app.errormap import NETWORK, Boundary, ErrorFamily, ErrorTable, Scrubber

CLOUD = ErrorFamily(
    failed=CloudError, unavailable=CloudUnavailable, auth=CloudAuthError, untrusted=CloudTlsError,
)

#: The shared table as drivers use it (their family is chosen by the boundary).
CLOUD_NETWORK: ErrorTable = NETWORK


def cloud_boundary(where: str, *, username: str | None, trust: str,
                   secrets: tuple[str, ...] = ()) -> Boundary:
    """The boundary of one driver session: messages name ``where`` and the user."""
    return Boundary(where=where, family=CLOUD, scrub=Scrubber(secrets), username=username,
                    trust=trust)
