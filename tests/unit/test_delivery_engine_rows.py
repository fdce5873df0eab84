"""No exception of any kind leaves a delivery row ``sending`` (issue 7, item 2).

The engine runs on a real SQLite database in a temporary directory; the
failures are injected where no remote host can reach (a resolver bug, a
database write that fails, a DSN that cannot be built), so that the guard
itself is what is tested. End-to-end tests of the remote-caused cases live in
tests/e2e/test_e2e_delivery_hostile.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.config import Config, DeliveryConfig
from relaygate.delivery import dsn
from relaygate.delivery import queue as q
from relaygate.delivery.engine import DeliveryEngine
from relaygate.delivery.mx import PermanentDNSError, Target
from relaygate.storage.node import open_delivery_storage
from relaygate.storage.sqlite import connect

BODY = b"From: a@b.test\r\nTo: u@x.test\r\nSubject: s\r\n\r\nbody\r\n"


class Engine(DeliveryEngine):
    db: sqlite3.Connection  # the test's own connection to the engine's database


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    loop = asyncio.new_event_loop()
    config = Config(
        hostname="relay.test",
        data_dir=tmp_path,
        delivery=DeliveryConfig(
            mode="mx", resolvers=(("127.0.0.1", 9),), mta_sts=False, retry_schedule=(60.0,)
        ),
    )
    storage = loop.run_until_complete(open_delivery_storage(config, loop))
    built = Engine(config, loop, storage)
    built.db = connect(config.database_path)
    try:
        yield built
    finally:
        built.db.close()
        loop.run_until_complete(storage.close())
        loop.close()


def _queue_message(db: sqlite3.Connection, queue_id: str, rcpt: str = "u@x.test") -> q.Delivery:
    now = time.time()
    db.execute(
        "INSERT INTO messages (id, account, client_ip, mail_from, rcpt_to, subject, size,"
        " status, created_at, recipients) VALUES (?, 'a@b.test', '', 'a@b.test', ?, 's', ?,"
        " 'queued', ?, 1)",
        (queue_id, json.dumps([rcpt]), len(BODY), now),
    )
    db.execute("INSERT INTO message_bodies (id, body) VALUES (?, ?)", (queue_id, BODY))
    q.enqueue(db, queue_id, [rcpt], now - 1)
    [delivery] = [d for d in q.claim_due(db, now, 10) if d.message_id == queue_id]
    return delivery


def _row(db: sqlite3.Connection, queue_id: str) -> tuple[str, int, float, str | None]:
    row = db.execute(
        "SELECT status, attempts, next_attempt, last_reply FROM deliveries WHERE message_id = ?",
        (queue_id,),
    ).fetchone()
    return str(row[0]), int(row[1]), float(row[2]), row[3]


def _run(engine: Engine, delivery: q.Delivery) -> None:
    engine.loop.run_until_complete(
        engine._one_connection(f"mx:{delivery.domain}", deque([delivery]))
    )


def test_an_unexpected_resolver_exception_defers_the_row(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(domain: str) -> list[Target]:
        raise RuntimeError("a bug in planning")

    monkeypatch.setattr(engine.resolver, "targets", broken)
    delivery = _queue_message(engine.db, "Q1")
    _run(engine, delivery)
    status, attempts, next_attempt, reply = _row(engine.db, "Q1")
    assert (status, attempts) == ("queued", 1)
    assert reply is not None and reply.startswith("451 4.3.0 local error"), reply
    assert next_attempt > time.time() + 30  # the retry schedule, not at once
    assert engine._held == {}


def test_a_failed_finish_puts_the_row_back_with_a_delay(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_finish(*args: object, **kwargs: object) -> None:
        raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")

    async def nxdomain(domain: str) -> list[Target]:
        raise PermanentDNSError("550 5.1.2 Domain x.test does not exist")

    monkeypatch.setattr(engine.resolver, "targets", nxdomain)
    monkeypatch.setattr(q, "record", failing_finish)
    delivery = _queue_message(engine.db, "Q2")
    _run(engine, delivery)
    status, attempts, next_attempt, _ = _row(engine.db, "Q2")
    assert (status, attempts) == ("queued", 0)  # released, not recorded
    assert next_attempt > time.time() + 30


def test_a_bounce_that_cannot_be_built_with_the_reply_is_built_without_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = dsn.build
    calls: list[int] = []

    def build_once_broken(**kwargs: object) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("cannot encode")
        return real_build(**kwargs)  # type: ignore[arg-type]

    async def nxdomain(domain: str) -> list[Target]:
        raise PermanentDNSError("550 5.1.2 Domain x.test does not exist")

    monkeypatch.setattr(engine.resolver, "targets", nxdomain)
    monkeypatch.setattr(dsn, "build", build_once_broken)
    delivery = _queue_message(engine.db, "Q3")
    _run(engine, delivery)
    assert _row(engine.db, "Q3")[0] == "failed"
    bounces = engine.db.execute(
        "SELECT b.body FROM messages AS m JOIN message_bodies AS b ON b.id = m.id"
        " WHERE m.mail_from = '' AND m.rcpt_to = ?",
        (json.dumps(["a@b.test"]),),
    ).fetchall()
    assert len(bounces) == 1
    assert b"550 5.1.2 (remote text withheld)" in bytes(bounces[0][0])


def test_a_failure_and_its_bounce_are_one_transaction(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If storing the bounce fails, the failure is not recorded either."""

    def broken_insert(db: sqlite3.Connection, **kwargs: object) -> str:
        db.execute("INSERT INTO no_such_table VALUES (1)")
        return ""

    async def nxdomain(domain: str) -> list[Target]:
        raise PermanentDNSError("550 5.1.2 Domain x.test does not exist")

    monkeypatch.setattr(engine.resolver, "targets", nxdomain)
    monkeypatch.setattr(q, "insert_notification", broken_insert)
    delivery = _queue_message(engine.db, "Q4")
    _run(engine, delivery)
    status, attempts, _, _ = _row(engine.db, "Q4")
    assert (status, attempts) == ("queued", 0)
    recorded = engine.db.execute(
        "SELECT count(*) FROM delivery_attempts WHERE message_id = 'Q4'"
    ).fetchone()[0]
    assert recorded == 0


def test_rows_no_attempt_took_are_released_at_shutdown(engine: Engine) -> None:
    delivery = _queue_message(engine.db, "Q5")
    engine._pending["mx:x.test"].append(delivery)
    engine.loop.run_until_complete(engine._release_pending())
    status, attempts, next_attempt, _ = _row(engine.db, "Q5")
    assert (status, attempts) == ("queued", 0)
    assert next_attempt <= time.time()
