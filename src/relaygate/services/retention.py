"""Retention: old messages, their bodies, and settled webhook rows removed in
the background ([retention] in the config).

Each round removes rows a batch at a time (BATCH rows, one short transaction
each) with a pause between, so on SQLite the write lock is held for
milliseconds and the spool writer's group commit never waits long behind it.
Messages still waiting for delivery (a queued or sending row) are never
removed. One process per node runs it (``runs_here``); on PostgreSQL nodes
take turns per batch (an advisory lock, storage/postgres/messages.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relaygate import logs
from relaygate.config import Config, RetentionConfig
from relaygate.storage.api import MessageLog, Webhooks
from relaygate.storage.errors import STORAGE_ERRORS
from relaygate.storage.node import open_admin_storage
from relaygate.storage.postgres.pool import PostgresUnavailable
from relaygate.storage.sqlite import DatabaseError

BATCH = 200  # rows per transaction (milliseconds of lock on SQLite)
# Seconds between batches: longer than a batch holds the lock, so a writer
# waiting in SQLite's busy handler (it sleeps up to 100 ms at a time) gets in.
PAUSE = 0.2
MAX_BATCHES = 500  # per kind per round (100,000 rows, 100 s): the rest waits for the next round
INTERVAL = 60.0  # seconds between rounds
INTERVAL_ENV = "RELAYGATE_RETENTION_INTERVAL"  # seconds; for tests and impatient admins
WEBHOOK_MIN_AGE = 3600  # settled webhook rows outlive the collectors' re-read window


_OPEN_ERRORS: tuple[type[BaseException], ...] = (
    *STORAGE_ERRORS,
    PostgresUnavailable,
    DatabaseError,
)


@dataclass(frozen=True, slots=True)
class Pruned:
    messages: int = 0
    bodies: int = 0
    webhooks: int = 0

    @property
    def any(self) -> bool:
        return bool(self.messages or self.bodies or self.webhooks)


class Retention:
    def __init__(
        self,
        log: MessageLog,
        webhooks: Webhooks,
        config: RetentionConfig,
        *,
        batch: int = BATCH,
        pause: float = PAUSE,
    ) -> None:
        self._log = log
        self._webhooks = webhooks
        self._config = config
        self._batch = batch
        self._pause = pause

    async def cutoff(self, now: float) -> float | None:
        """Messages received before this go (max_age and max_messages); None: none."""
        cutoffs: list[float] = []
        if self._config.max_age is not None:
            cutoffs.append(now - self._config.max_age)
        if self._config.max_messages:
            kept_from = await self._log.count_cutoff(self._config.max_messages)
            if kept_from is not None:
                cutoffs.append(kept_from)
        return max(cutoffs) if cutoffs else None

    async def round(self, now: float) -> Pruned:
        config = self._config
        messages = bodies = webhooks = 0
        before = await self.cutoff(now)
        if before is not None:
            messages = await self._batches(lambda: self._log.prune(before, self._batch))
        if config.body_max_age is not None:
            bodies_before = now - config.body_max_age
            bodies = await self._batches(
                lambda: self._log.prune_bodies(bodies_before, self._batch, now)
            )
        if config.max_age is not None:
            hooks_before = now - max(config.max_age, WEBHOOK_MIN_AGE)
            webhooks = await self._batches(lambda: self._webhooks.prune(hooks_before, self._batch))
        return Pruned(messages, bodies, webhooks)

    async def _batches(self, step: Callable[[], Awaitable[int]]) -> int:
        return await in_batches(step, self._batch, self._pause, MAX_BATCHES)


async def in_batches(
    step: Callable[[], Awaitable[int]], batch: int, pause: float, most: int
) -> int:
    """Run ``step`` (one short transaction removing up to ``batch`` rows) until
    it removes fewer, at most ``most`` times, pausing between so other writers
    get the lock; how many rows in all."""
    total = 0
    for _ in range(most):
        count = await step()
        total += count
        if count < batch:
            break
        await asyncio.sleep(pause)
    return total


def interval() -> float:
    """Seconds between rounds: INTERVAL, or $RELAYGATE_RETENTION_INTERVAL."""
    text = os.environ.get(INTERVAL_ENV)
    if not text:
        return INTERVAL
    try:
        value = float(text)
    except ValueError:
        return INTERVAL
    return value if 0.1 <= value <= 86400 else INTERVAL


def runs_here(config: Config, worker: int | None) -> bool:
    """Whether this process prunes: the delivery process (``worker`` None) when
    it runs, else worker 0."""
    if config.runs_delivery_process():
        return worker is None
    return worker == 0


def enabled(config: RetentionConfig) -> bool:
    return (
        config.max_age is not None or bool(config.max_messages) or config.body_max_age is not None
    )


async def run_forever(config: Config, settings: Callable[[], RetentionConfig]) -> None:
    """Prune every interval() seconds until cancelled; log ``retention.pruned``.
    ``settings`` gives the [retention] in force now (a reload may change it).
    The first round (and the storage it opens) comes an interval after start,
    not at it: a (re)start has work enough."""
    every = interval()
    while True:
        await asyncio.sleep(every)
        if not enabled(settings()):
            continue
        try:
            store = await open_admin_storage(config)
        except _OPEN_ERRORS as exc:  # try again next round
            logs.event("retention.error", logging.WARNING, reason=" ".join(str(exc).split()))
            continue
        try:
            await _rounds(store.messages, store.webhooks, settings, every)
        finally:
            await store.close()


async def _rounds(
    log: MessageLog, webhooks: Webhooks, settings: Callable[[], RetentionConfig], every: float
) -> None:
    while True:
        started = time.monotonic()
        try:
            pruned = await Retention(log, webhooks, settings()).round(time.time())
        except STORAGE_ERRORS as exc:
            logs.event("retention.error", logging.WARNING, reason=" ".join(str(exc).split()))
        else:
            if pruned.any:
                logs.event(
                    "retention.pruned",
                    messages=pruned.messages,
                    bodies=pruned.bodies,
                    webhooks=pruned.webhooks,
                    seconds=round(time.monotonic() - started, 3),
                )
        await asyncio.sleep(every)
