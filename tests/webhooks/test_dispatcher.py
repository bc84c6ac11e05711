"""The outbox and its dispatcher against a real database and real HTTP receivers that
verify every delivery with the ``standardwebhooks`` library."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update
from standardwebhooks.webhooks import WebhookVerificationError

from app.api.deps import AppContext
from app.config import Settings
from app.db import Database
from app.main import build_dispatcher, create_app
from app.models.db import Webhook, WebhookDelivery
from app.repositories import events as events_repo
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.policy import TargetPolicy
from tests.conftest import TokenFactory, auth
from tests.webhooks.support import Receiver, asgi_client, webhook_settings


@dataclass
class Harness:
    api: httpx.AsyncClient
    ctx: AppContext
    token: str

    async def hook(self, url: str, **body: Any) -> dict[str, Any]:
        r = await self.api.post("/v1/webhooks", headers=auth(self.token),
                                json={"url": url, **body})
        assert r.status_code == 201, r.text
        return dict(r.json())

    async def deliveries(self, hook_id: str) -> list[dict[str, Any]]:
        r = await self.api.get(f"/v1/webhooks/{hook_id}/deliveries", headers=auth(self.token))
        assert r.status_code == 200, r.text
        return list(r.json()["items"])

    def dispatcher(self, **config: Any) -> Dispatcher:
        d = build_dispatcher(self.ctx)
        d.config = dataclasses.replace(d.config, **config)
        return d


@pytest.fixture
async def h(settings: Settings, db: Database, make_token: TokenFactory
            ) -> AsyncIterator[Harness]:
    app = create_app(webhook_settings(settings), db=db)
    async with asgi_client(app) as api:
        yield Harness(api, app.state.ctx, await make_token())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


async def emit(db: Database, type_: str = "image.created", tenant: str = "acme",
               **payload: Any) -> None:
    async with db.session() as session:
        await events_repo.record(session, tenant, type_, payload or {"n": 1})


async def pump(d: Dispatcher, until: Callable[[], Awaitable[bool]], timeout: float = 10.0
               ) -> None:
    """Dispatch what is due until ``until()`` holds, then let attempts finish."""
    deadline = time.monotonic() + timeout
    while not await until():
        assert time.monotonic() < deadline, "condition not reached in time"
        await d.dispatch_due()
        await asyncio.sleep(0.02)
    await d.drain()


def statuses(h: Harness, hook_id: str, *wanted: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        got = [d["status"] for d in await h.deliveries(hook_id)]
        return sorted(got) == sorted(wanted)

    return check


async def test_delivery_is_signed_recorded_and_shaped_like_the_events_api(
    h: Harness, receiver: Receiver
) -> None:
    hook = await h.hook(receiver.url())
    await emit(h.ctx.db, "image.created", image_id="i-1")
    async with h.dispatcher() as d:
        await pump(d, statuses(h, hook["id"], "succeeded"))
    [got] = receiver.at("/hook")
    body = got.verify(hook["secret"])
    events = (await h.api.get("/v1/events", headers=auth(h.token))).json()["items"]
    assert body["type"] == "image.created"
    assert body["data"] == events[0]
    assert body["timestamp"].endswith("Z")
    [row] = await h.deliveries(hook["id"])
    assert got.headers["webhook-id"] == "msg_" + row["id"].replace("-", "")
    assert got.headers["Content-Type"] == "application/json"
    assert row["attempts"] == 1
    assert row["response_status"] == 200
    assert row["latency_ms"] >= 0
    assert row["next_attempt_at"] is None
    assert row["event_id"] == events[0]["id"]
    assert row["event_type"] == "image.created"


async def test_retried_after_a_500_then_delivered(h: Harness, receiver: Receiver) -> None:
    receiver.respond("/hook", 500, 200)
    hook = await h.hook(receiver.url())
    await emit(h.ctx.db)
    async with h.dispatcher() as d:
        await pump(d, statuses(h, hook["id"], "succeeded"))
    first, second = receiver.at("/hook")
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    second.verify(hook["secret"])
    [row] = await h.deliveries(hook["id"])
    assert row["attempts"] == 2
    assert row["response_status"] == 200
    assert row["last_error"] is None
    hook_now = (await h.api.get(f"/v1/webhooks/{hook['id']}", headers=auth(h.token))).json()
    assert hook_now["failing_since"] is None


async def test_dead_after_the_retry_window_then_redelivered(
    h: Harness, receiver: Receiver
) -> None:
    receiver.respond("/hook", 500)
    hook = await h.hook(receiver.url())
    await emit(h.ctx.db)
    async with h.dispatcher(retry_window=timedelta(seconds=0.4)) as d:
        await pump(d, statuses(h, hook["id"], "dead"))
        [row] = await h.deliveries(hook["id"])
        assert row["attempts"] >= 2
        assert row["response_status"] == 500
        assert row["last_error"] == "HTTP 500"
        assert row["next_attempt_at"] is None
        assert len(receiver.at("/hook")) == row["attempts"]
        failing = (await h.api.get(f"/v1/webhooks/{hook['id']}", headers=auth(h.token))).json()
        assert failing["failing_since"] is not None

        receiver.respond("/hook", 200)
        r = await h.api.post(f"/v1/webhooks/{hook['id']}/deliveries/{row['id']}/redeliver",
                             headers=auth(h.token))
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "pending"
        await pump(d, statuses(h, hook["id"], "succeeded"))
    [after] = await h.deliveries(hook["id"])
    assert after["attempts"] == row["attempts"] + 1


async def test_endpoint_failing_too_long_is_disabled_with_an_event(
    h: Harness, receiver: Receiver
) -> None:
    receiver.respond("/bad", 503)
    bad = await h.hook(receiver.url("/bad"), event_types=["image.*"])
    watcher = await h.hook(receiver.url("/watch"), event_types=["webhook.disabled"])
    await emit(h.ctx.db)

    async def disabled() -> bool:
        got = await h.api.get(f"/v1/webhooks/{bad['id']}", headers=auth(h.token))
        return got.json()["active"] is False

    async with h.dispatcher(disable_after=timedelta(seconds=0.3),
                            retry_window=timedelta(seconds=30)) as d:
        await pump(d, disabled)
        await pump(d, statuses(h, watcher["id"], "succeeded"))
    hook = (await h.api.get(f"/v1/webhooks/{bad['id']}", headers=auth(h.token))).json()
    assert "re-enable" in hook["disabled_reason"]
    [note] = receiver.at("/watch")
    body = note.verify(watcher["secret"])
    assert body["type"] == "webhook.disabled"
    assert body["data"]["payload"]["webhook_id"] == bad["id"]
    assert body["data"]["migration_id"] is None
    # Its delivery waits (pending) instead of being attempted while disabled.
    attempts = len(receiver.at("/bad"))
    async with h.dispatcher() as d:
        await d.dispatch_due()
        await d.drain()
    assert len(receiver.at("/bad")) == attempts
    [pending] = await h.deliveries(bad["id"])
    assert pending["status"] == "pending"
    r = await h.api.post(f"/v1/webhooks/{bad['id']}/deliveries/{pending['id']}/redeliver",
                         headers=auth(h.token))
    assert r.status_code == 409


async def test_rolled_back_events_have_no_deliveries(h: Harness, receiver: Receiver) -> None:
    hook = await h.hook(receiver.url())

    class Boom(Exception):
        pass

    async def record_then_fail() -> None:
        async with h.ctx.db.session() as session:
            await events_repo.record(session, "acme", "image.created", {"n": 1})
            pending = await session.scalar(select(func.count()).select_from(WebhookDelivery))
            assert pending == 1  # written in the same transaction...
            raise Boom

    with pytest.raises(Boom):
        await record_then_fail()
    async with h.ctx.db.session() as session:  # ...and gone with it
        assert await session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0
    await emit(h.ctx.db)
    assert len(await h.deliveries(hook["id"])) == 1


async def test_type_filters_and_tenants(h: Harness, receiver: Receiver) -> None:
    only_migrations = await h.hook(receiver.url("/m"), event_types=["migration.*"])
    exact = await h.hook(receiver.url("/e"), event_types=["image.deleted"])
    everything = await h.hook(receiver.url("/all"))
    paused = await h.hook(receiver.url("/paused"), active=False)
    await emit(h.ctx.db, "image.created")
    await emit(h.ctx.db, "image.deleted")
    await emit(h.ctx.db, "image.created", tenant="umbrella")
    counts = {k: len(await h.deliveries(v["id"]))
              for k, v in [("m", only_migrations), ("e", exact), ("all", everything),
                           ("paused", paused)]}
    assert counts == {"m": 0, "e": 1, "all": 2, "paused": 0}


async def test_address_is_checked_again_at_delivery_time(
    h: Harness, receiver: Receiver
) -> None:
    # Registered while "localhost" was allowed (it resolves to 127.0.0.1)...
    hook = await h.hook(f"http://localhost:{receiver.port}/hook")
    await emit(h.ctx.db)
    # ...then delivered by a dispatcher whose policy does not allow loopback.
    d = h.dispatcher()
    d.policy = TargetPolicy()
    async with d:
        async def attempted() -> bool:
            return bool((await h.deliveries(hook["id"]))[0]["attempts"] >= 1)

        await pump(d, attempted)
    [row] = await h.deliveries(hook["id"])
    assert row["status"] == "pending"
    assert "non-public" in row["last_error"]
    assert row["response_status"] is None
    assert receiver.received == []


async def test_a_hanging_receiver_does_not_delay_another(
    h: Harness, receiver: Receiver
) -> None:
    receiver.respond("/slow", "hang")
    slow = await h.hook(receiver.url("/slow"))
    fast = await h.hook(receiver.url("/fast"))
    for _ in range(3):
        await emit(h.ctx.db)
    d = h.dispatcher(concurrency=4, per_endpoint=1, timeout=2.0)
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(d.run(stop))
    try:
        await receiver.wait_for(3, "/fast", timeout=1.5)
        took = time.monotonic() - started
        assert took < 1.5
        assert len(receiver.at("/slow")) == 1  # one slot, still hanging
    finally:
        stop.set()
        await task
    assert [x["status"] for x in await h.deliveries(fast["id"])] == ["succeeded"] * 3
    rows = await h.deliveries(slow["id"])
    assert any("no complete response" in (x["last_error"] or "") for x in rows)


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    h: Harness, receiver: Receiver
) -> None:
    hook = await h.hook(receiver.url())
    r = await h.api.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=auth(h.token))
    old, new = hook["secret"], r.json()["secret"]
    await emit(h.ctx.db)
    async with h.dispatcher() as d:
        await pump(d, statuses(h, hook["id"], "succeeded"))
        [during] = receiver.at("/hook")
        during.verify(old)
        during.verify(new)
        async with h.ctx.db.session() as session:  # the overlap ends
            await session.execute(update(Webhook).values(
                previous_secret_expires_at=func.now() - timedelta(seconds=1)))
        await emit(h.ctx.db)
        await pump(d, statuses(h, hook["id"], "succeeded", "succeeded"))
    after = receiver.at("/hook")[1]
    after.verify(new)
    with pytest.raises(WebhookVerificationError):
        after.verify(old)


async def test_secrets_stay_out_of_logs_events_and_the_outbox(
    h: Harness, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.respond("/hook", 500, 200)
    hook = await h.hook(receiver.url())
    rotated = (await h.api.post(f"/v1/webhooks/{hook['id']}/rotate-secret",
                                headers=auth(h.token))).json()
    await emit(h.ctx.db)
    async with h.dispatcher(disable_after=timedelta(0)) as d:
        await pump(d, statuses(h, hook["id"], "succeeded"))
    async with h.ctx.db.session() as session:
        dump = " ".join(str(r) for r in (await session.execute(text(
            "SELECT payload::text FROM migration_events UNION ALL "
            "SELECT row_to_json(d)::text FROM webhook_deliveries d UNION ALL "
            "SELECT row_to_json(w)::text FROM webhooks w"))).all())
    responses = " ".join([
        (await h.api.get("/v1/events", headers=auth(h.token))).text,
        (await h.api.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=auth(h.token))).text,
        (await h.api.get("/v1/webhooks", headers=auth(h.token))).text,
    ])
    for secret in (hook["secret"], rotated["secret"]):
        key = secret.removeprefix("whsec_")
        assert key not in caplog.text
        assert key not in dump
        assert key not in responses


async def test_two_dispatchers_deliver_each_event_once(h: Harness, receiver: Receiver) -> None:
    hook = await h.hook(receiver.url())
    for _ in range(20):
        await emit(h.ctx.db)
    stop = asyncio.Event()
    one, two = h.dispatcher(per_endpoint=4), h.dispatcher(per_endpoint=4)
    tasks = [asyncio.create_task(d.run(stop)) for d in (one, two)]
    try:
        await receiver.wait_for(20, timeout=10)
        await asyncio.sleep(0.3)  # time for a duplicate to show up, if there were one
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    ids = [d.headers["webhook-id"] for d in receiver.at("/hook")]
    assert len(ids) == len(set(ids)) == 20
    rows = await h.deliveries(hook["id"])
    assert {r["status"] for r in rows} == {"succeeded"}
    assert {r["attempts"] for r in rows} == {1}


async def test_redirects_are_not_followed(h: Harness, receiver: Receiver) -> None:
    receiver.respond("/hook", "redirect")
    hook = await h.hook(receiver.url())
    await emit(h.ctx.db)
    async with h.dispatcher() as d:
        async def attempted() -> bool:
            return bool((await h.deliveries(hook["id"]))[0]["attempts"] >= 1)

        await pump(d, attempted)
    [row] = await h.deliveries(hook["id"])
    assert row["status"] == "pending"
    assert row["response_status"] == 307
    assert row["last_error"] == "HTTP 307 (redirects are not followed)"
    assert receiver.at("/elsewhere") == []


async def test_attempts_are_counted_timed_and_failures_logged(
    h: Harness, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    from app import metrics

    def count(outcome: str) -> float:
        value = metrics.REGISTRY.get_sample_value("vmigrate_webhook_deliveries_total",
                                                  {"outcome": outcome})
        return value or 0.0

    def timed(outcome: str) -> float:
        value = metrics.REGISTRY.get_sample_value(
            "vmigrate_webhook_delivery_duration_seconds_count", {"outcome": outcome})
        return value or 0.0

    before = {o: (count(o), timed(o)) for o in ("succeeded", "retrying", "dead")}
    caplog.set_level(logging.WARNING, logger="app.webhooks.dispatcher")
    receiver.respond("/hook", 500, 200)
    hook = await h.hook(receiver.url())
    await emit(h.ctx.db)
    async with h.dispatcher() as d:
        await pump(d, statuses(h, hook["id"], "succeeded"))
    grew = {o: (count(o) - c, timed(o) - t) for o, (c, t) in before.items()}
    assert grew == {"succeeded": (1, 1), "retrying": (1, 1), "dead": (0, 0)}
    [row] = await h.deliveries(hook["id"])
    failed = [r for r in caplog.records if r.name == "app.webhooks.dispatcher"
              and r.levelno == logging.WARNING]
    assert len(failed) == 1
    assert row["id"] in failed[0].getMessage()
    assert "HTTP 500" in failed[0].getMessage()
    assert "retrying in" in failed[0].getMessage()
    assert hook["secret"].removeprefix("whsec_") not in caplog.text
