"""The capability matrix, derived from the registered driver specs and what the engines
run: an impossible source/destination pair, a platform with no driver, or a role no
engine runs is a 422 at the field naming the kind and the role (never a 201 that fails
later); a destination field the destination's placement model lacks is a 422 naming
the field; unknown or foreign clouds are "no such cloud"."""

from __future__ import annotations

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.drivers.base import Placement
from app.drivers.capabilities import IMPORT_FORMATS, MATRIX, matrix_from
from app.drivers.kit.spec import DriverSpec, Role
from app.drivers.registry import SPECS, what_works
from app.errors import InvalidInput
from app.models.enums import CloudKind, ImageFormat
from app.models.schemas.cloud_fields import PasswordCredentials, StrictModel, Text
from app.models.schemas.clouds import KindSchema
from app.models.schemas.migrations import LiveStreamCreate
from app.services import migrations as service
from tests.api.migrations_support import (
    add_cloud,
    assert_problem,
    hypervisor,
    image_extract,
    live_stream,
)
from tests.conftest import TokenFactory, auth

URL = "/v1/migrations"
K = CloudKind
#: What the registered drivers (VMware, linux) and the engines make possible today.
HYPERVISOR_SOURCES = {K.vmware, K.esxi}
HYPERVISOR_DESTINATIONS = {K.vmware, K.esxi}
REGISTERED = {K.vmware, K.esxi, K.linux}


@pytest.fixture
async def headers(make_token: TokenFactory) -> dict[str, str]:
    return auth(await make_token("acme", "migrations:write"))


def test_matrix_is_derived_from_the_registered_specs() -> None:
    assert set(MATRIX.kinds(Role.hypervisor_source)) == HYPERVISOR_SOURCES
    assert set(MATRIX.kinds(Role.hypervisor_destination)) == HYPERVISOR_DESTINATIONS
    assert MATRIX.kinds(Role.image_extract_source) == ()  # no engine yet
    assert MATRIX.kinds(Role.image_extract_destination) == ()
    assert set(MATRIX.kinds(Role.live_stream_source)) == REGISTERED  # any registered kind
    assert MATRIX.kinds(Role.live_stream_new_destination) == ()
    assert {K.vmware: (ImageFormat.vmdk,), K.esxi: (ImageFormat.vmdk,)} == IMPORT_FORMATS


def test_what_works_has_every_kind_and_role() -> None:
    table = what_works()
    assert [r.kind for r in table.rows] == list(K)
    rows = {r.kind: r for r in table.rows}
    assert rows[K.vmware].platform == "VMware vSphere"
    assert rows[K.vmware].roles == (True, True, False, False, True, False)
    assert rows[K.linux].roles == (False, False, False, False, True, False)
    assert rows[K.openstack].platform is None
    assert not any(rows[K.openstack].roles)
    text = table.markdown()
    assert "| vmware | VMware vSphere | yes | yes | — | — | yes | — |" in text
    assert "| openstack | no driver yet |" in text


@pytest.mark.parametrize("kind", list(K))
async def test_hypervisor_source_kinds(client: httpx.AsyncClient, db: Database,
                                       headers: dict[str, str], kind: K) -> None:
    r = await client.post(URL, json=hypervisor(await add_cloud(db, kind)), headers=headers)
    if kind in HYPERVISOR_SOURCES:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/source/cloud_id")
        detail = body["errors"][0]["detail"]
        assert f"kind {kind}, which cannot be the source of a hypervisor migration" in detail
        if kind not in REGISTERED:
            assert f"vmigrate has no {kind} driver yet" in detail
        assert detail.endswith("allowed kinds: esxi, vmware")


@pytest.mark.parametrize("kind", list(K))
async def test_hypervisor_destination_kinds(client: httpx.AsyncClient, db: Database,
                                            headers: dict[str, str], kind: K) -> None:
    """The test that used to accept an OpenStack destination with a 201 (and a migration
    failing later for want of a driver): only registered destinations pass now."""
    src, dst = await add_cloud(db, K.vmware), await add_cloud(db, kind)
    r = await client.post(URL, json=hypervisor(src, mode="new", destination=dst),
                          headers=headers)
    if kind in HYPERVISOR_DESTINATIONS:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/destination/cloud_id")
        assert f"kind {kind}, which cannot be the destination of a hypervisor migration" in (
            body["detail"])


