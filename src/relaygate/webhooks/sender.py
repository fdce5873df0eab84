"""The webhook sender: a task of the delivery process.

Each round it turns newly committed events into outbox rows (Webhooks.collect),
claims due rows with a lease, and POSTs each one signed, at most MAX_IN_FLIGHT
at a time, with a 10 s limit per POST. Redirects are not followed. Every
attempt is recorded; failures retry on the schedule in schedule.py, with the
same webhook-id each time. The SSRF rule is checked again on the resolved
address, and the connection goes to that address (no second look-up).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx

from relaygate import logs
from relaygate.storage.api import OutboxItem, WebhookAttempt, Webhooks
from relaygate.webhooks import signing
from relaygate.webhooks.events import Endpoint
from relaygate.webhooks.schedule import TIMEOUT, retry_delay, time_scale
from relaygate.webhooks.targets import TargetError, check_url, resolve

POLL_INTERVAL = 0.5
REFRESH_INTERVAL = 5.0  # API-made webhooks are re-read this often
MAX_IN_FLIGHT = 20
LEASE = 60.0  # > TIMEOUT: a row outlives its POST; a dead process's rows come back after it
COLLECT_BATCH = 500
IDLE_CURSOR_INTERVAL = 60.0


class WebhookSender:
    def __init__(
        self, store: Webhooks, configured: Sequence[Endpoint], allow_private: bool
    ) -> None:
        self._store = store
        self._configured = list(configured)
        self._allow_private = allow_private
        self._endpoints: dict[str, Endpoint] = {e.id: e for e in configured}
        self._refreshed = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        # None: just started. Endpoints at the start are not "new": what happened
        # before a crash or restart is read, not skipped.
        self._idle: bool | None = None
        self._idle_since = 0.0
        self._scale = time_scale()
        self._client = httpx.AsyncClient(follow_redirects=False, timeout=TIMEOUT, trust_env=False)

    def reconfigure(self, configured: Sequence[Endpoint]) -> None:
        """A reload: the [[webhooks]] of the file now, from the next round on."""
        self._configured = list(configured)
        self._refreshed = 0.0

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                try:
                    await self.round(time.time())
                except Exception as exc:  # storage away: try again next round
                    logs.event("webhook.error", logging.ERROR, reason=str(exc)[:200])
                try:
                    await asyncio.wait_for(stopping.wait(), POLL_INTERVAL)
                except TimeoutError:
                    pass
        finally:
            for task in self._tasks:
                task.cancel()  # unfinished rows come back when their lease ends
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._client.aclose()

    async def round(self, now: float) -> None:
        if now - self._refreshed >= REFRESH_INTERVAL:
            await self._refresh(now)
        endpoints = list(self._endpoints.values())
        if self._idle is None:
            self._idle = not endpoints
        if endpoints:
            if self._idle:  # the first endpoint: events from now on, not from the past
                await self._store.collect([], now, COLLECT_BATCH)
                self._idle = False
            await self._store.collect(endpoints, now, COLLECT_BATCH)
        elif not self._idle or now - self._idle_since >= IDLE_CURSOR_INTERVAL:
            # Nobody listens: keep the cursor near the present, rarely (no cost to SMTP).
            await self._store.collect([], now, COLLECT_BATCH)
            self._idle, self._idle_since = True, now
        room = MAX_IN_FLIGHT - len(self._tasks)
        if room <= 0:
            return
        for item in await self._store.claim(now, room, LEASE):
            task = asyncio.create_task(self._deliver(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refresh(self, now: float) -> None:
        made = await self._store.endpoints()
        self._endpoints = {e.id: e for e in [*self._configured, *made]}
        self._refreshed = now

    async def _deliver(self, item: OutboxItem) -> None:
        started = time.time()
        clock = time.monotonic()
        endpoint = self._endpoints.get(item.endpoint)
        if endpoint is None:  # made through the API since the last refresh?
            await self._refresh(time.time())
            endpoint = self._endpoints.get(item.endpoint)
        status: int | None = None
        error: str | None = None
        if endpoint is None:
            error = "the webhook was removed"
        else:
            try:
                status = await self._post(endpoint, item)
            except TargetError as exc:
                error = str(exc)
            except TimeoutError:
                error = f"no answer within {TIMEOUT:g} s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
            except (OSError, ValueError) as exc:  # ValueError: a URL or secret gone bad
                error = f"{type(exc).__name__}: {exc}"[:300]
        duration = time.monotonic() - clock
        ok = status is not None and 200 <= status < 300
        delay = None if ok or endpoint is None else retry_delay(item.attempts + 1, self._scale)
        outcome = "delivered" if ok else ("retry" if delay is not None else "failed")
        if status is not None and not ok:
            error = f"HTTP {status}"
        attempt = WebhookAttempt(
            item.event_id, item.type, started, status, error, duration, outcome
        )
        next_attempt = None if delay is None else time.time() + delay
        try:
            await self._store.finish(item, attempt, next_attempt)
        except Exception as exc:  # the lease ends and the row is tried again
            logs.event("webhook.error", logging.ERROR, reason=str(exc)[:200])
            return
        logs.event(  # literal names: a test holds docs/logging.md to them
            "webhook.delivered"
            if ok
            else ("webhook.retry" if delay is not None else "webhook.failed"),
            logging.INFO if ok else logging.WARNING,
            webhook=item.endpoint,
            type=item.type,
            id=item.event_id,
            attempt=item.attempts + 1,
            status=status,
            error=error,
            ms=round(duration * 1000),
        )

    async def _post(self, endpoint: Endpoint, item: OutboxItem) -> int:
        scheme, host, port = check_url(endpoint.url, self._allow_private)
        address = await resolve(host, port, self._allow_private)
        parts = urlsplit(endpoint.url)
        shown = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        target = urlunsplit((scheme, f"{shown}:{port}", parts.path or "/", parts.query, ""))
        body = item.body.encode()
        headers = signing.headers(
            signing.secret_key(endpoint.secret), item.event_id, int(time.time()), body
        )
        default_port = 443 if scheme == "https" else 80
        named = f"[{host}]" if ":" in host else host
        headers["host"] = named if port == default_port else f"{named}:{port}"
        headers["user-agent"] = "relaygate-webhooks"
        request = self._client.build_request(
            "POST", target, content=body, headers=headers, extensions={"sni_hostname": host}
        )
        async with asyncio.timeout(TIMEOUT):
            response = await self._client.send(request, stream=True)
            await response.aclose()  # the body is not read: a status is all we need
        return response.status_code
