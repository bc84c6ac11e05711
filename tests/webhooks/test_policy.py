"""The outbound target policy: https only, no non-public addresses unless allowed,
checked on what the host resolves to (a fake resolver stands in for DNS here)."""

from __future__ import annotations

import pytest

from app.webhooks.policy import TargetPolicy, TargetRefused, is_public


def resolving(*addresses: str) -> TargetPolicy:
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return TargetPolicy(resolver=resolver)


def policy(allow: list[str], allow_http: list[str], *addresses: str) -> TargetPolicy:
    async def resolver(host: str, port: int) -> list[str]:
        return list(addresses)

    return TargetPolicy(allow, allow_http, resolver)


async def test_public_https_target_is_pinned_to_the_checked_address() -> None:
    target = await resolving("93.184.216.34").check("https://hooks.example.com/in?x=1")
    assert target.address == "93.184.216.34"
    assert target.pinned_url == "https://93.184.216.34:443/in?x=1"
    assert target.host_header == "hooks.example.com"
    assert target.host == "hooks.example.com"


async def test_ipv6_target_and_explicit_port() -> None:
    target = await resolving("2606:2800:220:1::1").check("https://hooks.example.com:8443")
    assert target.pinned_url == "https://[2606:2800:220:1::1]:8443/"
    assert target.host_header == "hooks.example.com:8443"


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "::1",  # noqa: S104 - an address to refuse, not to bind
    "fe80::1", "fd00:ec2::254", "::ffff:127.0.0.1", "224.0.0.1",
    "100.100.100.200",
    "fec0::1", "feff:ffff::1",  # deprecated site-local fec0::/10 (was accepted)
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo whose client is 192.0.2.45
])
async def test_non_public_addresses_are_refused(address: str) -> None:
    with pytest.raises(TargetRefused) as caught:
        await resolving(address).check("https://hooks.example.com/")
    assert "non-public" in caught.value.message
    assert caught.value.extra["errors"][0]["pointer"] == "/url"


async def test_one_bad_address_among_good_ones_is_enough_to_refuse() -> None:
    with pytest.raises(TargetRefused):
        await resolving("93.184.216.34", "10.0.0.1").check("https://hooks.example.com/")


async def test_plain_http_needs_an_allowance() -> None:
    with pytest.raises(TargetRefused, match="https"):
        await resolving("93.184.216.34").check("http://hooks.example.com/")
    ok = await policy([], ["93.184.216.0/24"], "93.184.216.34").check("http://hooks.example.com/")
    assert ok.pinned_url == "http://93.184.216.34:80/"


async def test_allowlist_by_network_and_by_name() -> None:
    await policy(["127.0.0.0/8"], [], "127.0.0.1").check("https://localhost/")
    await policy(["receiver.internal"], [], "10.9.8.7").check("https://receiver.internal/")
    with pytest.raises(TargetRefused):
        await policy(["receiver.internal"], [], "10.9.8.7").check("https://other.internal/")


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/", "https"),
    ("https:///nohost", "no host"),
    ("https://user:pw@example.com/", "credentials"),
    ("https://example.com/#frag", "fragment"),
    ("https://example.com:99999/", "not a valid URL"),
    ("https://exa mple.com/", "spaces"),
])
async def test_malformed_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(TargetRefused, match=why):
        await resolving("93.184.216.34").check(url)


async def test_names_that_do_not_resolve_are_refused() -> None:
    async def fails(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(TargetRefused, match="does not resolve"):
        await TargetPolicy(resolver=fails).check("https://nowhere.invalid/")


async def test_the_system_resolver_is_used_by_default() -> None:
    with pytest.raises(TargetRefused, match="non-public"):
        await TargetPolicy().check("https://localhost/")
    await TargetPolicy(["127.0.0.1/32"], ["127.0.0.1/32"]).check("http://localhost:9/")


def test_is_public() -> None:
    import ipaddress

    assert is_public(ipaddress.ip_address("8.8.8.8"))
    assert not is_public(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not is_public(ipaddress.ip_address("2002:7f00:1::"))  # 6to4 of 127.0.0.1
    assert not is_public(ipaddress.ip_address("fec0::1"))
    assert is_public(ipaddress.ip_address("2606:4700:4700::1111"))
    assert is_public(ipaddress.ip_address("64:ff9b::808:808"))  # NAT64 of 8.8.8.8