async def test_an_openstack_source_is_refused_naming_platform_and_role(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    src, dst = await add_cloud(db, K.openstack), await add_cloud(db, K.openstack)
    r = await client.post(URL, json=hypervisor(src, mode="new", destination=dst),
                          headers=headers)
    body = assert_problem(r, 422, "/source/cloud_id", "/destination/cloud_id")
    source, destination = (e["detail"] for e in body["errors"])
    assert "kind openstack" in source
    assert "source of a hypervisor migration" in source
    assert "vmigrate has no openstack driver yet" in source
    assert "kind openstack" in destination
    assert "destination of a hypervisor" in destination
    assert (await client.get(URL, headers=headers)).json()["items"] == []  # nothing stored


@pytest.mark.parametrize(("field", "value"), [("flavor", "m1.large"), ("zone", "az1")])
async def test_a_placement_field_the_destination_lacks_is_named(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], field: str, value: str
) -> None:
    src, dst = await add_cloud(db, K.vmware), await add_cloud(db, K.esxi)
    body = hypervisor(src, mode="new", destination=dst)
    body["destination"][field] = value
    r = await client.post(URL, json=body, headers=headers)
    problem = assert_problem(r, 422, f"/destination/{field}")
    detail = problem["errors"][0]["detail"]
    assert f"esxi clouds have no placement field {field!r}" in detail
    assert "datastore" in detail  # names what the destination does take
    body["destination"].pop(field)
    body["destination"].update(cluster="C0", folder="team/vms", network="VM Network")
    r = await client.post(URL, json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["destination"]["cluster"] == "C0"


@pytest.mark.parametrize("kind", [K.vmware, K.softlayer, K.hyperv])
async def test_image_extract_is_refused_while_no_engine_runs_it(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], kind: K
) -> None:
    src, dst = await add_cloud(db, kind), await add_cloud(db, K.softlayer)
    r = await client.post(URL, json=image_extract(src, cloud=dst), headers=headers)
    body = assert_problem(r, 422, "/source/cloud_id", "/destination/cloud_id")
    source, destination = (e["detail"] for e in body["errors"])
    assert f"kind {kind}, which cannot be the source of an image extract" in source
    assert "no engine runs this yet" in source
    assert "no cloud kind can be the source of an image extract yet" in source
    assert "kind softlayer, which cannot be the destination of an image extract" in destination
    r = await client.post(URL, json=image_extract(src), headers=headers)  # into the library
    assert_problem(r, 422, "/source/cloud_id")


@pytest.mark.parametrize("kind", list(K))
async def test_live_stream_from_any_registered_kind(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], kind: K
) -> None:
    r = await client.post(URL, json=live_stream(await add_cloud(db, kind)), headers=headers)
    if kind in REGISTERED:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/source/cloud_id")
        assert f"kind {kind}, which cannot be the source of a live stream" in body["detail"]
        assert f"vmigrate has no {kind} driver yet" in body["detail"]


@pytest.mark.parametrize("kind", [K.vmware, K.openstack, K.linux])
async def test_no_kind_can_provision_a_live_stream_destination_yet(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], kind: K
) -> None:
    src, dst = await add_cloud(db, K.linux), await add_cloud(db, kind)
    r = await client.post(URL, json=live_stream(src, new_in=dst), headers=headers)
    body = assert_problem(r, 422, "/destination/cloud_id")
    assert "no cloud kind can provision a new live-stream destination yet" in body["detail"]


async def test_unknown_and_foreign_clouds_are_no_such_cloud(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str]
) -> None:
    foreign = await add_cloud(db, K.vmware, tenant="globex")
    mine = await add_cloud(db, K.vmware)
    missing = "00000000-0000-4000-8000-000000000000"
    r = await client.post(URL, json=hypervisor(foreign, mode="new", destination=missing),
                          headers=headers)
    body = assert_problem(r, 422, "/source/cloud_id", "/destination/cloud_id")
    assert [e["detail"] for e in body["errors"]] == [
        f"no such cloud: {foreign}", f"no such cloud: {missing}"]
    r = await client.post(URL, json=hypervisor(mine, mode="new", destination=foreign),
                          headers=headers)
    assert_problem(r, 422, "/destination/cloud_id")
    assert (await client.get(URL, headers=headers)).json()["items"] == []  # nothing stored


class _OpenStackSettings(StrictModel):
    auth_url: Text


class _FlavorPlacement(Placement):
    flavor: Text | None = None


async def test_a_registered_spec_makes_a_role_possible(db: Database, settings: Settings) -> None:
    """Capabilities are derived: a spec that declares a role (here a stand-in OpenStack
    spec that provisions live-stream destinations) is all the service needs."""
    openstack = DriverSpec(
        platform="OpenStack (test)",
        kinds=(KindSchema(K.openstack, "OpenStack", _OpenStackSettings, PasswordCredentials),),
        roles=frozenset({Role.live_stream_new_destination}),
        placement=_FlavorPlacement,
    )
    matrix = matrix_from([*SPECS, openstack])
    assert matrix.allows(Role.live_stream_new_destination, "openstack")
    assert not MATRIX.allows(Role.live_stream_new_destination, "openstack")
    assert matrix.allows(Role.live_stream_source, "openstack")  # any registered kind
    src, dst = await add_cloud(db, K.linux), await add_cloud(db, K.openstack)
    body = LiveStreamCreate.model_validate(live_stream(src, new_in=dst))
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    async with db.session() as session:
        with pytest.raises(InvalidInput):
            await service.create(session, box, "acme", body)
        view = await service.create(session, box, "acme", body, matrix)
    assert [s.name for s in view.steps] == [
        "validate", "provision", "snapshot", "transfer", "verify", "remove_snapshot"]
