"""The registry: what is derived from the registered specs, and the helpers the engines
use (placement from destination fields, the wizard's source overrides)."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from app.drivers.base import Placement
from app.drivers.kit.connection import CloudConnection
from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.linux import LinuxSettings
from app.drivers.registry import (
    SPECS,
    NoDriver,
    destination_driver,
    kind_schemas,
    parse_placement,
    source_driver,
    spec_for,
    with_source_overrides,
)
from app.drivers.vmware.models import VspherePlacement, VsphereSettings
from app.errors import InvalidInput
from app.models.enums import CloudKind
from app.models.schemas.cloud_fields import PasswordCredentials, SshCredentials
from app.models.schemas.clouds import KindSchema

SECRET = "Wizard-Secret-31337"


def vsphere(kind: CloudKind = CloudKind.vmware) -> CloudConnection:
    return CloudConnection(
        id=uuid.uuid4(), kind=kind,
        settings=VsphereSettings(host="vc.example", datacenter="DC0"),
        credentials=PasswordCredentials(username="admin", password=SecretStr("pw")))


def test_every_kind_is_declared_once() -> None:
    kinds = [k.kind for k in kind_schemas()]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) == {CloudKind.vmware, CloudKind.esxi, CloudKind.linux}
    for spec in SPECS:
        for kind in spec.kind_names:
            assert spec_for(kind) is spec


def test_placement_is_the_destinations_own_model() -> None:
    placement = parse_placement(CloudKind.esxi, {"cluster": "C0", "datastore": None})
    assert placement == VspherePlacement(cluster="C0")
    with pytest.raises(InvalidInput) as info:
        parse_placement(CloudKind.vmware, {"flavor": "m1.large", "zone": "a", "host": "h"})
    assert [e["pointer"] for e in info.value.extra["errors"]] == [
        "/destination/flavor", "/destination/zone"]
    assert "vmware clouds have no placement field 'flavor'" in str(info.value)
    with pytest.raises(InvalidInput, match="/destination/cluster"):
        parse_placement(CloudKind.vmware, {"cluster": ""})  # the model's own checks
    assert parse_placement(CloudKind.linux, {}) == Placement()


def test_a_spec_must_have_the_factories_its_roles_need() -> None:
    schema = KindSchema(CloudKind.xen, "Xen", LinuxSettings, PasswordCredentials)
    with pytest.raises(ValueError, match="needs a source factory"):
        DriverSpec(platform="x", kinds=(schema,), roles=frozenset({Role.hypervisor_source}))
    with pytest.raises(ValueError, match="destination factory and import formats"):
        DriverSpec(platform="x", kinds=(schema,),
                   roles=frozenset({Role.hypervisor_destination}))


def test_no_driver_for_a_kind_or_role() -> None:
    linux = CloudConnection(id=uuid.uuid4(), kind=CloudKind.linux,
                            settings=LinuxSettings(host="h"), credentials=None)
    with pytest.raises(NoDriver, match="no driver for linux clouds that can be the source"):
        source_driver(linux)
    openstack = CloudConnection(id=uuid.uuid4(), kind=CloudKind.openstack,
                                settings=LinuxSettings(host="h"), credentials=None)
    with pytest.raises(NoDriver, match=r"available: esxi, vmware"):
        destination_driver(openstack)


def test_the_wizard_overrides_the_source_endpoint_and_login() -> None:
    conn = with_source_overrides(vsphere(), host="esx1.example", port=8443,
                                 username="root", password=SECRET)
    assert isinstance(conn.settings, VsphereSettings)
    assert (conn.settings.host, conn.settings.port, conn.settings.datacenter) == (
        "esx1.example", 8443, "DC0")
    assert isinstance(conn.credentials, PasswordCredentials)
    assert conn.credentials.username == "root"
    assert conn.credentials.password.get_secret_value() == SECRET
    same = with_source_overrides(vsphere(), host=None, port=None, username="u", password=None)
    assert same.settings == vsphere().settings
    linux = CloudConnection(
        id=uuid.uuid4(), kind=CloudKind.linux, settings=LinuxSettings(host="h"),
        credentials=SshCredentials(username="root", password=SecretStr("x")))
    # linux names no endpoint fields, and its credentials are not a user/password pair.
    assert with_source_overrides(linux, host="other", port=2, username="u",
                                 password=SECRET) == linux
    with pytest.raises(InvalidInput) as info:
        with_source_overrides(vsphere(), host="bad host!", port=None, username=None,
                              password=None)
    assert "host" in str(info.value)
