"""pytest fixtures for real SSH test hosts (register with
``pytest_plugins = ["tests.infra.fixtures"]`` in tests/conftest.py).

* ``lvm_guest``: the LVM source host (a QEMU/TCG Debian 12 guest, see ``guest.py``), reset
  to a known ``vg0/data`` before each test. One guest boots per session
  (``lvm_guest_session``); the image is built once and cached (~1-2.5 min cold).
* ``ns_host`` / ``loopback_sshd`` / ``ns_host_factory``: OpenSSH sshd in a network namespace
  (or on 127.0.0.1) with a loop device as destination (see ``nshost.py``).
* ``ssh_client_key``: the session's client key pair (authorized on every host for root and
  the password user).

Missing prerequisites (root, qemu-system-x86, debootstrap, openssh-server, ...: see
scripts/bootstrap --dev) skip these tests locally and fail them under CI (``CI`` set).
``VMIGRATE_TEST_GUEST=0`` skips the guest on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import pytest

from tests.infra import InfraUnavailableError, SshKeyPair, generate_keypair
from tests.infra import guest as guest_mod
from tests.infra.guest import LvmGuest, cached_image, running_guest
from tests.infra.nshost import NsHost, check_prerequisites, start_ns_host

GUEST_FIXTURES = frozenset({"lvm_guest", "lvm_guest_session"})
COLD_BUILD_TIMEOUT = 900  # seconds, for the test that triggers the one-time image build

NsHostFactory = Callable[..., NsHost]


def _unavailable(message: str) -> NoReturn:
    """Skip (locally) or fail (under CI) when this machine cannot run a test host."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The first test that boots the guest may have to build its image first: give it a
    longer pytest-timeout than the suite's default (only when the cache is cold)."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    first = next((i for i in items if GUEST_FIXTURES & set(getattr(i, "fixturenames", ()))), None)
    if first is None or os.environ.get("VMIGRATE_TEST_GUEST") == "0":
        return
    try:
        cold = cached_image() is None
    except OSError:
        cold = True
    if cold:
        first.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT), append=False)


@pytest.fixture(scope="session")
def ssh_client_key(tmp_path_factory: pytest.TempPathFactory) -> SshKeyPair:
    """An ed25519 client key pair generated for this session (no passphrase)."""
    return generate_keypair(tmp_path_factory.mktemp("ssh-client") / "id_ed25519")


@pytest.fixture(scope="session")
def lvm_guest_session(
    ssh_client_key: SshKeyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LvmGuest]:
    """The session's LVM guest, booted once; tests should use ``lvm_guest`` instead."""
    if os.environ.get("VMIGRATE_TEST_GUEST") == "0":
        pytest.skip("VMIGRATE_TEST_GUEST=0")
    try:
        guest_mod.check_prerequisites()
    except InfraUnavailableError as e:
        _unavailable(f"LVM test guest: {e}")
    with running_guest(ssh_client_key, tmp_path_factory.mktemp("lvm-guest")) as guest:
        yield guest


@pytest.fixture
def lvm_guest(lvm_guest_session: LvmGuest) -> LvmGuest:
    """The LVM source host, with ``vg0`` holding only ``data`` (48 MiB ext4, known files,
    digest in ``lv_sha256``), free VG space for snapshots and the destination disk
    (``device``, /dev/vdc) zeroed. Shared by the session: see ``LvmGuest.reset_lv``."""
    guest = lvm_guest_session
    if not guest.alive():
        pytest.fail(f"the LVM test guest is gone; console:\n{guest.console_tail()}")
    guest.reset_lv()
    return guest


@pytest.fixture
def ns_host_factory(ssh_client_key: SshKeyPair) -> Iterator[NsHostFactory]:
    """``make(netns=True, device="loop", device_mib=256, backing="disk", hide=()) ->
    NsHost``: as many SSH hosts as a test needs; all are stopped at teardown."""
    try:
        check_prerequisites()
    except InfraUnavailableError as e:
        _unavailable(str(e))
    hosts: list[NsHost] = []

    def make(
        *,
        netns: bool = True,
        device: str = "loop",
        device_mib: int = 256,
        backing: str = "disk",
        hide: Sequence[str] = (),
    ) -> NsHost:
        host = start_ns_host(
            ssh_client_key,
            netns=netns,
            device=device,
            device_mib=device_mib,
            backing=backing,
            hide=hide,
        )
        hosts.append(host)
        return host

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for host in reversed(hosts):
            try:
                host.stop()
            except Exception as e:  # stop the others anyway
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def ns_host(ns_host_factory: NsHostFactory) -> NsHost:
    """sshd in a fresh network namespace (``host`` = its 10.231.x.y address, port 22), with
    a 256 MiB loop device as ``device``."""
    return ns_host_factory()


@pytest.fixture
def loopback_sshd(ns_host_factory: NsHostFactory) -> NsHost:
    """sshd on 127.0.0.1 (free port), no namespace, with a 256 MiB loop device."""
    return ns_host_factory(netns=False)
