"""TLS trust for driver connections: CA bundle, pinned certificate, or (explicitly) none.

Every cloud kind with HTTPS endpoints has the same three settings
(:class:`~app.models.schemas.clouds.TlsOptions`): ``verify_tls``, ``ca_bundle`` and
``tls_fingerprint``. :func:`client_context` turns them into one ``ssl.SSLContext`` used
for the SDK session *and* for the disk transfers, so both are trusted the same way:

* ``tls_fingerprint`` set: the server's certificate must have exactly this SHA-256.
  The certificate is fetched once, compared, and then made the *only* trust anchor of
  the context (``VERIFY_X509_PARTIAL_CHAIN``, no host name check). Every later
  handshake is then verified by OpenSSL against that one certificate, so a different
  certificate presented later fails like any untrusted one (no check-then-use gap).
  Self-signed ESXi certificates are the usual case. A pin replaces the CA check.
* ``ca_bundle`` set: only these CAs are trusted (not the system store); host names are
  checked.
* neither: the system CA store, host names checked.
* ``verify_tls`` false: no verification at all. Only by explicit choice; logged.

On a verification failure the caller reads the presented certificate's SHA-256 with
:func:`presented_thumbprint` and puts it in the error, so the user can compare it out
of band and pin it.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass

from app.drivers.base import CloudTlsError

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 15.0


def normalise_fingerprint(value: str) -> str:
    """Lower-case hex without separators (accepts ``AB:CD:..`` and ``abcd..``)."""
    return value.replace(":", "").strip().lower()


def colon_hex(hex_digest: str) -> str:
    """vSphere's thumbprint notation: upper-case hex pairs joined by colons."""
    h = normalise_fingerprint(hex_digest).upper()
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """The TLS part of a cloud's settings, decoupled from the API schema."""

    verify: bool = True
    ca_bundle: str | None = None
    fingerprint: str | None = None  # SHA-256 (64 hex) or, from a lease, SHA-1 (40 hex)

    def describe(self) -> str:
        if not self.verify:
            return "TLS verification disabled"
        if self.fingerprint:
            return f"pinned certificate {colon_hex(self.fingerprint)}"
        if self.ca_bundle:
            return "the cloud's CA bundle"
        return "the system CA store"


def fetch_certificate(host: str, port: int, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The DER certificate ``host:port`` presents (unverified: only to compare it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, port), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise CloudTlsError(f"{host}:{port} presented no TLS certificate")
    return der


def presented_thumbprint(host: str, port: int, timeout: float = FETCH_TIMEOUT) -> str | None:
    """SHA-256 of the certificate ``host:port`` presents (colon hex), None if unreadable."""
    try:
        return colon_hex(hashlib.sha256(fetch_certificate(host, port, timeout)).hexdigest())
    except (OSError, CloudTlsError):
        return None


def _digest(der: bytes, hex_length: int) -> str:
    if hex_length == 40:
        return hashlib.sha1(der).hexdigest()  # noqa: S324 - vSphere lease thumbprints
    return hashlib.sha256(der).hexdigest()


def pinned_context(der: bytes) -> ssl.SSLContext:
    """A verifying context whose only trust anchor is this one certificate."""
    context = ssl.create_default_context(cadata=ssl.DER_cert_to_PEM_cert(der))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def client_context(
    policy: TlsPolicy, host: str, port: int, timeout: float = FETCH_TIMEOUT
) -> ssl.SSLContext:
    """The client context for ``host:port`` under ``policy`` (blocking when pinned).

    Raises ``CloudTlsError`` (pin mismatch, with the presented SHA-256) or ``OSError``
    (the pinned server could not be reached to read its certificate).
    """
    if not policy.verify:
        log.warning("TLS verification disabled for %s:%d by the cloud's settings", host, port)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if policy.fingerprint:
        want = normalise_fingerprint(policy.fingerprint)
        der = fetch_certificate(host, port, timeout)
        if _digest(der, len(want)) != want:
            raise CloudTlsError(
                f"the TLS certificate of {host}:{port} does not match the pinned "
                f"fingerprint {colon_hex(want)}; it presented "
                f"{colon_hex(hashlib.sha256(der).hexdigest())} (SHA-256)",
                thumbprint=colon_hex(hashlib.sha256(der).hexdigest()),
            )
        return pinned_context(der)
    if policy.ca_bundle:
        try:
            return ssl.create_default_context(cadata=policy.ca_bundle)
        except ssl.SSLError as exc:
            raise CloudTlsError(f"the cloud's ca_bundle cannot be used: {exc}") from None
    return ssl.create_default_context()
