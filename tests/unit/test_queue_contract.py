"""storage.api.DeliveryQueue and PolicyCache on every backend (issue 8).

Messages go in through each backend's own acceptance (as the server does);
then the queue is worked as the delivery process and the CLI work it. The
PostgreSQL-only tests are what several nodes add: disjoint claims, leases
that expire and are taken over, a finish that lost its lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from postgres_helpers import scratch_database
from test_acceptance_contract import Backend, Postgres, SQLite, _message

from relaygate.delivery import queue as q
from relaygate.delivery.queue import Delivery, Outcome
from relaygate.services.admin import NotFound, QueueAdmin
from relaygate.storage import sqlite_queue
from relaygate.storage.api import DeliveryQueue, LeaseLost, Notice, PolicyCache, Takeover
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.sqlite_accounts import same
from relaygate.storage.sqlite_backend import SQLiteStorage
from relaygate.storage.sqlite_queue import SQLitePolicyCache


async def _nothing() -> None:
    pass


@asynccontextmanager
async def _queue(
    backend: Backend, node: str = "node-a", lease: float = 60.0
) -> AsyncIterator[tuple[DeliveryQueue, PolicyCache]]:
    if isinstance(backend, SQLite):
        store = SQLiteStorage(backend.database)
        try:
            yield store.queue, SQLitePolicyCache(store._thread, same)
        finally:
            await store.close()
        return
    assert isinstance(backend, Postgres)
    shared = await PostgresStorage.open(backend.url, 3, _nothing)
    try:
        yield shared.delivery_queue(node, lease), shared.policies
    finally:
        await shared.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLite(tmp_path)
        return
    with scratch_database() as url:
        yield Postgres(url)


def _accept(backend: Backend, count: int, recipients: list[str]) -> list[str]:
    now = time.time() - 1
    messages = [_message(recipients, now=now) for _ in range(count)]

    async def go(b: Backend) -> None:
        await asyncio.gather(*(b.acceptance.store(m) for m in messages))

    asyncio.run(_opened(backend, go))
    return [m.id for m in messages]


async def _opened(backend: Backend, work: object) -> None:
    async with backend.open() as opened:  # type: ignore[attr-defined]
        await work(opened)  # type: ignore[operator]


def test_claim_finish_retry_delete_and_the_message_status(backend: Backend) -> None:
    ids = _accept(backend, 3, ["r@example.net", "s@example.org"])

    async def go() -> None:
        async with _queue(backend) as (queue, _):
            now = time.time()
            claimed = await queue.claim(now, 100)
            assert sorted({d.message_id for d in claimed}) == sorted(ids)
            assert len(claimed) == 6  # one row per message and domain
            assert await queue.claim(now, 100) == []  # nothing twice
            entries = await queue.entries()
            assert {e.status for e in entries} == {"sending"}
            by_message: dict[str, list[Delivery]] = {}
            for d in claimed:
                by_message.setdefault(d.message_id, []).append(d)
            first, second, third = ids
            # first: both domains delivered.
            for d in by_message[first]:
                done = Outcome(delivered=d.recipients, host="mx.test", reply="250 ok")
                assert await queue.finish(d, done, now, now + 60, None) is None
            # second: one delivered, one deferred a minute.
            a, b = sorted(by_message[second], key=lambda d: d.domain)
            await queue.finish(a, Outcome(delivered=a.recipients, reply="250 ok"), now, now, None)
            deferred = Outcome(deferred=tuple((r, "451 4.3.0 later") for r in b.recipients))
            await queue.finish(b, deferred, now, now + 60, None)
            # third: released unchanged, due now.
            for d in by_message[third]:
                await queue.release(d.id, now, now)
            left = await queue.entries()
            assert sorted((e.id, e.domain, e.status) for e in left) == sorted(
                [(second, "example.org", "queued")]
                + [(third, d, "queued") for d in ("example.net", "example.org")]
            )
            later = next(e for e in left if e.id == second)
            assert later.attempts == 1 and later.last_reply == "451 4.3.0 later"
            assert later.next_attempt >= now + 59
            admin = QueueAdmin(queue)
            assert await admin.retry(second) == 1
            again = await queue.claim(time.time(), 100)
            assert {d.message_id for d in again} == {second, third}
            for d in again:
                await queue.release(d.id, time.time(), time.time())
            assert await admin.delete(third) == 2
            with pytest.raises(NotFound, match="nothing queued"):
                await admin.delete(third)
            assert await queue.arrival(first) is not None
            assert (await queue.body(first) or b"").endswith(b"\r\n")

        async with backend.open() as opened:  # type: ignore[attr-defined]
            statuses = {m: (await opened.log.get(m)).status for m in ids}
        assert statuses == {first: "delivered", second: "partly delivered", third: "deleted"}

    asyncio.run(go())


def test_the_message_status_follows_each_finish(backend: Backend) -> None:
    """Failures, deferrals then deliveries: the same statuses on every backend."""
    mixed, lone = _accept(backend, 2, ["r@example.net", "s@example.org"])

    async def status(message_id: str) -> str:
        async with backend.open() as opened:  # type: ignore[attr-defined]
            return str((await opened.log.get(message_id)).status)

    async def go() -> None:
        async with _queue(backend) as (queue, _):
            now = time.time()
            rows = {(d.message_id, d.domain): d for d in await queue.claim(now, 100)}
            net, org = rows[(mixed, "example.net")], rows[(mixed, "example.org")]
            failed = Outcome(failed=tuple((r, "550 5.1.1 no such user") for r in net.recipients))
            await queue.finish(net, failed, now, now, None)
            assert await status(mixed) == "partly delivered"  # one final, one pending
            later = Outcome(deferred=tuple((r, "451 4.3.0 later") for r in org.recipients))
            await queue.finish(org, later, now, now, None)
            assert await status(mixed) == "partly delivered"
            (org_again,) = await queue.claim(time.time(), 100)
            done = Outcome(delivered=org_again.recipients, reply="250 ok")
            await queue.finish(org_again, done, now, now, None)
            assert await status(mixed) == "partly failed"
            for d in (rows[(lone, "example.net")], rows[(lone, "example.org")]):
                await queue.finish(
                    d,
                    failed
                    if d.domain == "example.net"
                    else Outcome(failed=tuple((r, "554 5.7.1 refused") for r in d.recipients)),
                    now,
                    now,
                    None,
                )
            assert await status(lone) == "failed"

    asyncio.run(go())


def test_a_failure_is_stored_with_its_bounce(backend: Backend) -> None:
    [queue_id] = _accept(backend, 1, ["r@example.net"])

    async def go() -> None:
        async with _queue(backend) as (queue, _):
            [row] = await queue.claim(time.time(), 10)
            failed = Outcome(failed=(("r@example.net", "550 5.1.1 no such user"),))
            bounce = b"Subject: bounce\r\n\r\nx\r\n"
            notice = Notice(row.account, "sender@example.org", bounce, False)
            dsn_id = await queue.finish(row, failed, time.time(), time.time(), notice)
            assert dsn_id is not None and dsn_id != queue_id
            entries = await queue.entries()
            assert [(e.id, e.domain, e.mail_from) for e in entries] == [(dsn_id, "example.org", "")]
            assert await queue.body(dsn_id) == bounce

    asyncio.run(go())


async def _add_account(backend: Backend, address: str) -> None:
    if isinstance(backend, SQLite):
        store = SQLiteStorage(backend.database)
        try:
            await store.accounts.add(address, "not-a-hash", None, None)
        finally:
            await store.close()
        return
    assert isinstance(backend, Postgres)
    shared = await PostgresStorage.open(backend.url, 1, _nothing)
    try:
        await shared.accounts.add(address, "not-a-hash", None, None)
    finally:
        await shared.close()


def test_a_bounce_for_a_local_account_is_kept_or_queued(backend: Backend) -> None:
    """bounce_to = "capture" (keep_local): a DSN for one of our accounts stays in
    the log; bounce_to = "sender": it is queued like any message, to that address."""
    ids = _accept(backend, 2, ["r@example.net"])

    async def go() -> None:
        await _add_account(backend, "alice@example.org")
        async with _queue(backend) as (queue, _):
            rows = sorted(await queue.claim(time.time(), 10), key=lambda r: r.message_id)
            assert [r.message_id for r in rows] == sorted(ids)
            failed = Outcome(failed=(("r@example.net", "550 5.1.1 no such user"),))
            bounce = b"Subject: bounce\r\n\r\nx\r\n"
            kept = await queue.finish(
                rows[0],
                failed,
                time.time(),
                time.time(),
                Notice(rows[0].account, "Alice@example.org", bounce, False, keep_local=True),
            )
            assert kept is not None and await queue.body(kept) == bounce
            dsns = [e for e in await queue.entries() if e.mail_from == ""]
            assert dsns == []  # captured: nothing to deliver
            sent = await queue.finish(
                rows[1],
                failed,
                time.time(),
                time.time(),
                Notice(rows[1].account, "Alice@example.org", bounce, False, keep_local=False),
            )
            assert sent is not None and sent != kept
            dsns = [e for e in await queue.entries() if e.mail_from == ""]
            assert [(e.id, e.domain, e.recipients) for e in dsns] == [
                (sent, "example.org", ("Alice@example.org",))
            ]

    asyncio.run(go())


def test_sqlite_outcomes_finished_together_share_a_commit_and_fail_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = SQLite(tmp_path)
    ids = _accept(backend, 6, ["r@example.net"])
    real_record = q.record
    commits: list[int] = []
    real_batch = sqlite_queue._record_batch

    def counting_batch(*args: Any) -> Any:
        commits.append(len(args[1]))
        return real_batch(*args)

    def record(db: Any, delivery: Delivery, *args: Any, **kwargs: Any) -> None:
        if delivery.message_id == ids[2]:
            db.execute("UPDATE deliveries SET status = 'broken' WHERE id = ?", (delivery.id,))
            raise ValueError("cannot store this one")
        real_record(db, delivery, *args, **kwargs)

    monkeypatch.setattr(q, "record", record)
    monkeypatch.setattr(sqlite_queue, "_record_batch", counting_batch)

    async def go() -> None:
        async with _queue(backend) as (queue, _):
            now = time.time()
            rows = await queue.claim(now, 100)
            done = [Outcome(delivered=d.recipients, reply="250 ok") for d in rows]
            results = await asyncio.gather(
                *(queue.finish(d, o, now, now, None) for d, o in zip(rows, done, strict=True)),
                return_exceptions=True,
            )
            failed = [d.message_id for d, r in zip(rows, results, strict=True) if r is not None]
            assert failed == [ids[2]]
            assert [e.id for e in await queue.entries()] == [ids[2]]  # its change rolled back

    asyncio.run(go())
    assert sum(commits) == 6 and len(commits) < 6, commits  # several outcomes per commit


def test_policy_cache_keeps_a_policy_until_it_expires(backend: Backend) -> None:
    async def go() -> None:
        async with _queue(backend) as (_, cache):
            assert await cache.get("example.net", 100.0) is None
            await cache.put("example.net", "id1", "version: STSv1\n", 100.0, 200.0)
            await cache.put("example.net", "id2", "version: STSv1\nmode: none\n", 110.0, 300.0)
            assert await cache.get("example.net", 250.0) == ("id2", "version: STSv1\nmode: none\n")
            assert await cache.get("example.net", 300.0) is None

    asyncio.run(go())


def test_sqlite_rows_left_sending_come_back_once_at_start(tmp_path: Path) -> None:
    backend = SQLite(tmp_path)
    [queue_id] = _accept(backend, 1, ["r@example.net"])

    async def go() -> None:
        async with _queue(backend) as (queue, _):
            assert len(await queue.claim(time.time(), 10)) == 1  # then the process dies
        async with _queue(backend) as (queue, _):
            assert await queue.recover(time.time()) == [Takeover(queue_id, None)]
            assert await queue.recover(time.time()) == []  # only at start
            assert len(await queue.claim(time.time(), 10)) == 1

    asyncio.run(go())


# ------------------------------------------------------------------ several nodes


@pytest.fixture
def shared() -> Iterator[Postgres]:
    with scratch_database() as url:
        yield Postgres(url)


def test_postgresql_nodes_claiming_at_once_never_get_the_same_row(shared: Postgres) -> None:
    _accept(shared, 60, ["r@example.net"])

    async def go() -> None:
        async with _queue(shared, "node-a") as (a, _), _queue(shared, "node-b") as (b, _):
            now = time.time()
            batches = await asyncio.gather(*(q.claim(now, 7) for q in [a, b] * 6))
            ids = [d.id for batch in batches for d in batch]
            assert len(ids) == len(set(ids)) == 60
            holders = {e.node for e in await a.entries()}
            assert holders == {"node-a", "node-b"}

    asyncio.run(go())


def test_postgresql_one_message_finished_at_once_on_two_connections_ends_delivered(
    shared: Postgres,
) -> None:
    """Two domains of one message finished at the same moment (two processes or
    nodes): the message's status counts both, never a stale 'partly delivered'."""
    ids = _accept(shared, 30, ["r@example.net", "s@example.org"])

    async def go() -> None:
        # Two stores of one node name: two pools, so really concurrent commits.
        async with _queue(shared, "node-a") as (a, _), _queue(shared, "node-a") as (b, _):
            now = time.time()
            rows = await a.claim(now, 100)
            assert len(rows) == 60
            done = {d.id: Outcome(delivered=d.recipients, reply="250 ok") for d in rows}
            await asyncio.gather(
                *(
                    (a if d.domain == "example.net" else b).finish(d, done[d.id], now, now, None)
                    for d in rows
                )
            )
            assert await a.entries() == []
            with pytest.raises(LeaseLost):  # recorded once only
                await b.finish(rows[0], done[rows[0].id], now, now, None)

        async with shared.open() as opened:
            records = [await opened.log.get(m) for m in ids]
        assert {r.status for r in records if r is not None} == {"delivered"}, records
        assert None not in records

    asyncio.run(go())


