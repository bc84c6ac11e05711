"""One driver session per migration run: a whole VMware migration (validate, power off,
snapshot, transfer, cleanup; in mode new also provision and verify) logs into vCenter
once and logs out at the end. Counted at the wire, between the driver and vcsim."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database
from app.formats.digest import digest_file
from app.storage.local import LocalStore
from tests.conftest import TokenFactory, auth
from tests.e2e.soap_counter import SoapCounter, counting_proxy
from tests.e2e.vmware_support import MiB, borrowed_vm, disk_with_holes, make_worker, run_until
from tests.infra.vcsim import Vcsim

SIZE = 8 * MiB


async def _cloud_via(client: httpx.AsyncClient, token: str, vcsim: Vcsim,
                     proxy: SoapCounter) -> str:
    r = await client.post("/v1/clouds", headers=auth(token), json={
        "name": "vcsim-counted", "kind": "vmware",
        "settings": {"host": proxy.host, "port": proxy.port,
                     "ca_bundle": vcsim.ca_bundle.read_text(), "datacenter": vcsim.datacenter},
        "credentials": {"username": vcsim.username, "password": vcsim.password},
    })
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


async def _run(client: httpx.AsyncClient, token: str, settings: Settings, db: Database,
               body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/migrations", json=body, headers=auth(token))
    assert r.status_code == 201, r.text
    mid = r.json()["id"]

    async def ended() -> bool:
        got = (await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json()
        return bool(got["status"] in ("completed", "failed", "cancelled"))

    box = SecretBox([k.get_secret_value().encode() for k in settings.encryption_keys])
    await run_until(make_worker(settings, db, box, LocalStore(settings.library_dir)), ended)
    return dict((await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json())


@pytest.mark.parametrize("mode", ["store", "new"])
async def test_one_login_per_cloud_per_run(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, settings: Settings,
    vcsim: Vcsim, tmp_path: Path, mode: str,
) -> None:
    vm = "DC0_C0_RP0_VM1"
    raw = disk_with_holes(tmp_path / "source.raw", SIZE, seed=3)
    token = await make_token()
    with borrowed_vm(vcsim, vm, SIZE, raw):
        async with counting_proxy(vcsim) as wire:
            cloud = await _cloud_via(client, token, vcsim, wire)
            body: dict[str, Any] = {
                "type": "hypervisor", "name": "counted", "mode": mode, "platform": "linux",
                "run": True, "source": {"cloud_id": cloud, "server": {"name": vm}},
                "options": {"power_off": True}}
            if mode == "store":
                body["format"] = "qcow2"
            else:  # the same vCenter as destination: still one session
                body["destination"] = {"cloud_id": cloud, "server_name": "counted-copy",
                                       "cluster": "DC0_C0", "datastore": "LocalDS_0"}
            m = await _run(client, token, settings, db, body)
            assert m["status"] == "completed", m["error"]
            steps = [s["name"] for s in m["steps"] if s["status"] == "completed"]
            # every step that talks to vCenter ran, several of them ...
            assert {"validate", "power_off", "snapshot", "transfer",
                    "remove_snapshot"} <= set(steps)
            if mode == "new":
                assert {"provision", "verify"} <= set(steps)
                verified = next(s for s in m["steps"] if s["name"] == "verify")
                assert verified["result"]["digests"] == [digest_file(str(raw))]
            # ... through one login, closed when the run ended
            assert wire.logins == 1, f"{wire.logins} logins in one run"
            assert wire.logouts == 1
            assert wire.connections >= 1  # the counter did see the driver's traffic
