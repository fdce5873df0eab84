"""storage.api.HourlyStats and DeliveryQueue.summary on every backend (issue 9).

The hourly stats are added to by several processes (and nodes) at once, so
the contract is: an add sums into the hour's row, a read returns the range's
rows, a prune forgets the old hours; and the report (stats.report) has every
hour of its range, zeros included. The queue summary is what /metrics reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from postgres_helpers import scratch_database
from test_acceptance_contract import Backend, Postgres, SQLite, _message

from relaygate import stats
from relaygate.delivery.queue import Outcome
from relaygate.services.admin import StatsAdmin
from relaygate.storage.api import DeliveryQueue, HourlyStats, StatRow
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.sqlite_backend import SQLiteStorage

HOUR = 3600


async def _nothing() -> None:
    pass


@asynccontextmanager
async def _stores(backend: Backend) -> AsyncIterator[tuple[HourlyStats, DeliveryQueue]]:
    if isinstance(backend, SQLite):
        store = SQLiteStorage(backend.database)
        try:
            yield store.stats, store.queue
        finally:
            await store.close()
        return
    assert isinstance(backend, Postgres)
    shared = await PostgresStorage.open(backend.url, 3, _nothing)
    try:
        yield shared.stats, shared.delivery_queue("node-a", 60.0)
    finally:
        await shared.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLite(tmp_path)
        return
    with scratch_database() as url:
        yield Postgres(url)


def test_adds_sum_into_the_hour_and_prune_forgets_old_hours(backend: Backend) -> None:
    now = time.time()
    this = stats.hour_of(now)

    async def go() -> None:
        async with _stores(backend) as (store, _):
            await store.add(
                [StatRow(this, "accepted", "", 2), StatRow(this, "refused", "limit", 1)]
            )
            # Another process's flush of the same hour, and a repeated key in one flush.
            await store.add(
                [
                    StatRow(this, "accepted", "", 3),
                    StatRow(this, "refused", "limit", 1),
                    StatRow(this, "refused", "limit", 1),
                    StatRow(this - HOUR, "delivered", "", 7),
                    StatRow(this - 100 * 24 * HOUR, "accepted", "", 9),
                ]
            )
            rows = await store.read(this - HOUR, this + HOUR)
            assert rows == [
                StatRow(this - HOUR, "delivered", "", 7),
                StatRow(this, "accepted", "", 5),
                StatRow(this, "refused", "limit", 3),
            ]
            await stats.prune(store, now)
            assert await store.read(0, this + HOUR) == rows  # 100 days ago is gone

            report = await StatsAdmin(store).hourly(3)
            assert [h.hour for h in report] == [this - 2 * HOUR, this - HOUR, this]
            assert report[0].as_json()["accepted"] == 0  # an hour of nothing is there
            assert report[1].delivered == 7
            assert report[2].as_json() == {
                "hour": time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(now)),
                "accepted": 5,
                "delivered": 0,
                "deferred": 0,
                "bounced": 0,
                "refused": {"limit": 3},
                "login_failures": 0,
            }
            for hours in (0, stats.MAX_HOURS + 1):
                with pytest.raises(ValueError, match="hours must be"):
                    await StatsAdmin(store).hourly(hours)

    asyncio.run(go())


def test_queue_summary_counts_rows_by_state_and_the_oldest(backend: Backend) -> None:
    async def go() -> None:
        async with _stores(backend) as (_, queue):
            empty = await queue.summary()
            assert empty.counts == {"queued": 0, "deferred": 0, "sending": 0, "held": 0}
            assert empty.oldest is None
        old = time.time() - 50
        messages = [_message(["r@example.net", "s@example.org"], now=old + i) for i in range(3)]
        async with backend.open() as opened:  # type: ignore[attr-defined]
            await asyncio.gather(*(opened.acceptance.store(m) for m in messages))
        async with _stores(backend) as (_, queue):
            summary = await queue.summary()
            assert summary.counts == {"queued": 6, "deferred": 0, "sending": 0, "held": 0}
            assert summary.oldest == pytest.approx(old, abs=1)
            now = time.time()
            claimed = await queue.claim(now, 3)
            first = claimed[0]
            later = Outcome(deferred=tuple((r, "451 4.3.0 later") for r in first.recipients))
            await queue.finish(first, later, now, now + 60, None)
            done = Outcome(delivered=claimed[1].recipients, reply="250 ok")
            await queue.finish(claimed[1], done, now, now, None)
            summary = await queue.summary()
            assert summary.counts == {"queued": 3, "deferred": 1, "sending": 1, "held": 0}
        # Held by the defence: counted apart, and older than the rest without
        # being "the oldest waiting" (it waits on a person, not on delivery).
        held = _message(["r@example.net"], now=old - 3600)
        held.status = "held"
        async with backend.open() as opened:  # type: ignore[attr-defined]
            await opened.acceptance.store(held)
        async with _stores(backend) as (_, queue):
            summary = await queue.summary()
            assert summary.counts == {"queued": 3, "deferred": 1, "sending": 1, "held": 1}
            assert summary.oldest == pytest.approx(old, abs=1)
            entries = {e.id: e.status for e in await queue.entries()}
            assert entries[held.id] == "held" and len(entries) == 4

    asyncio.run(go())
