"""Where webhooks may point: the outbound target policy.

A target must be ``https`` and every address its host resolves to must be public:
not loopback, private, link-local (cloud metadata lives there), carrier-grade NAT,
multicast, reserved or unspecified. Settings may allow hosts or networks anyway
(``webhook_allow_hosts``) and allow plain ``http`` for some (``webhook_allow_http_hosts``).

The check runs when a webhook is registered and again before every delivery attempt,
since DNS answers change (DNS rebinding). The dispatcher then connects to the very
address it checked, never to a fresh resolution.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from app.config import Settings
from app.errors import InvalidInput
from app.models.schemas.fields import embedded_ipv4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: host, port -> the addresses it resolves to (strings).
Resolver = Callable[[str, int], Awaitable[list[str]]]

_RESOLVE_TIMEOUT = 5.0


class TargetRefused(InvalidInput):
    """The URL is malformed, not https, or resolves to an address that is not allowed."""

    code = "webhook-target-refused"
    title = "Webhook target refused"

    def __init__(self, message: str) -> None:
        super().__init__(message, extra={"errors": [{"pointer": "/url", "detail": message}]})


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, via the system resolver (getaddrinfo)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True, slots=True)
class Target:
    """A URL that passed the policy, pinned to the address it was checked against."""

    url: str
    scheme: str
    host: str
    port: int
    address: str
    #: Path and query, as sent in the request line.
    target: str

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host name."""
        addr = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{addr}:{self.port}{self.target}"


def _networks(entries: Iterable[str]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    names, nets = set(), []
    for entry in entries:
        value = entry.strip().lower()
        if not value:
            continue
        try:
            nets.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            names.add(value.rstrip("."))
    return frozenset(names), tuple(nets)


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast; IPv6 that embeds an IPv4 address is judged as that
    IPv4 address; the deprecated IPv6 site-local range (``fec0::/10``) is not public."""
    if isinstance(address, ipaddress.IPv6Address):
        mapped = embedded_ipv4(address)
        if mapped is not None:
            return is_public(mapped)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
        or address.is_loopback or address.is_link_local or address.is_private
    )


class TargetPolicy:
    def __init__(self, allow: Sequence[str] = (), allow_http: Sequence[str] = (),
                 resolver: Resolver | None = None) -> None:
        self._allow_names, self._allow_nets = _networks(allow)
        self._http_names, self._http_nets = _networks(allow_http)
        self.resolver: Resolver = resolver or system_resolver

    @classmethod
    def from_settings(cls, settings: Settings, resolver: Resolver | None = None) -> TargetPolicy:
        return cls(settings.webhook_allow_hosts, settings.webhook_allow_http_hosts, resolver)

    def parse(self, url: str) -> SplitResult:
        """Syntax only: an absolute http(s) URL with a host, no credentials or fragment."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise TargetRefused(f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https"):
            raise TargetRefused("the URL must start with https://")
        if not parts.hostname:
            raise TargetRefused("the URL has no host")
        if parts.username is not None or parts.password is not None:
            raise TargetRefused("the URL must not carry credentials; verify signatures instead")
        if parts.fragment or "#" in url:
            raise TargetRefused("the URL must not have a fragment")
        if any(c.isspace() or ord(c) < 0x21 for c in url):
            raise TargetRefused("the URL must not contain spaces or control characters")
        if port == 0:
            raise TargetRefused("the URL's port must be 1-65535")
        return parts

    async def check(self, url: str) -> Target:
        """Parse, resolve and check ``url``; the result names the address to connect to.

        Raises :class:`TargetRefused` (a 422 at registration; a failed attempt at
        delivery time).
        """
        parts = self.parse(url)
        host = (parts.hostname or "").rstrip(".").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(_RESOLVE_TIMEOUT):
                resolved = await self.resolver(host, port)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise TargetRefused(f"the host {host!r} does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolved]
        if not addresses:
            raise TargetRefused(f"the host {host!r} does not resolve")
        for address in addresses:
            if not self._allowed(host, address, self._allow_names, self._allow_nets) \
                    and not is_public(address):
                raise TargetRefused(
                    f"the host {host!r} resolves to {address}, a loopback, private, "
                    "link-local or otherwise non-public address; the service does not "
                    "allow it as a webhook target")
        if parts.scheme == "http" and not all(
            self._allowed(host, a, self._http_names, self._http_nets) for a in addresses
        ):
            raise TargetRefused("the URL must use https")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return Target(url, parts.scheme, host, port, str(addresses[0]), target)

    @staticmethod
    def _allowed(host: str, address: IPAddress, names: frozenset[str],
                 nets: tuple[IPNetwork, ...]) -> bool:
        return host in names or any(address in net for net in nets)
