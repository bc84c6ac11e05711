"""The webhook dispatcher: drains the ``webhook_deliveries`` outbox.

Runs as a task in every worker process (and in ``vmigrate serve`` with its in-process
worker), or alone (``vmigrate dispatch``); any number may run against one database.

- **Claiming**: due rows are locked with ``FOR UPDATE SKIP LOCKED`` and marked taken
  (attempt counted, due time pushed past the attempt's timeout) in one short
  transaction; no transaction stays open during HTTP. A dispatcher that dies
  mid-attempt leaves the row to be retried once that lease lapses: delivery is at
  least once, and ``webhook-id`` lets receivers drop duplicates.
- **Isolation**: at most ``concurrency`` attempts in flight, and at most
  ``per_endpoint`` per endpoint; endpoints at their limit are skipped when claiming,
  so a receiver that hangs holds its own slots and nobody else's.
- **Requests**: the target is re-checked against the policy and the request goes to
  the address that was checked; no redirects, no proxies from the environment, a
  whole-attempt timeout, the response body read up to :data:`BODY_CAP` bytes.
- **Retries**: exponential backoff with jitter until ``retry_window`` after the event
  (or a redeliver), then ``dead``. An endpoint failing without a single success for
  ``disable_after`` is disabled, with a ``webhook.disabled`` event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.ext.asyncio import AsyncSession

from app.config import Settings
from app.crypto import SecretBox
from app.db import Database, DatabaseUnavailable
from app.models.schemas.migrations import EventOut
from app.repositories import events as events_repo
from app.repositories import webhooks as repo
from app.repositories.webhooks import Claimed
from app.webhooks import signing
from app.webhooks.policy import TargetPolicy, TargetRefused
from app.webhooks.signing import signing_secrets

log = logging.getLogger(__name__)

#: Response bytes read (and discarded) per attempt.
BODY_CAP = 4096
USER_AGENT = "vmigrate-webhooks/1"
#: Extra time a claim lasts beyond the attempt timeout.
_LEASE_MARGIN = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    concurrency: int = 16
    per_endpoint: int = 2
    timeout: float = 10.0
    retry_window: timedelta = timedelta(days=1)
    retry_base: float = 10.0
    retry_max: float = 3600.0
    disable_after: timedelta = timedelta(days=5)
    poll_seconds: float = 1.0

    @classmethod
    def from_settings(cls, s: Settings) -> DispatcherConfig:
        return cls(
            concurrency=s.webhook_concurrency, per_endpoint=s.webhook_per_endpoint_concurrency,
            timeout=s.webhook_timeout_seconds,
            retry_window=timedelta(seconds=s.webhook_retry_window_seconds),
            retry_base=s.webhook_retry_base_seconds, retry_max=s.webhook_retry_max_seconds,
            disable_after=timedelta(seconds=s.webhook_disable_after_seconds),
            poll_seconds=s.webhook_poll_seconds,
        )


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Delay after failed attempt ``attempt`` (1-based): ``base * 2**(attempt-1)``
    capped at ``cap``, then jittered to between half and all of it."""
    delay = min(cap, base * 2.0 ** min(attempt - 1, 62))
    return delay / 2 + rng.random() * delay / 2


