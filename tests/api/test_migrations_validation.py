"""Bad input of every kind is a 4xx problem document naming the field, never a 500."""

from __future__ import annotations

import base64
import copy
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from app.models.schemas import fields
from tests.api.migrations_support import (
    FINGERPRINT,
    PUBLIC_KEY,
    assert_problem,
    hypervisor,
    image_extract,
    live_stream,
)
from tests.conftest import TokenFactory, auth

URL = "/v1/migrations"
CLOUD = str(uuid.uuid4())  # schema errors are found before any cloud is looked up
Body = dict[str, Any]


@pytest.fixture
async def headers(make_token: TokenFactory) -> dict[str, str]:
    return auth(await make_token("acme", "migrations:write"))


def put(path: str, value: Any) -> Callable[[Body], None]:
    """A mutation setting ``a/b/c`` (or deleting it when value is ``DELETE``)."""

    def mutate(body: Body) -> None:
        *parents, last = path.split("/")
        node = body
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


DELETE = object()
ED25519_BLOB = PUBLIC_KEY.split()[1]

H = hypervisor(CLOUD)
IE = image_extract(CLOUD)
LS = live_stream(CLOUD)

CASES: list[tuple[str, Body, Callable[[Body], None], str]] = [
    # discriminator and top level
    ("type-missing", H, put("type", DELETE), "/type"),
    ("type-unknown", H, put("type", "teleport"), "/type"),
    ("type-not-string", H, put("type", 5), "/type"),
    ("name-missing", H, put("name", DELETE), "/name"),
    ("name-too-long", H, put("name", "x" * 129), "/name"),
    ("name-control-chars", H, put("name", "a\nb"), "/name"),
    ("name-not-string", H, put("name", 5), "/name"),
    ("unknown-field", H, put("colour", "red"), "/colour"),
    ("unknown-nested-field", H, put("source/passwd", "x"), "/source/passwd"),
    ("run-string", H, put("run", "true"), "/run"),
    ("run-int", H, put("run", 1), "/run"),
    ("mode-unknown", H, put("mode", "copy"), "/mode"),
    ("platform-unknown", H, put("platform", "solaris"), "/platform"),
    ("format-unknown", H, put("format", "vhdx"), "/format"),
    ("options-unknown", H, put("options/turbo", True), "/options/turbo"),
    ("throttle-too-small", H, put("options/throttle_bytes_per_second", 10),
     "/options/throttle_bytes_per_second"),
    ("throttle-string", H, put("options/throttle_bytes_per_second", "1000000"),
     "/options/throttle_bytes_per_second"),
    ("verify-string", H, put("options/verify", "yes"), "/options/verify"),
    # mode-dependent fields (checked by the service, each at its own pointer)
    ("new-without-destination", H, put("mode", "new"), "/destination"),
    ("store-with-destination", H, put("destination", {"cloud_id": CLOUD}), "/destination"),
    ("destination-unknown-field", H, put("destination", {"cloud_id": CLOUD, "x": 1}),
     "/destination/x"),
    # ports
    ("port-string", H, put("source/port", "443"), "/source/port"),
    ("port-bool", H, put("source/port", True), "/source/port"),
    ("port-float", H, put("source/port", 22.5), "/source/port"),
    ("port-zero", H, put("source/port", 0), "/source/port"),
    ("port-too-big", H, put("source/port", 65536), "/source/port"),
    ("port-negative", H, put("source/port", -1), "/source/port"),
    # hosts
    ("host-scheme", H, put("source/host", "https://esx1.example.com"), "/source/host"),
    ("host-port", H, put("source/host", "esx1.example.com:443"), "/source/host"),
    ("host-bad-ipv4", H, put("source/host", "999.1.1.1"), "/source/host"),
    ("host-underscore", H, put("source/host", "bad_host.example.com"), "/source/host"),
    ("host-shell", H, put("source/host", "esx1;reboot"), "/source/host"),
    ("host-space", H, put("source/host", "esx1 example"), "/source/host"),
    ("host-zone-id", H, put("source/host", "fe80::1%eth0"), "/source/host"),
    ("host-too-long", H, put("source/host", ("a" * 60 + ".") * 5 + "com"), "/source/host"),
    ("host-empty-label", H, put("source/host", "esx1..example.com"), "/source/host"),
    ("host-not-string", H, put("source/host", 10), "/source/host"),
    # ids and references
    ("cloud-id-not-uuid", H, put("source/cloud_id", "abc"), "/source/cloud_id"),
    ("cloud-id-int", H, put("source/cloud_id", 5), "/source/cloud_id"),
    ("cloud-id-missing", H, put("source/cloud_id", DELETE), "/source/cloud_id"),
    ("server-both", H, put("source/server", {"id": "vm-1", "name": "web"}), "/source/server"),
    ("server-neither", H, put("source/server", {}), "/source/server"),
    ("server-id-traversal", H, put("source/server", {"id": "vm/../../admin"}),
     "/source/server/id"),
    ("server-id-shell", H, put("source/server", {"id": "vm-1;id"}), "/source/server/id"),
    ("server-name-too-long", H, put("source/server", {"name": "n" * 256}),
     "/source/server/name"),
    ("username-space", H, put("source/username", "ad min"), "/source/username"),
    ("password-too-long", H, put("source/password", "x" * 257), "/source/password"),
    ("password-empty", H, put("source/password", ""), "/source/password"),
    ("password-number", H, put("source/password", 12345), "/source/password"),
    # image extract
    ("ie-platform-linux", IE, put("platform", "linux"), "/platform"),
    ("ie-no-password", IE, put("source/password", DELETE), "/source/password"),
    ("ie-winrm-port-string", IE, put("source/port", "5986"), "/source/port"),
    ("ie-user-space", IE, put("source/username", "svc migrate"), "/source/username"),
    ("ie-path-relative", IE, put("source/snapshot_path", "staging\\images"),
     "/source/snapshot_path"),
    ("ie-path-unix", IE, put("source/snapshot_path", "/tmp/staging"), "/source/snapshot_path"),
    ("ie-path-traversal", IE, put("source/snapshot_path", "D:\\staging\\..\\Windows"),
     "/source/snapshot_path"),
    ("ie-path-pipe", IE, put("source/snapshot_path", "D:\\a|calc"), "/source/snapshot_path"),
    ("ie-path-semicolon", IE, put("source/snapshot_path", "D:\\staging;calc.exe"),
     "/source/snapshot_path"),
    ("ie-path-subexpression", IE, put("source/snapshot_path", "\\\\nas\\share\\$(calc)"),
     "/source/snapshot_path"),
    ("ie-path-bad-unc-host", IE, put("source/snapshot_path", "\\\\na s\\share"),
     "/source/snapshot_path"),
    ("ie-path-too-long", IE, put("source/snapshot_path", "D:\\" + "a\\" * 130),
     "/source/snapshot_path"),
    ("ie-new-server-by-id", IE, put("source/existing", False), "/source"),
    ("ie-destination-kind", IE, put("destination", {"kind": "ftp"}), "/destination/kind"),
    ("ie-destination-no-kind", IE, put("destination", {}), "/destination/kind"),
    ("ie-destination-no-cloud", IE, put("destination", {"kind": "cloud"}),
     "/destination/cloud_id"),
    # live stream
    ("ls-platform-windows", LS, put("platform", "windows"), "/platform"),
    ("ls-device-not-lv", LS, put("source/device", "/dev/sda"), "/source/device"),
    ("ls-device-semicolon", LS, put("source/device", "/dev/vg0/root;rm -rf /"),
     "/source/device"),
    ("ls-device-subshell", LS, put("source/device", "/dev/vg0/$(reboot)"), "/source/device"),
    ("ls-device-backtick", LS, put("source/device", "/dev/vg0/`id`"), "/source/device"),
    ("ls-device-ampersand", LS, put("source/device", "/dev/vg0/root&&id"), "/source/device"),
    ("ls-device-pipe", LS, put("source/device", "/dev/vg0/root|nc"), "/source/device"),
    ("ls-device-newline", LS, put("source/device", "/dev/vg0/root\n"), "/source/device"),
    ("ls-device-space", LS, put("source/device", "/dev/vg0/ro ot"), "/source/device"),
    ("ls-device-traversal", LS, put("source/device", "/dev/../etc/shadow"), "/source/device"),
    ("ls-device-dot-dot-lv", LS, put("source/device", "/dev/vg0/.."), "/source/device"),
    ("ls-device-relative", LS, put("source/device", "vg0/root"), "/source/device"),
    ("ls-device-too-long", LS, put("source/device", "/dev/vg0/" + "r" * 300),
     "/source/device"),
    ("ls-user-shell", LS, put("source/username", "root;id"), "/source/username"),
    ("ls-no-credentials", LS, lambda b: b.update(source={
        k: v for k, v in b["source"].items() if k not in ("password", "private_key")}),
     "/source"),
    ("ls-bad-private-key", LS, put("source/private_key", "not a key"), "/source/private_key"),
    ("ls-bad-public-key-base64", LS, put("source/public_key", "ssh-ed25519 AAAA!!!!"),
     "/source/public_key"),
    ("ls-public-key-type-mismatch", LS, put("source/public_key", f"ssh-rsa {ED25519_BLOB}"),
     "/source/public_key"),
    ("ls-public-key-garbage-blob", LS, put(
        "source/public_key", "ssh-ed25519 " + base64.b64encode(b"\xff" * 40).decode()),
     "/source/public_key"),
    ("ls-fingerprint-md5", LS, put("source/host_key_fingerprint", "MD5:aa:bb:cc"),
     "/source/host_key_fingerprint"),
    ("ls-dest-no-kind", LS, put("destination/kind", DELETE), "/destination/kind"),
    ("ls-dest-device-metachar", LS, put("destination/device", "/dev/sdb && reboot"),
     "/destination/device"),
    ("ls-dest-device-file", LS, put("destination/device", "/etc/passwd"),
     "/destination/device"),
    ("ls-dest-no-credentials", LS, put("destination/password", DELETE), "/destination"),
    ("ls-dest-port", LS, put("destination/port", 70000), "/destination/port"),
    ("ls-new-without-plan", LS, put("destination", {"kind": "new", "cloud_id": CLOUD}),
     "/destination/plan"),
    ("ls-new-with-host", LS, put("destination", {"kind": "new", "cloud_id": CLOUD,
                                                 "plan": "small", "host": "x"}),
     "/destination/host"),
]


