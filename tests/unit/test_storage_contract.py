"""One contract for every storage backend (storage/api.py).

Each test runs against every backend in BACKENDS on real files or servers.
Today that is the embedded SQLite; the PostgreSQL backend (scale-out issue)
joins the list and must pass the same tests unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from relaygate.delivery import queue as delivery_queue
from relaygate.services.admin import MessagesAdmin, NotFound
from relaygate.spool import Spool, SpooledMessage, new_queue_id
from relaygate.storage import bodies
from relaygate.storage.api import DeliveryAttempt, MessageLog
from relaygate.storage.sqlite import connect
from relaygate.storage.sqlite_messages import SQLiteMessageLog


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coroutine)


def _message(subject: str, created_at: float, *, size: int = 0) -> SpooledMessage:
    body = f"Subject: {subject}\r\n\r\n".encode() + b"x" * size + b"\r\n"
    return SpooledMessage(
        id=new_queue_id(created_at),
        account="a@example.com",
        client_ip="192.0.2.7",
        mail_from="a@example.com",
        recipients=["r@example.net", "s@example.org"],
        subject=subject,
        body=body,
        created_at=created_at,
        status="queued",
        credential="shop",
        header=b"Received: by test\r\n",
    )


class SQLiteBackend:
    """The embedded default: accepted through the real spool, read back through the log."""

    def __init__(self, directory: Path) -> None:
        self.database = directory / "relaygate.db"
        connect(self.database).close()

    def accept(self, messages: list[SpooledMessage]) -> None:
        loop = asyncio.new_event_loop()
        spool = Spool(self.database, loop, deliver=True)
        try:
            for m in messages:
                loop.run_until_complete(asyncio.wait_for(spool.store(m), 30))
        finally:
            spool.close()
            loop.close()

    def record_attempt(self, message_id: str, outcome: str, reply: str) -> None:
        db = connect(self.database)
        try:
            db.execute(
                "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host,"
                " reply, tls, outcome) VALUES (?, 'example.net', 'r@example.net', ?, 'mx.test',"
                " ?, NULL, ?)",
                (message_id, time.time(), reply, outcome),
            )
        finally:
            db.close()

    def open_log(self) -> MessageLog:
        return SQLiteMessageLog(self.database)

    def lose_body(self, message_id: str) -> None:
        (bodies.directory_for(self.database) / message_id).unlink()


BACKENDS: dict[str, Callable[[Path], SQLiteBackend]] = {"sqlite": SQLiteBackend}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> SQLiteBackend:
    return BACKENDS[request.param](tmp_path)


async def _admin(backend: SQLiteBackend) -> AsyncIterator[MessagesAdmin]:
    log = backend.open_log()
    try:
        yield MessagesAdmin(log)
    finally:
        await log.close()


def test_recent_messages_newest_first_with_their_records(backend: SQLiteBackend) -> None:
    now = time.time()
    messages = [_message(f"m{i}", now - 100 + i) for i in range(5)]
    backend.accept(messages)

    async def check() -> None:
        async for admin in _admin(backend):
            recent = await admin.recent(3)
            assert [r.subject for r in recent] == ["m4", "m3", "m2"]
            first = recent[0]
            assert first.id == messages[4].id
            assert first.account == "a@example.com"
            assert first.credential == "shop"
            assert first.client_ip == "192.0.2.7"
            assert first.rcpt_to == ("r@example.net", "s@example.org")
            assert first.size == messages[4].size
            assert first.status == "queued"
            assert await admin.recent(100) and len(await admin.recent(100)) == 5

    run(check())


@pytest.mark.parametrize("size", [10, bodies.SPILL_BYTES])
def test_show_gives_the_stored_body_and_the_delivery_history(
    backend: SQLiteBackend, size: int
) -> None:
    message = _message("shown", time.time(), size=size)
    backend.accept([message])
    backend.record_attempt(message.id, "deferred", "451 4.3.0 try later")
    backend.record_attempt(message.id, "delivered", "250 2.0.0 ok")

    async def check() -> None:
        async for admin in _admin(backend):
            view = await admin.show(message.id)
            assert view.body == message.header + bytes(message.body)
            assert [(h.outcome, h.reply) for h in view.history] == [
                ("deferred", "451 4.3.0 try later"),
                ("delivered", "250 2.0.0 ok"),
            ]
            assert all(isinstance(h, DeliveryAttempt) for h in view.history)
            assert (await admin.show(message.id, body=False)).body is None

    run(check())


def test_unknown_message_and_lost_body_are_errors_a_user_can_read(
    backend: SQLiteBackend,
) -> None:
    message = _message("lost", time.time(), size=bodies.SPILL_BYTES)
    backend.accept([message])
    backend.lose_body(message.id)

    async def check() -> None:
        async for admin in _admin(backend):
            with pytest.raises(NotFound, match="no such message: NOPE"):
                await admin.show("NOPE")
            with pytest.raises(bodies.BodyMissing, match="missing"):
                await admin.show(message.id)

    run(check())


def test_queue_rows_exist_for_accepted_mail(backend: SQLiteBackend) -> None:
    # Acceptance is one unit of work: message, body and queue rows together.
    message = _message("queued", time.time())
    backend.accept([message])
    db = connect(backend.database)
    try:
        rows = [r for r in delivery_queue.queue_rows(db) if r["id"] == message.id]
    finally:
        db.close()
    assert sorted(str(r["domain"]) for r in rows) == ["example.net", "example.org"]
