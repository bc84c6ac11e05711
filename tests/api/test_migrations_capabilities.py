"""The capability matrix: impossible source/destination pairs are a 422 at the field,
naming the kinds that would work; unknown or foreign clouds are "no such cloud"."""

from __future__ import annotations

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.drivers.capabilities import MATRIX, Role, default_matrix
from app.errors import InvalidInput
from app.models.enums import CloudKind
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
HYPERVISOR_SOURCES = {K.vmware, K.esxi, K.openstack, K.metapod, K.xen, K.nutanix, K.azure,
                      K.hyperv}
HYPERVISOR_DESTINATIONS = {K.softlayer, K.openstack, K.metapod, K.xen, K.amazon, K.vmware,
                           K.esxi, K.nutanix, K.hyperv}


@pytest.fixture
async def headers(make_token: TokenFactory) -> dict[str, str]:
    return auth(await make_token("acme", "migrations:write"))


def test_matrix_matches_the_spec() -> None:
    assert set(MATRIX.kinds(Role.hypervisor_source)) == HYPERVISOR_SOURCES
    assert set(MATRIX.kinds(Role.hypervisor_destination)) == HYPERVISOR_DESTINATIONS
    assert MATRIX.kinds(Role.image_extract_destination) == (K.softlayer,)
    assert set(MATRIX.kinds(Role.image_extract_source)) == set(K) - {K.linux}
    assert set(MATRIX.kinds(Role.live_stream_source)) == set(K)
    assert MATRIX.kinds(Role.live_stream_new_destination) == ()
    matrix = default_matrix()
    matrix.register(Role.live_stream_new_destination, K.openstack)
    assert matrix.allows(Role.live_stream_new_destination, "openstack")
    assert not MATRIX.allows(Role.live_stream_new_destination, "openstack")  # a fresh copy


@pytest.mark.parametrize("kind", list(K))
async def test_hypervisor_source_kinds(client: httpx.AsyncClient, db: Database,
                                       headers: dict[str, str], kind: K) -> None:
    r = await client.post(URL, json=hypervisor(await add_cloud(db, kind)), headers=headers)
    if kind in HYPERVISOR_SOURCES:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/source/cloud_id")
        detail = body["errors"][0]["detail"]
        assert f"kind {kind}" in detail
        assert "allowed kinds: azure, esxi, hyperv, metapod, nutanix, openstack" in detail


@pytest.mark.parametrize("kind", list(K))
async def test_hypervisor_destination_kinds(client: httpx.AsyncClient, db: Database,
                                            headers: dict[str, str], kind: K) -> None:
    src, dst = await add_cloud(db, K.vmware), await add_cloud(db, kind)
    r = await client.post(URL, json=hypervisor(src, mode="new", destination=dst),
                          headers=headers)
    if kind in HYPERVISOR_DESTINATIONS:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/destination/cloud_id")
        assert "cannot be the destination of a hypervisor migration" in body["detail"]


@pytest.mark.parametrize("kind", list(K))
async def test_image_extract_destination_is_softlayer_only(
    client: httpx.AsyncClient, db: Database, headers: dict[str, str], kind: K
) -> None:
    src, dst = await add_cloud(db, K.vmware), await add_cloud(db, kind)
    r = await client.post(URL, json=image_extract(src, cloud=dst), headers=headers)
    if kind is K.softlayer:
        assert r.status_code == 201, r.text
    else:
        body = assert_problem(r, 422, "/destination/cloud_id")
        assert body["errors"][0]["detail"].endswith("allowed kinds: softlayer")


@pytest.mark.parametrize("kind", [K.linux, K.amazon, K.azure])
async def test_image_extract_source(client: httpx.AsyncClient, db: Database,
                                    headers: dict[str, str], kind: K) -> None:
    r = await client.post(URL, json=image_extract(await add_cloud(db, kind)), headers=headers)
    if kind is K.linux:
        assert_problem(r, 422, "/source/cloud_id")
    else:
        assert r.status_code == 201, r.text


@pytest.mark.parametrize("kind", list(K))
async def test_live_stream_from_any_cloud(client: httpx.AsyncClient, db: Database,
                                          headers: dict[str, str], kind: K) -> None:
    r = await client.post(URL, json=live_stream(await add_cloud(db, kind)), headers=headers)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("kind", [K.openstack, K.amazon, K.linux])
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


async def test_a_registered_provisioner_makes_new_destinations_possible(
    db: Database, settings: Settings
) -> None:
    """Capabilities are data: the service follows a matrix a driver registered into."""
    matrix = default_matrix()
    matrix.register(Role.live_stream_new_destination, K.openstack)
    src, dst = await add_cloud(db, K.linux), await add_cloud(db, K.openstack)
    body = LiveStreamCreate.model_validate(live_stream(src, new_in=dst))
    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    async with db.session() as session:
        with pytest.raises(InvalidInput):
            await service.create(session, box, "acme", body)
        view = await service.create(session, box, "acme", body, matrix)
    assert [s.name for s in view.steps] == [
        "validate", "provision", "snapshot", "transfer", "verify", "remove_snapshot"]
