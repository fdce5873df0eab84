"""The delivery queue and the MTA-STS cache in the SQLite database of one machine.

storage.api.DeliveryQueue and PolicyCache over delivery/queue.py's SQL, run
in a DatabaseThread (never on the event loop). One machine has one delivery
process, so there are no leases: a row it left ``sending`` when it died goes
back to the queue the next time it starts (``recover``, once).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relaygate.delivery import queue as q
from relaygate.delivery.mta_sts import CREATE_TABLE as MTA_STS_TABLE
from relaygate.storage import bodies
from relaygate.storage.api import Notice, QueueEntry, QueueSummary, Takeover
from relaygate.storage.batches import Batches
from relaygate.storage.queue_summary import SUMMARY_SQL, summary_of
from relaygate.storage.thread import DatabaseThread

Connection = Callable[[Any], sqlite3.Connection]


def _record_batch(
    connection: Connection, works: list[Callable[[sqlite3.Connection], None]], thread_state: Any
) -> list[Exception | None]:
    db = connection(thread_state)
    db.execute("BEGIN IMMEDIATE")
    errors: list[Exception | None] = []
    try:
        for work in works:
            db.execute("SAVEPOINT outcome")
            try:
                work(db)
            except Exception as exc:
                db.execute("ROLLBACK TO outcome")
                errors.append(exc)
            else:
                errors.append(None)
            db.execute("RELEASE outcome")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return errors


class SQLiteDeliveryQueue:
    def __init__(self, thread: DatabaseThread[Any], connection: Connection, database: Path) -> None:
        self._thread = thread
        self._connection = connection
        self._bodies = bodies.directory_for(database)
        self._recovered = False
        self._outcomes: Batches[Callable[[sqlite3.Connection], None]] = Batches(self._record_batch)

    async def recover(self, now: float) -> list[Takeover]:
        if self._recovered:  # later rows 'sending' are this process's own
            return []
        self._recovered = True
        ids = await self._thread.run(lambda c: q.reset_interrupted(self._connection(c)))
        return [Takeover(queue_id, None) for queue_id in ids]

    async def claim(self, now: float, limit: int) -> list[q.Delivery]:
        return await self._thread.run(lambda c: q.claim_due(self._connection(c), now, limit))

    async def renew(self, delivery_ids: Sequence[int], now: float) -> None:
        return None  # no leases on one machine

    async def finish(
        self,
        delivery: q.Delivery,
        outcome: q.Outcome,
        now: float,
        retry_at: float,
        notice: Notice | None,
    ) -> str | None:
        stored: list[str] = []

        def also(db: sqlite3.Connection) -> None:
            if notice is None:
                return
            stored.append(
                q.insert_notification(
                    db,
                    account=notice.account,
                    recipient=notice.recipient,
                    body=notice.body,
                    now=now,
                    keep_local=notice.keep_local,
                )
            )
            if notice.warning:
                q.mark_warned(db, delivery.id)

        def work(db: sqlite3.Connection) -> None:
            q.record(db, delivery, outcome, now, retry_at, also=also)

        # Outcomes that arrive while one commits share the next commit (one fsync,
        # one thread hop), each in a savepoint of its own so a failing one fails alone.
        await self._outcomes.submit(work)
        return stored[0] if stored else None

    async def _record_batch(
        self, works: list[Callable[[sqlite3.Connection], None]]
    ) -> list[Exception | None]:
        return await self._thread.run(functools.partial(_record_batch, self._connection, works))

    async def release(self, delivery_id: int, next_attempt: float, now: float) -> None:
        await self._thread.run(
            lambda c: q.release(self._connection(c), delivery_id, next_attempt, now)
        )

    async def body(self, message_id: str, limit: int | None = None) -> bytes | None:
        return await self._thread.run(
            lambda c: bodies.read(self._connection(c), self._bodies, message_id, limit=limit)
        )

    async def arrival(self, message_id: str) -> float | None:
        def read(c: Any) -> float | None:
            row = (
                self._connection(c)
                .execute("SELECT created_at FROM messages WHERE id = ?", (message_id,))
                .fetchone()
            )
            return float(row[0]) if row and row[0] is not None else None

        return await self._thread.run(read)

    async def entries(self) -> list[QueueEntry]:
        rows = await self._thread.run(lambda c: q.queue_rows(self._connection(c)))
        return [
            QueueEntry(
                id=str(r["id"]),
                domain=str(r["domain"]),
                recipients=tuple(str(x) for x in r["recipients"]),  # type: ignore[attr-defined]
                status=str(r["status"]),
                attempts=int(str(r["attempts"])),
                next_attempt=float(str(r["next_attempt"])),
                created_at=float(str(r["created_at"])),
                last_reply=None if r["last_reply"] is None else str(r["last_reply"]),
                mail_from=str(r["mail_from"]),
            )
            for r in rows
        ]

    async def summary(self) -> QueueSummary:
        def read(c: Any) -> QueueSummary:
            rows = self._connection(c).execute(SUMMARY_SQL).fetchall()
            return summary_of(rows)

        return await self._thread.run(read)

    async def retry_now(self, message_id: str | None, now: float) -> int:
        return await self._thread.run(lambda c: q.retry_now(self._connection(c), message_id, now))

    async def delete(self, message_id: str, now: float) -> int:
        return await self._thread.run(lambda c: q.delete(self._connection(c), message_id, now))


class SQLitePolicyCache:
    def __init__(self, thread: DatabaseThread[Any], connection: Connection) -> None:
        self._thread = thread
        self._connection = connection

    async def get(self, domain: str, now: float) -> tuple[str, str] | None:
        return await self._thread.run(lambda c: read_policy(self._connection(c), domain, now))

    async def put(
        self, domain: str, policy_id: str, text: str, now: float, expires_at: float
    ) -> None:
        await self._thread.run(
            lambda c: write_policy(
                self._connection(c), domain, policy_id, text, now=now, expires_at=expires_at
            )
        )


def read_policy(db: sqlite3.Connection, domain: str, now: float) -> tuple[str, str] | None:
    db.execute(MTA_STS_TABLE)  # IF NOT EXISTS: databases older than the cache
    row = db.execute(
        "SELECT id, policy FROM mta_sts_policies WHERE domain = ? AND expires_at > ?",
        (domain, now),
    ).fetchone()
    return (str(row[0]), str(row[1])) if row is not None else None


def write_policy(
    db: sqlite3.Connection, domain: str, policy_id: str, text: str, *, now: float, expires_at: float
) -> None:
    db.execute(MTA_STS_TABLE)
    db.execute(
        "INSERT INTO mta_sts_policies (domain, id, policy, fetched_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET id = excluded.id,"
        " policy = excluded.policy, fetched_at = excluded.fetched_at,"
        " expires_at = excluded.expires_at",
        (domain, policy_id, text, now, expires_at),
    )
    if db.in_transaction:  # a connection in sqlite3's implicit-transaction mode
        db.commit()
