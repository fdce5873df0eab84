"""Account and login events for webhooks, raised in the SMTP workers.

``account.limit_reached`` and ``auth.throttled`` happen on the SMTP path, so
raising one costs nothing there: when no webhook wants the type it is one set
look-up; otherwise one event per (type, account or IP) per minute at most, and
its outbox rows are written in the background (nobody waits for them). The
event id carries the minute, so workers and nodes that see the same storm
queue it once (the outbox's (endpoint, event id) key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from relaygate import logs
from relaygate.storage.api import Webhooks
from relaygate.webhooks import events as ev
from relaygate.webhooks.events import Endpoint
from relaygate.webhooks.schedule import time_scale

REFRESH_INTERVAL = 30.0  # API-made webhooks are re-read this often
_MAX_REMEMBERED = 10_000


class EventNotices:
    def __init__(self, store: Webhooks, configured: Sequence[Endpoint]) -> None:
        self._store = store
        self._configured = list(configured)
        self._endpoints = list(configured)
        self._refreshed = 0.0
        self._interval = max(1.0, REFRESH_INTERVAL / time_scale())  # tests: sooner
        self._refreshing = False
        self._last: dict[tuple[str, str], float] = {}
        self._background: set[asyncio.Future[None]] = set()

    def wants(self, event_type: str) -> bool:
        self._maybe_refresh()
        return any(e.wants(event_type) for e in self._endpoints)

    def emit(self, event_type: str, key: str, data: dict[str, object]) -> None:
        """Queue ``event_type`` about ``key`` (an account, an IP) unless sent this minute."""
        if not self.wants(event_type):
            return
        now = time.time()
        minute = int(now // 60)
        if self._last.get((event_type, key), -1) == minute:
            return
        if len(self._last) > _MAX_REMEMBERED:
            self._last.clear()
        self._last[(event_type, key)] = minute
        event = ev.keyed_event(event_type, key, minute, data, now)
        self._later(enqueue(self._store, self._endpoints, event, now))

    def _maybe_refresh(self) -> None:
        now = time.time()
        if self._refreshing or now - self._refreshed < self._interval:
            return
        self._refreshing = True
        self._refreshed = now
        self._later(self._refresh())

    async def _refresh(self) -> None:
        try:
            self._endpoints = [*self._configured, *await self._store.endpoints()]
        finally:
            self._refreshing = False

    def _later(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            future = asyncio.ensure_future(work)
        except RuntimeError:
            work.close()
            return  # no loop (shutting down)
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        future.add_done_callback(_report)


def _report(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logs.event("webhook.error", logging.ERROR, reason=str(future.exception())[:200])


async def enqueue(
    store: Webhooks, endpoints: Sequence[Endpoint], event: ev.Event, now: float
) -> None:
    """Queue ``event`` for each endpoint that wants it (the sender delivers it)."""
    for endpoint_id, wanted in ev.fan_out(endpoints, [event]):
        await store.enqueue(endpoint_id, wanted, now)