def message(c: Claimed) -> str:
    """The body: ``{"type", "timestamp", "data"}`` with ``data`` the event as the
    events API shows it. Rebuilt identically for every attempt."""
    data = EventOut(id=c.event_id, migration_id=c.migration_id, seq=c.event_seq,
                    type=c.event_type, payload=c.payload, created_at=c.event_created_at)
    return json.dumps({
        "type": c.event_type,
        "timestamp": c.event_created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "data": data.model_dump(mode="json"),
    }, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    status: int | None
    latency_ms: int
    error: str | None


class Dispatcher:
    def __init__(self, db: Database, box: SecretBox, policy: TargetPolicy,
                 config: DispatcherConfig | None = None, *, rng: random.Random | None = None,
                 ) -> None:
        self.db = db
        self.box = box
        self.policy = policy
        self.config = config or DispatcherConfig()
        self.rng = rng or random.Random()
        self._inflight: dict[uuid.UUID, tuple[uuid.UUID, asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        #: Set while claiming fails (database away); /readyz shows it.
        self.failing = False

    async def __aenter__(self) -> Dispatcher:
        # No keep-alive: a connection is made to a checked address with the original
        # host's SNI, and must never be reused for another host on the same address.
        limits = httpx.Limits(max_connections=self.config.concurrency,
                              max_keepalive_connections=0)
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                         limits=limits, timeout=self.config.timeout)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.drain(grace=self.config.timeout)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until ``stop`` is set; then give in-flight attempts one timeout to
        finish (the rest are retried later, by whichever dispatcher gets there).

        Nothing else ends the loop: while claiming fails (the database is away) it backs
        off; the database outage is logged once per process (:class:`~app.db.Outage`),
        any other failure once per series of failures."""
        log.info("webhook dispatcher started")
        backoff = self.db.backoff()
        async with self:
            while not stop.is_set():
                started = 0
                wait = self.config.poll_seconds
                try:
                    started = await self.dispatch_due()
                except DatabaseUnavailable:
                    self.failing = True
                    wait = backoff.next()
                except Exception:
                    if not self.failing:
                        log.exception("webhook dispatcher: claiming failed; retrying with "
                                      "backoff")
                    self.failing = True
                    wait = backoff.next()
                else:
                    if self.failing:
                        log.info("webhook dispatcher: claiming works again")
                    self.failing = False
                    backoff.reset()
                if started and len(self._inflight) < self.config.concurrency:
                    continue  # more may be due right away
                self._wake.clear()
                stopper = asyncio.ensure_future(stop.wait())
                waker = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait({stopper, waker}, timeout=wait,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    stopper.cancel()
                    waker.cancel()
        log.info("webhook dispatcher stopped")

    async def drain(self, grace: float | None = None) -> None:
        """Wait for the attempts in flight (cancelled after ``grace`` seconds)."""
        tasks = [task for _, task in self._inflight.values()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def dispatch_due(self) -> int:
        """Claim what is due (within the free slots) and start its attempts."""
        if self._client is None:
            raise RuntimeError("use the dispatcher as an async context manager")
        free = self.config.concurrency - len(self._inflight)
        if free <= 0:
            return 0
        busy = Counter(wid for wid, _ in self._inflight.values())
        full = [wid for wid, n in busy.items() if n >= self.config.per_endpoint]
        lease = timedelta(seconds=self.config.timeout) + _LEASE_MARGIN
        async with self.db.session() as session:
            chosen: list[uuid.UUID] = []
            for delivery_id, webhook_id in await repo.due(session, exclude=full,
                                                          limit=free * 4):
                if len(chosen) >= free:
                    break
                if busy[webhook_id] < self.config.per_endpoint:
                    busy[webhook_id] += 1
                    chosen.append(delivery_id)
            claimed = await repo.take(session, chosen, lease) if chosen else []
        for c in claimed:
            task = asyncio.create_task(self._deliver(c), name=f"webhook-delivery-{c.id}")
            self._inflight[c.id] = (c.webhook_id, task)
            task.add_done_callback(functools.partial(self._done, c.id))
        return len(claimed)

    def _done(self, key: uuid.UUID, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        self._wake.set()

    async def _deliver(self, c: Claimed) -> None:
        outcome = await self.attempt(c)
        try:
            await self._record(c, outcome)
        except DatabaseUnavailable:
            # Logged once per outage by the database; the claim lapses and the delivery
            # is attempted again (at least once; receivers drop repeats by webhook-id).
            pass
        except Exception:
            log.exception("webhook delivery %s: could not record the outcome", c.id)

    async def attempt(self, c: Claimed) -> Outcome:
        """One POST of ``c``; never raises (every failure is an outcome)."""
        assert self._client is not None
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.config.timeout):
                target = await self.policy.check(c.url)
                body = message(c)
                now = datetime.now(UTC)
                secrets = signing_secrets(self.box, c.secrets, c.previous_secret_expires_at, now)
                headers = {
                    **signing.headers(secrets, f"msg_{c.id.hex}", now, body),
                    "content-type": "application/json",
                    "user-agent": USER_AGENT,
                    "host": target.host_header,
                }
                extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
                request = self._client.build_request("POST", target.pinned_url,
                                                     content=body.encode(), headers=headers,
                                                     extensions=extensions)
                response = await self._client.send(request, stream=True)
                try:
                    status = response.status_code
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= BODY_CAP:
                            break
                finally:
                    await response.aclose()
            if status is not None and not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)"
                                            if 300 <= status < 400 else "")
        except TargetRefused as exc:
            error = exc.message
        except TimeoutError:
            error = f"no complete response within {self.config.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] if str(exc) else type(exc).__name__
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        latency = int((time.monotonic() - started) * 1000)
        return Outcome(error is None, status, latency, error)

    async def _record(self, c: Claimed, outcome: Outcome) -> None:
        now = datetime.now(UTC)
        async with self.db.session() as session:
            if outcome.ok:
                await repo.finish(session, c.id, status="succeeded", next_attempt_at=None,
                                  response_status=outcome.status, latency_ms=outcome.latency_ms,
                                  error=None)
                await repo.mark_healthy(session, c.webhook_id)
                return
            delay = backoff(c.attempts, self.config.retry_base, self.config.retry_max, self.rng)
            retry_at = now + timedelta(seconds=delay)
            dead = retry_at > c.retry_from + self.config.retry_window
            await repo.finish(session, c.id, status="dead" if dead else "pending",
                              next_attempt_at=None if dead else retry_at,
                              response_status=outcome.status, latency_ms=outcome.latency_ms,
                              error=outcome.error)
            failing_since = await repo.mark_failing(session, c.webhook_id)
            if failing_since is not None and now - failing_since >= self.config.disable_after:
                await self._disable(session, c, failing_since)

    async def _disable(self, session: AsyncSession, c: Claimed, failing_since: datetime) -> None:
        reason = (f"every delivery failed since {failing_since:%Y-%m-%dT%H:%M:%SZ}; "
                  "re-enable it with active: true once it works")
        hook = await repo.disable(session, c.webhook_id, reason)
        if hook is None:
            return  # already disabled (another attempt got there first)
        log.warning("webhook %s disabled: %s", c.webhook_id, reason)
        await events_repo.record(session, c.tenant, "webhook.disabled", {
            "webhook_id": str(c.webhook_id), "reason": reason,
            "failing_since": failing_since.astimezone(UTC).isoformat(),
        })
