"""Table-driven translation of library exceptions into :class:`~app.errors.AppError`.

Every boundary where a library's exceptions enter the service (a platform SDK, the S3
client, asyncssh, httpx) translates them with the same mechanism: an
:class:`ErrorTable` of :class:`ErrorRule`\\ s, tried in order, the first match wins.
Tables extend one another: :data:`NETWORK` is the one shared table for what every
networked library raises (refused/reset connections, timeouts, DNS, TLS verification,
HTTP statuses from httpx), and a boundary puts its own rules in front of it
(``NETWORK.extend(...)``: the VMware faults table, the S3 table, the SSH table).

What a rule builds depends on the boundary: a lost connection is a retryable
``CloudUnavailable`` for a driver, an ``SshConnectionError`` for the SSH transport,
a ``StorageError`` for the library storage. A :class:`Boundary` therefore carries an
:class:`ErrorFamily` (which error class means "unavailable", "refused", "not found",
"not allowed", "not trusted") along with where it talks to and its :class:`Scrubber`.

Secrets never leave through an error: every message is scrubbed, and authentication
failures are raised ``from None`` (the library's text might echo a credential). This
module sits at the bottom (it imports only :mod:`app.errors`, ``httpx`` and the
standard library), so storage, transports and drivers all use it.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NoReturn

import httpx

from app.errors import AppError, NotFound

MASK = "***"


class Scrubber:
    """Removes secrets from text; the one scrubber every boundary uses.

    Immutable: :meth:`with_secrets` returns a new scrubber that also knows the
    secrets given (e.g. a session cookie learnt after log-in).
    """

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._secrets: tuple[str, ...] = tuple(
            sorted({s for s in secrets if s}, key=len, reverse=True)
        )

    def with_secrets(self, *secrets: str) -> Scrubber:
        return Scrubber((*self._secrets, *secrets))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def __repr__(self) -> str:  # never the secrets themselves
        return f"Scrubber({len(self._secrets)} secrets)"


@dataclass(frozen=True, slots=True)
class ErrorFamily:
    """Which error class each kind of failure becomes at one boundary."""

    failed: type[AppError]  # permanent: any other refusal
    unavailable: type[AppError]  # retryable: network, timeouts, 5xx
    auth: type[AppError]  # wrong credentials, not allowed
    untrusted: type[AppError]  # TLS certificate not trusted
    not_found: type[AppError] = NotFound


@dataclass(frozen=True, slots=True)
class Boundary:
    """Who is on the other side, for messages: ``where`` ("vCenter vc:443"), the user
    we act as, how TLS is trusted, and what must be scrubbed."""

    where: str
    family: ErrorFamily
    scrub: Scrubber = field(default_factory=Scrubber)
    username: str | None = None
    trust: str = "the system's CA store"

    def with_secrets(self, *secrets: str) -> Boundary:
        return replace(self, scrub=self.scrub.with_secrets(*secrets))


#: Builds the error for an exception a rule matched, while doing ``action``.
Build = Callable[[BaseException, Boundary, str], AppError]
Match = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """``match`` (exception classes, or a predicate) -> ``build``.

    ``hide_cause``: raise the error ``from None`` (authentication failures, and any
    library whose text may carry a secret).
    """

    match: Match
    build: Build
    hide_cause: bool = False

    def matches(self, exc: BaseException) -> bool:
        if isinstance(self.match, type | tuple):
            return isinstance(exc, self.match)
        return self.match(exc)


def _fallback(exc: BaseException, b: Boundary, action: str) -> AppError:
    return b.family.failed(
        b.scrub(f"{action} failed on {b.where}: {type(exc).__name__}: {exc}")
    )


class ErrorTable:
    """Ordered rules; :meth:`extend` puts more specific rules in front of these.

    ``fallback`` builds the error for an exception no rule matches (by default the
    family's permanent error naming the exception's type); ``None`` lets such an
    exception propagate unchanged (a boundary that translates only what it knows).
    """

    def __init__(self, rules: Sequence[ErrorRule], fallback: Build | None = _fallback) -> None:
        self.rules: tuple[ErrorRule, ...] = tuple(rules)
        self.fallback = fallback

    def extend(self, rules: Sequence[ErrorRule], *, passthrough: bool = False) -> ErrorTable:
        """These rules in front of this table's; ``passthrough``: unmatched exceptions
        propagate unchanged."""
        return ErrorTable((*rules, *self.rules), None if passthrough else self.fallback)

    def rule_for(self, exc: BaseException) -> ErrorRule | None:
        return next((r for r in self.rules if r.matches(exc)), None)

    def _build(self, exc: BaseException) -> Build | None:
        rule = self.rule_for(exc)
        return rule.build if rule is not None else self.fallback

    def translate(self, exc: BaseException, boundary: Boundary, action: str) -> AppError:
        """The error for ``exc`` (the family's permanent error when nothing matches)."""
        build = self._build(exc) or _fallback
        return build(exc, boundary, action)

    def raise_translated(self, exc: BaseException, boundary: Boundary, action: str) -> NoReturn:
        """Raise ``exc`` translated (an ``AppError``, or an exception no rule matches
        in a pass-through table, is raised as it is)."""
        if isinstance(exc, AppError):
            raise exc
        build = self._build(exc)
        if build is None:
            raise exc
        rule = self.rule_for(exc)
        error = build(exc, boundary, action)
        if (rule is not None and rule.hide_cause) or isinstance(error, boundary.family.auth):
            raise error from None
        raise error from exc

    @contextmanager
    def mapping(self, boundary: Boundary, action: str) -> Iterator[None]:
        """Translate anything but ``AppError``/cancellation raised inside the block.

        Works around ``await`` too: it only inspects what propagates out.
        """
        try:
            yield
        except AppError:
            raise
        except Exception as exc:
            self.raise_translated(exc, boundary, action)


# --- the shared network / TLS / HTTP table ------------------------------------------------


def is_verification_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a certificate verification failure.

    SDKs wrap the ``ssl`` error (pyvmomi in a fault carrying only its text, httpx in a
    ``ConnectError``), so both the chain and the text are checked.
    """
    for current in causes(exc):
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        text = f"{current} {getattr(current, 'msg', '')}"
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            return True
    return False


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def verify_reason(exc: BaseException) -> str:
    """OpenSSL's reason ("unable to get local issuer certificate"), found through wrappers."""
    for current in causes(exc):
        reason = getattr(current, "verify_message", None)
        if isinstance(reason, str) and reason:
            return reason
    return "certificate verify failed"


def untrusted(b: Boundary, exc: BaseException, thumbprint: str | None = None) -> AppError:
    """The error for a failed certificate check, naming the trust used (and the
    certificate's SHA-256 thumbprint when the caller could read it)."""
    presented = (
        f"; the server presented a certificate with SHA-256 thumbprint {thumbprint}: check it "
        "out of band, then pin it (tls_fingerprint) or supply its CA (ca_bundle)"
        if thumbprint else ""
    )
    message = b.scrub(
        f"TLS certificate of {b.where} is not trusted by {b.trust} ({verify_reason(exc)})"
        f"{presented}"
    )
    error = b.family.untrusted(message)
    if thumbprint:
        error.extra["thumbprint"] = thumbprint
    return error


def _http_status(exc: BaseException, b: Boundary, action: str) -> AppError:
    assert isinstance(exc, httpx.HTTPStatusError)
    code = exc.response.status_code
    text = f"{action}: {b.where} answered HTTP {code} {exc.response.reason_phrase}"
    if code in (401, 403):
        return b.family.auth(b.scrub(f"{text} (user {b.username!r} not allowed)"
                                     if b.username else f"{text} (not allowed)"))
    if code == 404:
        return b.family.not_found(b.scrub(f"{text} (not found)"))
    if code in (408, 429) or code >= 500:
        return b.family.unavailable(b.scrub(text))
    return b.family.failed(b.scrub(text))


def _detail(exc: BaseException, b: Boundary) -> str:
    return b.scrub(f"{type(exc).__name__}: {exc}")


def _unavailable(what: str) -> Build:
    def build(exc: BaseException, b: Boundary, action: str) -> AppError:
        return b.family.unavailable(f"{action}: {b.where}: {what}: {_detail(exc, b)}")
    return build


def _failed(what: str) -> Build:
    def build(exc: BaseException, b: Boundary, action: str) -> AppError:
        return b.family.failed(f"{action}: {b.where}: {what}: {_detail(exc, b)}")
    return build


def resolution_failure(exc: BaseException) -> socket.gaierror | None:
    """The name-resolution error behind ``exc``: itself, or what a library wrapped
    (httpx raises ``ConnectError`` from httpcore's, from the ``gaierror``)."""
    return next((c for c in causes(exc) if isinstance(c, socket.gaierror)), None)


def _resolve(exc: BaseException, b: Boundary, action: str) -> AppError:
    """One sentence whichever library failed to resolve: the host and the resolver's
    words (never the exception's type name or ``[Errno -2]``)."""
    found = resolution_failure(exc)
    assert found is not None
    reason = found.strerror or str(found)
    cls = b.family.unavailable if found.errno == socket.EAI_AGAIN else b.family.failed
    return cls(b.scrub(f"{action}: cannot resolve the host of {b.where}: {reason}"))


def _os_error(exc: BaseException, b: Boundary, action: str) -> AppError:
    assert isinstance(exc, OSError)
    reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
    return b.family.unavailable(
        b.scrub(f"{action}: cannot reach {b.where}: {type(exc).__name__}: {reason}")
    )


#: The shared table: what any networked library raises. Platform tables extend it.
NETWORK = ErrorTable([
    ErrorRule(is_verification_failure, lambda exc, b, action: untrusted(b, exc)),
    ErrorRule(httpx.HTTPStatusError, _http_status),
    ErrorRule(lambda exc: resolution_failure(exc) is not None, _resolve),
    ErrorRule((httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError),
              _unavailable("connection failed")),
    ErrorRule(httpx.HTTPError, _failed("HTTP request failed")),
    ErrorRule((ssl.SSLEOFError, ssl.SSLZeroReturnError), _unavailable("TLS connection closed")),
    ErrorRule(ssl.SSLError, _failed("TLS handshake failed")),
    ErrorRule(TimeoutError, _unavailable("timed out")),
    ErrorRule(OSError, _os_error),
    ErrorRule((http.client.HTTPException, EOFError), _unavailable("connection broken")),
])
