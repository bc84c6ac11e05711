"""``migration.progress`` events: at most one per second per migration, whatever the
engine asks for (``force`` included), and in the same transaction as the progress."""

from __future__ import annotations

import httpx

from app.crypto import SecretBox
from app.db import Database
from app.engines.worker import DbRunStore
from tests.conftest import TokenFactory, auth
from tests.engines.test_worker import _create, _worker, box  # noqa: F401 - fixture


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_progress_events_are_throttled_to_one_per_second(
    client: httpx.AsyncClient, make_token: TokenFactory, db: Database, box: SecretBox  # noqa: F811
) -> None:
    token = await make_token()
    mid = await _create(client, token, db)
    claimed = await _worker(db, box).claim()
    assert claimed is not None
    clock = FakeClock()
    store = DbRunStore(db, claimed, clock=clock)
    for i in range(25):  # 25 updates over 2.4 s
        clock.now = 100 + i / 10
        await store.progress(0, i * 10, 1000, 5)
    events = (await client.get(f"/v1/migrations/{mid}/events", headers=auth(token),
                               params={"limit": 200})).json()["items"]
    progress = [e["payload"] for e in events if e["type"] == "migration.progress"]
    assert [p["bytes_done"] for p in progress] == [0, 100, 200]
    assert progress[0] == {"step": "validate", "bytes_done": 0, "bytes_total": 1000, "rate": 5}
    migration = (await client.get(f"/v1/migrations/{mid}", headers=auth(token))).json()
    assert migration["progress"]["bytes_done"] == 240  # every update is still persisted