def test_postgresql_an_expired_lease_is_taken_over_and_the_old_holder_cannot_finish(
    shared: Postgres,
) -> None:
    [queue_id] = _accept(shared, 1, ["r@example.net"])

    async def go() -> None:
        async with (
            _queue(shared, "node-a", lease=10) as (a, _),
            _queue(shared, "node-b", lease=10) as (b, _),
        ):
            now = time.time()
            assert await b.recover(now) == []  # node-b starting: nothing of its own
            [row] = await a.claim(now, 10)
            await a.renew([row.id], now + 5)  # renewed: good until now + 15
            assert await b.recover(now + 12) == []
            assert await b.claim(now + 12, 10) == []
            # node-a stops renewing (killed): after the lease, node-b takes the row over.
            assert await b.recover(now + 16) == [Takeover(queue_id, "node-a")]
            [again] = await b.claim(now + 16, 10)
            assert again.id == row.id
            done = Outcome(delivered=row.recipients, reply="250 ok")
            with pytest.raises(LeaseLost):
                await a.finish(row, done, now + 17, now + 17, None)
            await a.release(row.id, now, now)  # no effect either: not a's row
            assert [e.node for e in await b.entries()] == ["node-b"]
            assert await b.finish(again, done, now + 18, now + 18, None) is None
            assert await b.entries() == []

    asyncio.run(go())


def test_postgresql_a_restarted_node_takes_back_its_own_rows_at_once(shared: Postgres) -> None:
    [queue_id] = _accept(shared, 1, ["r@example.net"])

    async def go() -> None:
        async with _queue(shared, "node-a") as (a, _):
            assert await a.recover(time.time()) == []
            assert len(await a.claim(time.time(), 10)) == 1  # then node-a is killed
        async with _queue(shared, "node-a") as (a, _):
            assert await a.recover(time.time()) == [Takeover(queue_id, "node-a")]
            assert len(await a.claim(time.time(), 10)) == 1

    asyncio.run(go())
