"""The webhook outbox contract (storage.api.Webhooks), the same on SQLite and PostgreSQL:
events come from committed messages and delivery attempts, once per endpoint
that wants them, with stable ids; claims lease; attempts are recorded."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from postgres_helpers import scratch_database
from psycopg_pool import AsyncConnectionPool
from test_storage_contract import Backend, PostgresBackend, SQLiteBackend, _message, run

from relaygate.storage.api import WebhookAttempt, WebhookNotFound, Webhooks
from relaygate.storage.postgres.webhooks import PostgresWebhooks
from relaygate.storage.sqlite_backend import SQLiteStorage
from relaygate.webhooks.events import Endpoint, ping_event

ALL = Endpoint("cfg_all", "http://127.0.0.1:9/", (), "whsec_x", "config")
BOUNCES = Endpoint("cfg_b", "http://127.0.0.1:9/", ("message.delivered",), "whsec_x", "config")


@pytest.fixture(params=("sqlite", "postgresql"))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLiteBackend(tmp_path)
        return
    with scratch_database() as url:
        yield PostgresBackend(url)


@asynccontextmanager
async def _webhooks(backend: Backend) -> AsyncIterator[Webhooks]:
    if isinstance(backend, SQLiteBackend):
        store = SQLiteStorage(backend.database)
        try:
            yield store.webhooks
        finally:
            await store.close()
        return
    async with AsyncConnectionPool(backend.url, min_size=1, max_size=2) as pool:
        yield PostgresWebhooks(pool, "node-a")


def test_committed_events_are_queued_once_per_subscribing_endpoint(backend: Backend) -> None:
    async def first() -> None:
        async with _webhooks(backend) as hooks:
            assert await hooks.collect([ALL, BOUNCES], time.time(), 100) == 0  # from now on

    run(first())
    now = time.time()
    accepted = [_message("one", now), _message("two", now)]
    backend.accept(accepted)
    backend.record_attempt(accepted[0].id, "delivered", "250 2.0.0 ok")

    async def check() -> None:
        async with _webhooks(backend) as hooks:
            assert await hooks.collect([ALL, BOUNCES], time.time() + 5, 100) == 4
            assert await hooks.collect([ALL, BOUNCES], time.time() + 6, 100) == 0
            items = await hooks.claim(time.time() + 6, 10, 60)
            assert sorted((i.endpoint, i.type) for i in items) == [
                ("cfg_all", "message.accepted"),
                ("cfg_all", "message.accepted"),
                ("cfg_all", "message.delivered"),
                ("cfg_b", "message.delivered"),
            ]
            delivered = [i for i in items if i.type == "message.delivered"]
            assert delivered[0].event_id == delivered[1].event_id  # one event, two endpoints
            body = json.loads(delivered[0].body)
            assert body["data"]["message_id"] == accepted[0].id
            assert body["data"]["remote_reply"] == "250 2.0.0 ok"
            assert body["data"]["recipients"] == ["r@example.net"]
            assert await hooks.claim(time.time() + 6, 10, 60) == []  # leased

    run(check())


def test_retries_keep_the_event_id_and_attempts_are_recorded(backend: Backend) -> None:
    async def check() -> None:
        async with _webhooks(backend) as hooks:
            now = time.time()
            event = ping_event("cfg_all", now)
            await hooks.enqueue("cfg_all", event, now)
            await hooks.enqueue("cfg_all", event, now)  # the same event twice: one row
            (item,) = await hooks.claim(now, 10, 60)
            failed = WebhookAttempt(event.id, event.type, now, 500, "HTTP 500", 0.01, "retry")
            await hooks.finish(item, failed, now + 30)
            assert await hooks.claim(now + 29, 10, 60) == []
            (again,) = await hooks.claim(now + 31, 10, 60)
            assert (again.id, again.event_id, again.attempts) == (item.id, event.id, 1)
            ok = WebhookAttempt(event.id, event.type, now + 31, 204, None, 0.02, "delivered")
            await hooks.finish(again, ok, None)
            assert await hooks.claim(now + 10_000, 10, 60) == []
            attempts = await hooks.attempts("cfg_all", 10)
            assert [(a.status_code, a.outcome) for a in attempts] == [
                (204, "delivered"),
                (500, "retry"),
            ]
            assert attempts[0].event_id == event.id

    run(check())


def test_an_expired_lease_gives_the_row_back(backend: Backend) -> None:
    async def check() -> None:
        async with _webhooks(backend) as hooks:
            now = time.time()
            await hooks.enqueue("cfg_all", ping_event("cfg_all", now), now)
            (item,) = await hooks.claim(now, 10, 60)
            assert await hooks.claim(now + 59, 10, 60) == []
            (back,) = await hooks.claim(now + 61, 10, 60)
            assert back.id == item.id

    run(check())


def test_endpoints_made_by_the_api(backend: Backend) -> None:
    async def check() -> None:
        async with _webhooks(backend) as hooks:
            hook = Endpoint(
                "wh_1", "https://h.example/x", ("auth.throttled",), "whsec_k", "api", 5.0
            )
            await hooks.add(hook)
            assert await hooks.endpoints() == [hook]
            changed = await hooks.update("wh_1", "https://h.example/y", ())
            assert (changed.url, changed.events, changed.secret) == (
                "https://h.example/y",
                (),
                "whsec_k",
            )
            with pytest.raises(WebhookNotFound):
                await hooks.update("wh_2", "https://h.example/z", None)
            assert await hooks.remove("wh_1")
            assert not await hooks.remove("wh_1")
            assert await hooks.endpoints() == []

    run(check())


def test_a_restarted_sender_takes_back_what_it_held(backend: Backend) -> None:
    async def hold() -> float:
        async with _webhooks(backend) as hooks:
            now = time.time()
            await hooks.enqueue("cfg_all", ping_event("cfg_all", now), now)
            assert len(await hooks.claim(now, 10, 60)) == 1
            return now

    now = run(hold())

    async def again() -> None:
        async with _webhooks(backend) as hooks:  # the same node, started again
            assert len(await hooks.claim(now + 1, 10, 60)) == 1

    run(again())
