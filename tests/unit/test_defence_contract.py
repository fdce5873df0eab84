"""storage.api.Defence on every backend, with the delivery queue it guards.

Messages go in through each backend's own acceptance (as the server does);
the queue is claimed as the delivery process claims it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from postgres_helpers import scratch_database
from test_acceptance_contract import ALICE, Backend, Postgres, SQLite, _message

from relaygate.config import SendingLimits
from relaygate.defence import Trigger
from relaygate.quotas import Usage, account_scope
from relaygate.storage.api import Defence, DeliveryQueue, MessageLog
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.sqlite_backend import SQLiteStorage

KEY = ALICE.lower()
TRIGGER = Trigger("volume", "13 messages this hour > 12", {"messages": 13})


async def _nothing() -> None:
    pass


@asynccontextmanager
async def _opened(backend: Backend) -> AsyncIterator[tuple[Defence, DeliveryQueue]]:
    async with _all(backend) as (defence, queue, _):
        yield defence, queue


@asynccontextmanager
async def _all(backend: Backend) -> AsyncIterator[tuple[Defence, DeliveryQueue, MessageLog]]:
    if isinstance(backend, SQLite):
        store = SQLiteStorage(backend.database)
        try:
            yield store.defence, store.queue, store.messages
        finally:
            await store.close()
        return
    assert isinstance(backend, Postgres)
    shared = await PostgresStorage.open(backend.url, 4, _nothing)
    try:
        yield shared.defence, shared.delivery_queue("node-a", 60.0), shared.messages
    finally:
        await shared.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLite(tmp_path)
        return
    with scratch_database() as url:
        yield Postgres(url)


def _accept(
    backend: Backend, count: int, *, status: str = "queued", bounce: bool = False
) -> list[str]:
    now = time.time() - 1
    scope = account_scope(ALICE, None, SendingLimits(0, 0, 0, 0))
    messages = []
    for _ in range(count):
        m = _message(["r@example.net"], now=now)
        m.status = status
        m.usage = Usage([scope], ALICE, m.recipients, m.recipients, now)
        if bounce:
            m.mail_from = ""
        messages.append(m)

    async def go() -> None:
        async with backend.open() as opened:  # type: ignore[attr-defined]
            await asyncio.gather(*(opened.acceptance.store(m) for m in messages))

    asyncio.run(go())
    return [m.id for m in messages]


def test_held_mail_is_never_claimed_and_release_queues_it_exactly_once(backend: Backend) -> None:
    before = _accept(backend, 3)

    async def hold() -> int | None:
        async with _opened(backend) as (defence, _):
            first = await defence.hold(KEY, TRIGGER, time.time())
            assert await defence.hold(KEY, TRIGGER, time.time()) is None  # held already
            return first

    assert asyncio.run(hold()) == 3
    late = _accept(backend, 1)  # a worker that had not seen the hold: stored as queued
    stored_held = _accept(backend, 2, status="held")
    bounces = _accept(backend, 1, bounce=True)  # to the account's own sender: not held

    async def go() -> None:
        async with _opened(backend) as (defence, queue):
            claimed = await queue.claim(time.time(), 100)
            assert [d.message_id for d in claimed] == bounces
            [entry] = await defence.held()
            # 3 held at the hold, 2 stored held, 1 queued after it: all wait.
            assert (entry.account, entry.reason, entry.messages) == (KEY, "volume", 6)
            assert entry.counts == {"messages": 13}
            # Two admins press "release" at once: the mail is queued once.
            results = await asyncio.gather(
                defence.release(KEY, time.time(), time.time() + 3600),
                defence.release(KEY, time.time(), time.time() + 3600),
            )
            released = [r for r in results if r is not None]
            assert len(released) == 1
            assert sorted(released[0]) == sorted(before + late + stored_held)
            claimed = await queue.claim(time.time() + 1, 100)
            assert sorted(d.message_id for d in claimed) == sorted(before + late + stored_held)
            assert await queue.claim(time.time() + 1, 100) == []
            assert await defence.held() == []
            activity = await defence.activity(KEY, time.time())
            assert not activity.held and activity.expected_until is not None
            assert activity.expected_messages == 7  # this hour's messages at the release

    asyncio.run(go())


def test_purge_drops_held_and_late_mail_and_lifts_the_hold(backend: Backend) -> None:
    held = _accept(backend, 2)

    async def go() -> None:
        async with _opened(backend) as (defence, _queue):
            await defence.hold(KEY, TRIGGER, time.time())

    asyncio.run(go())
    late = _accept(backend, 1)

    async def purge() -> None:
        async with _opened(backend) as (defence, queue):
            purged = await defence.purge(KEY, time.time())
            assert purged is not None and sorted(purged) == sorted(held + late)
            assert await defence.purge(KEY, time.time()) is None
            assert await queue.claim(time.time() + 1, 100) == []
            assert await defence.held() == []
            assert not (await defence.activity(KEY, time.time())).held

    asyncio.run(purge())


def test_activity_baseline_and_new_networks(backend: Backend) -> None:
    _accept(backend, 4)

    async def go() -> None:
        async with _opened(backend) as (defence, _):
            now = time.time()
            first = await defence.activity(KEY, now)
            assert (first.messages, first.recipients, first.baseline) == (4, 4, 0)
            assert first.new_network_at is None
            await defence.seen(KEY, "192.0.2.0/24", "laptop", now)
            assert (await defence.activity(KEY, now)).new_network_at is None  # the first one
            await defence.seen(KEY, "192.0.2.0/24", "laptop", now + 1)
            await defence.seen(KEY, "198.51.100.0/24", "bot\r\nx", now + 2)
            await defence.seen(KEY, "192.0.2.0/24", "laptop", now + 2.5)  # known: not new
            roaming = await defence.activity(KEY, now + 3)
            assert (roaming.new_network_at, roaming.new_network) == (now + 2, "198.51.100.0/24")
            seen = [
                (s.kind, s.value, s.first_seen, s.last_seen, s.novel)
                for s in await defence.sightings(KEY, 10)
            ]
            assert seen == [
                ("network", "192.0.2.0/24", now, now + 2.5, False),
                ("client", "laptop", now, now + 2.5, False),
                ("network", "198.51.100.0/24", now + 2, now + 2, True),
                ("client", "bot\r\nx", now + 2, now + 2, False),  # stored as given
            ]
            assert len(await defence.sightings(KEY, 1)) == 1
            assert await defence.sightings("nobody@example.com", 10) == []
            assert (await defence.activity(KEY, now + 3700)).new_network_at is None
            # An hour later this hour is part of the baseline.
            assert (await defence.activity(KEY, now + 3600)).baseline == 4
            await defence.expect(KEY, now + 60, 500)
            expected = await defence.activity(KEY, now)
            assert replace(expected, messages=0).expected_messages == 500

    asyncio.run(go())


def test_retention_keeps_held_mail_and_queue_delete_stops_it(backend: Backend) -> None:
    kept, deleted = _accept(backend, 2)

    async def go() -> None:
        async with _all(backend) as (defence, queue, messages):
            await defence.hold(KEY, TRIGGER, time.time())
            future = time.time() + 86400
            assert await messages.prune(future, 100) == 0  # held: waits for an admin
            assert await messages.prune_bodies(future, 100, time.time()) == 0
            assert await queue.delete(deleted, time.time()) == 1
            [entry] = await defence.held()
            assert entry.messages == 1
            released = await defence.release(KEY, time.time(), time.time() + 60)
            assert released == [kept]
            assert [d.message_id for d in await queue.claim(time.time() + 1, 10)] == [kept]

    asyncio.run(go())