@pytest.mark.parametrize(("base", "mutate", "pointer"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
async def test_bad_body_is_a_422_at_the_pointer(
    client: httpx.AsyncClient, headers: dict[str, str], base: Body,
    mutate: Callable[[Body], None], pointer: str,
) -> None:
    body = copy.deepcopy(base)
    mutate(body)
    r = await client.post(URL, json=body, headers=headers)
    assert_problem(r, 422, pointer)


@pytest.mark.parametrize(
    "raw", [b"[]", b"null", b'"hypervisor"', b"{", b'{"type": "hypervisor",}', b"\xff\xfe"],
    ids=["array", "null", "string", "truncated", "trailing-comma", "not-utf8"],
)
async def test_body_that_is_not_an_object(client: httpx.AsyncClient, headers: dict[str, str],
                                          raw: bytes) -> None:
    r = await client.post(URL, content=raw,
                          headers={**headers, "content-type": "application/json"})
    assert_problem(r, 422)


async def test_oversize_body_is_413(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    body = copy.deepcopy(LS)
    body["source"]["public_key"] = PUBLIC_KEY + "x" * 100_000
    r = await client.post(URL, json=body, headers=headers)
    assert_problem(r, 413)


def _cursor(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("path", "params", "pointer"),
    [
        (f"{URL}/not-a-uuid", {}, "/migration_id"),
        (f"{URL}/not-a-uuid/events", {}, "/migration_id"),
        (f"{URL}/{uuid.uuid4()}/events", {"after": -1}, "/after"),
        (f"{URL}/{uuid.uuid4()}/events", {"after": "x"}, "/after"),
        (f"{URL}/{uuid.uuid4()}/events", {"limit": 0}, "/limit"),
        (URL, {"limit": 0}, "/limit"),
        (URL, {"limit": 201}, "/limit"),
        (URL, {"limit": "ten"}, "/limit"),
        (URL, {"status": "sleeping"}, "/status/0"),
        (URL, {"type": "teleport"}, "/type/0"),
        (URL, {"cursor": "!!!"}, "/cursor"),
        (URL, {"cursor": "x" * 600}, "/cursor"),
        (URL, {"cursor": _cursor({"a": 1})}, "/cursor"),
        (URL, {"cursor": _cursor(["2026-01-01T00:00:00+00:00", "not-a-uuid"])}, "/cursor"),
        (URL, {"cursor": _cursor(["2026-01-01T00:00:00", str(uuid.uuid4())])}, "/cursor"),
        (URL, {"cursor": _cursor(["yesterday", str(uuid.uuid4())])}, "/cursor"),
        (URL, {"cursor": _cursor([1, 2])}, "/cursor"),
    ],
)
async def test_bad_path_and_query(client: httpx.AsyncClient, headers: dict[str, str], path: str,
                                  params: dict[str, Any], pointer: str) -> None:
    assert_problem(await client.get(path, params=params, headers=headers), 422, pointer)


@pytest.mark.parametrize("method", ["post-run", "post-cancel", "delete"])
async def test_malformed_id_on_actions(client: httpx.AsyncClient, headers: dict[str, str],
                                       method: str) -> None:
    if method == "delete":
        r = await client.delete(f"{URL}/123", headers=headers)
    else:
        r = await client.post(f"{URL}/123/{method.removeprefix('post-')}", headers=headers)
    assert_problem(r, 422, "/migration_id")


GOOD: list[tuple[Any, str, str]] = [
    (fields.Host, "esx1.example.com", "esx1.example.com"),
    (fields.Host, "ESX1.Example.COM", "esx1.example.com"),
    (fields.Host, "localhost", "localhost"),
    (fields.Host, "10.0.0.1", "10.0.0.1"),
    (fields.Host, "2001:0db8:0000::1", "2001:db8::1"),
    (fields.WindowsPath, "D:\\", "D:\\"),
    (fields.WindowsPath, "D:\\staging\\", "D:\\staging\\"),
    (fields.WindowsPath, "\\\\nas01\\staging$", "\\\\nas01\\staging$"),
    (fields.WindowsPath, "\\\\10.0.0.5\\share\\dir one\\v2.1",
     "\\\\10.0.0.5\\share\\dir one\\v2.1"),
    (fields.LvDevice, "/dev/vg0/root", "/dev/vg0/root"),
    (fields.LvDevice, "/dev/mapper/vg0-root", "/dev/mapper/vg0-root"),
    (fields.LvDevice, "/dev/vg_data/lv.home+1", "/dev/vg_data/lv.home+1"),
    (fields.BlockDevice, "/dev/sdb", "/dev/sdb"),
    (fields.BlockDevice, "/dev/vda2", "/dev/vda2"),
    (fields.BlockDevice, "/dev/nvme0n1p2", "/dev/nvme0n1p2"),
    (fields.BlockDevice, "/dev/md0", "/dev/md0"),
    (fields.BlockDevice, "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
     "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"),
    (fields.BlockDevice, "/dev/mapper/vg1-root", "/dev/mapper/vg1-root"),
    (fields.PosixUser, "_svc", "_svc"),
    (fields.PosixUser, "deploy.user", "deploy.user"),
    (fields.WindowsUser, "CORP\\svc-migrate", "CORP\\svc-migrate"),
    (fields.WindowsUser, ".\\Administrator", ".\\Administrator"),
    (fields.WindowsUser, "svc@corp.example.com", "svc@corp.example.com"),
    (fields.AccountName, "administrator@vsphere.local", "administrator@vsphere.local"),
    (fields.AccountName, "CORP\\admin", "CORP\\admin"),
    (fields.ServerId, "i-0abc123def", "i-0abc123def"),
    (fields.ServerId, "/subscriptions/1/resourceGroups/rg/providers/Microsoft.Compute/vm1",
     "/subscriptions/1/resourceGroups/rg/providers/Microsoft.Compute/vm1"),
    (fields.PublicKey, PUBLIC_KEY, PUBLIC_KEY),
    (fields.Fingerprint, FINGERPRINT, FINGERPRINT),
    (fields.Name, "  Web 01 → library  ", "Web 01 → library"),
]


@pytest.mark.parametrize(("kind", "value", "expected"), GOOD,
                         ids=[f"{i}-{g[1][:24]}" for i, g in enumerate(GOOD)])
def test_strict_types_accept_legitimate_values(kind: Any, value: str, expected: str) -> None:
    assert TypeAdapter(kind).validate_python(value) == expected
