"""Acceptance (messages, bodies, queue rows and counters as one unit of work) and
the sending-limit reads, the same on every storage backend.

SQLite: the spool's writer thread (spool.Spool); PostgreSQL: the group-commit
writer on a pool (storage/postgres/acceptance.py). Each test accepts real
messages, then reads back through the backend's own interfaces.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres_helpers import scratch_database

from relaygate.config import SendingLimits
from relaygate.quotas import Scope, Usage, account_scope
from relaygate.spool import Spool, SpooledMessage, SpoolError, new_queue_id
from relaygate.storage import bodies
from relaygate.storage.api import Acceptance, MessageLog, SendingCounters
from relaygate.storage.postgres import pool as pool_module
from relaygate.storage.postgres.backend import PostgresStorage
from relaygate.storage.sqlite import connect, connect_service
from relaygate.storage.sqlite_backend import SQLiteStorage
from relaygate.storage.sqlite_counters import SQLiteSendingCounters
from relaygate.storage.thread import DatabaseThread

ALICE = "alice@example.com"
LIMITS = SendingLimits(
    messages_per_hour=3, messages_per_day=100, recipients_per_day=5, new_recipients_per_day=3
)


async def _nothing() -> None:
    pass


class Backend:
    """One backend's acceptance, counters and message log, in one event loop."""

    acceptance: Acceptance
    counters: SendingCounters
    log: MessageLog
    name: str

    def queue_rows(self) -> list[tuple[str, str, str]]:
        raise NotImplementedError


class SQLite(Backend):
    name = "sqlite"

    def __init__(self, directory: Path) -> None:
        self.database = directory / "relaygate.db"
        connect(self.database).close()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Backend]:
        loop = asyncio.get_running_loop()
        spool = Spool(self.database, loop, deliver=True)
        thread = DatabaseThread(lambda: connect_service(self.database), loop, "test")
        store = SQLiteStorage(self.database)

        class Closing:
            def store(self, message: SpooledMessage) -> asyncio.Future[None]:
                return spool.store(message)

            async def close(self) -> None:
                await asyncio.to_thread(spool.close)

        self.acceptance = Closing()
        self.counters = SQLiteSendingCounters(thread, lambda c: c.data)
        self.log = store.messages
        try:
            yield self
        finally:
            await self.acceptance.close()
            await asyncio.to_thread(thread.close)
            await store.close()

    def queue_rows(self) -> list[tuple[str, str, str]]:
        with sqlite3.connect(self.database) as db:
            rows = db.execute(
                "SELECT message_id, domain, recipients FROM deliveries ORDER BY message_id, domain"
            ).fetchall()
        return [(str(a), str(b), str(c).replace(" ", "")) for a, b, c in rows]


