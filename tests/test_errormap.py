"""The table-driven exception mapping shared by drivers, storage and transports."""

from __future__ import annotations

import socket
import ssl

import httpx
import pytest

from app.errormap import NETWORK, Boundary, ErrorFamily, ErrorRule, Scrubber
from app.errors import AppError, NotFound, TransientError


class Failed(AppError):
    status = 502


class Down(TransientError):
    pass


class Denied(Failed):
    pass


class Untrusted(Failed):
    pass


FAMILY = ErrorFamily(failed=Failed, unavailable=Down, auth=Denied, untrusted=Untrusted)
SECRET = "s3cr3t-Value-42"
B = Boundary(where="api.example:443", family=FAMILY, scrub=Scrubber([SECRET]),
             username="svc", trust="the cloud's CA bundle")


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "https://api.example/x")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(code,
                                                                               request=request))


def _verify_failure() -> BaseException:
    outer = httpx.ConnectError("handshake failed")
    inner = ssl.SSLCertVerificationError("certificate verify failed")
    inner.verify_message = "unable to get local issuer certificate"
    outer.__cause__ = inner
    return outer


@pytest.mark.parametrize(("exc", "kind"), [
    (_status(401), Denied), (_status(403), Denied), (_status(404), NotFound),
    (_status(408), Down), (_status(429), Down), (_status(502), Down), (_status(400), Failed),
    (httpx.ReadTimeout("slow"), Down), (httpx.ConnectError("refused"), Down),
    (_verify_failure(), Untrusted), (ssl.SSLEOFError(), Down), (ssl.SSLError("bad"), Failed),
    (ConnectionRefusedError(111, "Connection refused"), Down),
    (ConnectionResetError(104, "Connection reset by peer"), Down),
    (TimeoutError("timed out"), Down),
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure"), Down),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Failed),
    (EOFError(), Down), (ValueError("odd"), Failed),
])
def test_the_shared_network_table(exc: BaseException, kind: type[AppError]) -> None:
    error = NETWORK.translate(exc, B, "read the disk")
    assert type(error) is kind
    assert error.retryable is issubclass(kind, TransientError)


def test_tls_failures_name_the_trust_and_the_reason() -> None:
    error = NETWORK.translate(_verify_failure(), B, "connect")
    assert str(error) == ("TLS certificate of api.example:443 is not trusted by the cloud's "
                          "CA bundle (unable to get local issuer certificate)")


def test_platform_tables_extend_the_shared_one() -> None:
    class QuotaExceeded(Exception):
        pass

    table = NETWORK.extend([
        ErrorRule(QuotaExceeded, lambda exc, b, action: Failed(f"{action}: quota on {b.where}")),
        ErrorRule(TimeoutError, lambda exc, b, action: Failed("a platform's own view")),
    ])
    assert str(table.translate(QuotaExceeded(), B, "create")) == "create: quota on api.example:443"
    assert str(table.translate(TimeoutError(), B, "x")) == "a platform's own view"  # in front
    assert type(table.translate(_status(503), B, "x")) is Down  # the shared rules still apply
    assert len(NETWORK.rules) == len(table.rules) - 2  # the shared table is unchanged


def test_secrets_are_scrubbed_and_auth_failures_drop_their_cause() -> None:
    with pytest.raises(Failed) as info, NETWORK.mapping(B, "upload"):
        raise ValueError(f"server said: token={SECRET} rejected")
    assert SECRET not in str(info.value)
    assert "token=*** rejected" in str(info.value)
    assert info.value.__cause__ is not None  # a non-auth error keeps its chain for debugging
    with pytest.raises(Denied) as auth, NETWORK.mapping(B, "log in"):
        raise _status(401)
    assert str(auth.value) == (
        "log in: api.example:443 answered HTTP 401 Unauthorized (user 'svc' not allowed)")
    assert auth.value.__cause__ is None
    assert auth.value.__suppress_context__


def test_app_errors_pass_and_passthrough_tables_leave_the_unknown_alone() -> None:
    mine = NotFound("no such thing")
    with pytest.raises(NotFound) as info, NETWORK.mapping(B, "x"):
        raise mine
    assert info.value is mine
    strict = NETWORK.extend([], passthrough=True)
    with pytest.raises(KeyError), strict.mapping(B, "x"):
        raise KeyError("a bug, not a network failure")
    with pytest.raises(Down), strict.mapping(B, "x"):
        raise ConnectionResetError(104, "reset")


def test_the_scrubber() -> None:
    scrub = Scrubber(["abc", "", "abcdef"]).with_secrets("xyz")
    assert scrub("abcdef abc xyz ab") == "*** *** *** ab"  # the longer secret masked whole
    assert "abc" not in repr(scrub)


def _wrapped_resolution_failure(errno: int, reason: str) -> httpx.ConnectError:
    """What httpx raises when the host does not resolve: a ConnectError caused (through
    httpcore's) by the resolver's gaierror, its text the gaierror's."""
    try:
        try:
            raise socket.gaierror(errno, reason)
        except socket.gaierror as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as outer:
        return outer


@pytest.mark.parametrize(("exc", "kind"), [
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), Failed),
    (_wrapped_resolution_failure(socket.EAI_NONAME, "Name or service not known"), Failed),
    (_wrapped_resolution_failure(socket.EAI_AGAIN, "Temporary failure in name resolution"),
     Down),
])
def test_a_host_that_does_not_resolve_reads_the_same_from_any_library(
    exc: BaseException, kind: type[AppError]
) -> None:
    error = NETWORK.translate(exc, B, "connect")
    assert type(error) is kind
    assert str(error).startswith("connect: cannot resolve the host of api.example:443: ")
    assert "gaierror" not in str(error)
    assert "ConnectError" not in str(error)
    assert "Errno" not in str(error)