class Postgres(Backend):
    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        asyncio.run(pool_module.migrate(url))

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Backend]:
        storage = await PostgresStorage.open(self.url, 4, _nothing)
        self.acceptance = storage.acceptance("node-a", deliver=True)
        self.counters = storage.counters
        self.log = storage.messages
        try:
            yield self
        finally:
            await self.acceptance.close()
            await storage.close()

    def queue_rows(self) -> list[tuple[str, str, str]]:
        with psycopg.connect(self.url) as db:
            rows = db.execute(
                "SELECT message_id, domain, recipients::text FROM deliveries"
                " ORDER BY message_id, domain"
            ).fetchall()
        return [(str(a), str(b), str(c).replace(" ", "")) for a, b, c in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLite(tmp_path)
        return
    with scratch_database() as url:
        yield Postgres(url)


def _message(
    recipients: list[str], *, now: float, scope: Scope | None = None, size: int = 10
) -> SpooledMessage:
    usage = None
    if scope is not None:
        usage = Usage([scope], ALICE, recipients, recipients, now)
    return SpooledMessage(
        id=new_queue_id(now),
        account=ALICE,
        client_ip="192.0.2.9",
        mail_from=ALICE,
        recipients=recipients,
        subject="hello",
        body=bytearray(b"Subject: hello\r\n\r\n" + b"y" * size + b"\r\n"),
        created_at=now,
        status="queued",
        usage=usage,
        header=b"Received: from test\r\n",
    )


def run(backend: Backend, work: Any) -> Any:
    async def go() -> Any:
        async with backend.open() as opened:  # type: ignore[attr-defined]
            return await work(opened)

    return asyncio.run(go())


def test_accepted_messages_are_readable_with_their_queue_rows(backend: Backend) -> None:
    now = time.time()
    small = _message(["r@example.net", "s@example.net", "t@example.org"], now=now)
    large = _message(["r@example.net"], now=now, size=bodies.SPILL_BYTES)
    # Over a MiB: PostgreSQL stores it in pieces (storage/postgres/bodies.py).
    huge = _message(["r@example.net"], now=now, size=2 * 1024 * 1024 + 12345)

    async def work(b: Backend) -> None:
        await asyncio.gather(
            b.acceptance.store(small), b.acceptance.store(large), b.acceptance.store(huge)
        )
        for m in (small, large, huge):
            record = await b.log.get(m.id)
            assert record is not None and record.status == "queued"
            assert record.size == m.size
            assert await b.log.body(m.id) == m.header + bytes(m.body)

    run(backend, work)
    rows = backend.queue_rows()
    assert (small.id, "example.net", '["r@example.net","s@example.net"]') in rows
    assert (small.id, "example.org", '["t@example.org"]') in rows
    assert (large.id, "example.net", '["r@example.net"]') in rows
    assert len(rows) == 4


def test_many_sessions_at_once_share_commits_and_all_are_stored(backend: Backend) -> None:
    now = time.time()
    messages = [_message(["r@example.net"], now=now) for _ in range(300)]

    async def work(b: Backend) -> int:
        await asyncio.gather(*(b.acceptance.store(m) for m in messages))
        return len(await b.log.recent(1000))

    assert run(backend, work) == 300


def test_counters_commit_with_the_messages_they_count(backend: Backend) -> None:
    now = time.time()
    scope = account_scope(ALICE, None, LIMITS)

    async def work(b: Backend) -> None:
        assert await b.counters.check_message([scope], now) is None
        refusal, new = await b.counters.check_recipient(
            [scope], ALICE, "r1@example.net", accepted_so_far=0, new_so_far=0, now=now
        )
        assert refusal is None and new
        # Two messages in one batch naming the same new recipient: new only once.
        await asyncio.gather(
            b.acceptance.store(_message(["r1@example.net"], now=now, scope=scope)),
            b.acceptance.store(
                _message(["R1@example.net", "r2@example.net"], now=now, scope=scope)
            ),
        )
        refusal, new = await b.counters.check_recipient(
            [scope], ALICE, "r1@EXAMPLE.net", accepted_so_far=0, new_so_far=0, now=now
        )
        assert refusal is None and not new  # known now, whatever the case
        # 3 recipients counted today: 2 more reach recipients_per_day (5).
        refusal, _ = await b.counters.check_recipient(
            [scope], ALICE, "r1@example.net", accepted_so_far=2, new_so_far=0, now=now
        )
        assert refusal is not None and b"Daily recipient limit (5)" in refusal
        # 2 new recipients today: one more new one is fine, two are not (limit 3).
        refusal, new = await b.counters.check_recipient(
            [scope], ALICE, "r9@example.net", accepted_so_far=0, new_so_far=1, now=now
        )
        assert new and refusal is not None and b"new-recipient limit (3)" in refusal
        await b.acceptance.store(_message(["r1@example.net"], now=now, scope=scope))
        refusal_bytes = await b.counters.check_message([scope], now)
        assert refusal_bytes is not None and refusal_bytes.startswith(b"451 4.7.1 Hourly message")
        other = account_scope("bob@example.com", None, LIMITS)
        assert await b.counters.check_message([other], now) is None
        await b.counters.prune(now)  # today's rows stay
        assert await b.counters.check_message([scope], now) is not None
        await b.counters.prune(now + 3 * 86400)
        assert await b.counters.check_message([scope], now + 3 * 86400) is None

    run(backend, work)


def test_after_close_nothing_more_is_taken(backend: Backend) -> None:
    now = time.time()

    async def work(b: Backend) -> None:
        stored = b.acceptance.store(_message(["r@example.net"], now=now))
        await b.acceptance.close()
        await stored  # what was handed over before close is committed
        with pytest.raises(SpoolError):
            await b.acceptance.store(_message(["r@example.net"], now=now))

    run(backend, work)


def test_postgresql_reads_a_large_body_piece_by_piece_and_only_the_head_when_asked(
    tmp_path: Path,
) -> None:
    from relaygate.storage.postgres import bodies as pg_bodies

    now = time.time()
    huge = _message(["r@example.net"], now=now, size=3 * pg_bodies.CHUNK_BYTES + 7)
    whole = huge.header + bytes(huge.body)
    with scratch_database() as url:
        backend = Postgres(url)

        async def work(b: Backend) -> None:
            await b.acceptance.store(huge)
            storage = await PostgresStorage.open(url, 1, _nothing)
            try:
                async with storage.pool.connection() as connection:
                    assert await pg_bodies.read(connection, huge.id) == whole
                    assert await pg_bodies.read(connection, huge.id, limit=100) == whole[:100]
                    head = await pg_bodies.read(connection, huge.id, limit=pg_bodies.CHUNK_BYTES)
                    assert head == whole[: pg_bodies.CHUNK_BYTES]
                    assert await pg_bodies.read(connection, "NOPE") is None
                    rows = await connection.execute(
                        "SELECT count(*) FROM message_body_chunks WHERE id = %s", (huge.id,)
                    )
                    assert await rows.fetchone() == (4,)
            finally:
                await storage.close()

        run(backend, work)


def test_a_message_the_database_refuses_fails_alone_not_its_batch(backend: Backend) -> None:
    """A value one backend cannot hold (PostgreSQL text refuses NUL; the submission
    path cleans subjects, this is the line behind it) costs only its own message
    a 451: the others of the same commit are stored."""
    now = time.time()
    good = [_message(["r@example.net"], now=now) for _ in range(20)]
    bad = dataclasses.replace(_message(["r@example.net"], now=now), subject="nul \x00 here")

    async def work(b: Backend) -> list[BaseException | None]:
        results = await asyncio.gather(
            *(b.acceptance.store(m) for m in [*good[:10], bad, *good[10:]]),
            return_exceptions=True,
        )
        return list(results)

    results = run(backend, work)
    outcomes = [r for r in results if r is not None]
    if backend.name == "postgresql":
        assert len(outcomes) == 1 and isinstance(outcomes[0], SpoolError), results
        assert "refused a value" in str(outcomes[0])
        assert results[10] is outcomes[0]
    else:
        assert outcomes == []

    async def count(b: Backend) -> set[str]:
        return {r.id for r in await b.log.recent(100)}

    stored = run(backend, count)
    assert {m.id for m in good} <= stored
