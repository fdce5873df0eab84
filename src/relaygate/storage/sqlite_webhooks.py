"""Webhook endpoints, outbox and attempts in the SQLite database (storage.api.Webhooks).

``collect`` reads messages by rowid and delivery_attempts by id past its
cursor: on one machine one writer commits them in rowid order, so the cursor
never passes a row that is not yet visible.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from relaygate.storage.api import OutboxItem, WebhookAttempt, WebhookNotFound
from relaygate.storage.thread import DatabaseThread
from relaygate.webhooks import events as ev
from relaygate.webhooks.events import Endpoint, Event

Connection = Callable[[Any], sqlite3.Connection]


def _endpoint(row: Sequence[Any]) -> Endpoint:
    return Endpoint(
        str(row[0]), str(row[1]), tuple(json.loads(row[2])), str(row[3]), "api", float(row[4])
    )


class SQLiteWebhooks:
    def __init__(self, thread: DatabaseThread[Any], connection: Connection) -> None:
        self._thread = thread
        self._connection = connection
        self._recovered = False  # one sender per machine: its first claim takes back all

    async def add(self, endpoint: Endpoint) -> None:
        def add(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.execute(
                    "INSERT INTO webhooks (id, url, events, secret, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        endpoint.id,
                        endpoint.url,
                        json.dumps(endpoint.events),
                        endpoint.secret,
                        endpoint.created_at,
                    ),
                )

        await self._thread.run(add)

    async def endpoints(self) -> list[Endpoint]:
        def read(c: Any) -> list[Endpoint]:
            rows = self._connection(c).execute(
                "SELECT id, url, events, secret, created_at FROM webhooks ORDER BY created_at, id"
            )
            return [_endpoint(row) for row in rows]

        return await self._thread.run(read)

    async def update(
        self, endpoint_id: str, url: str | None, events: tuple[str, ...] | None
    ) -> Endpoint:
        def update(c: Any) -> Endpoint:
            db = self._connection(c)
            with db:
                if url is not None:
                    db.execute("UPDATE webhooks SET url = ? WHERE id = ?", (url, endpoint_id))
                if events is not None:
                    db.execute(
                        "UPDATE webhooks SET events = ? WHERE id = ?",
                        (json.dumps(events), endpoint_id),
                    )
                row = db.execute(
                    "SELECT id, url, events, secret, created_at FROM webhooks WHERE id = ?",
                    (endpoint_id,),
                ).fetchone()
            if row is None:
                raise WebhookNotFound(endpoint_id)
            return _endpoint(row)

        return await self._thread.run(update)

    async def remove(self, endpoint_id: str) -> bool:
        def remove(c: Any) -> bool:
            db = self._connection(c)
            with db:
                return db.execute("DELETE FROM webhooks WHERE id = ?", (endpoint_id,)).rowcount > 0

        return await self._thread.run(remove)

    async def collect(self, endpoints: Sequence[Endpoint], now: float, limit: int) -> int:
        def collect(c: Any) -> int:
            db = self._connection(c)
            if not _news(db):  # no write transaction (no lock) when nothing happened
                return 0
            db.execute("BEGIN IMMEDIATE")
            try:
                queued = _collect(db, endpoints, now, limit)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return queued

        return await self._thread.run(collect)

    async def enqueue(self, endpoint_id: str, event: Event, now: float) -> None:
        def enqueue(c: Any) -> None:
            db = self._connection(c)
            with db:
                _insert(db, [(endpoint_id, event)], now)

        await self._thread.run(enqueue)

    async def claim(self, now: float, limit: int, lease: float) -> list[OutboxItem]:
        def claim(c: Any) -> list[OutboxItem]:
            db = self._connection(c)
            with db:
                if not self._recovered:  # rows a killed sender held are due again
                    db.execute(
                        "UPDATE webhook_outbox SET status = 'queued', lease_until = NULL"
                        " WHERE status = 'sending'"
                    )
                    self._recovered = True
                rows = db.execute(
                    "SELECT id, endpoint, event_id, type, body, attempts, created_at"
                    " FROM webhook_outbox WHERE (status = 'queued' AND next_attempt <= ?)"
                    " OR (status = 'sending' AND lease_until < ?) ORDER BY next_attempt LIMIT ?",
                    (now, now, limit),
                ).fetchall()
                db.executemany(
                    "UPDATE webhook_outbox SET status = 'sending', lease_until = ? WHERE id = ?",
                    [(now + lease, row[0]) for row in rows],
                )
            return [
                OutboxItem(
                    int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), float(r[6])
                )
                for r in rows
            ]

        return await self._thread.run(claim)

    async def finish(
        self, item: OutboxItem, attempt: WebhookAttempt, next_attempt: float | None
    ) -> None:
        def finish(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.execute(
                    "INSERT INTO webhook_attempts (outbox_id, endpoint, ts, status_code, error,"
                    " duration, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.id,
                        item.endpoint,
                        attempt.ts,
                        attempt.status_code,
                        attempt.error,
                        attempt.duration,
                        attempt.outcome,
                    ),
                )
                status = "queued" if next_attempt is not None else attempt.outcome
                db.execute(
                    "UPDATE webhook_outbox SET status = ?, attempts = attempts + 1,"
                    " next_attempt = ?, lease_until = NULL WHERE id = ?",
                    (status, next_attempt if next_attempt is not None else attempt.ts, item.id),
                )

        await self._thread.run(finish)

    async def attempts(self, endpoint_id: str, limit: int) -> list[WebhookAttempt]:
        def read(c: Any) -> list[WebhookAttempt]:
            rows = self._connection(c).execute(
                "SELECT o.event_id, o.type, a.ts, a.status_code, a.error, a.duration, a.outcome"
                " FROM webhook_attempts a JOIN webhook_outbox o ON o.id = a.outbox_id"
                " WHERE a.endpoint = ? ORDER BY a.ts DESC, a.id DESC LIMIT ?",
                (endpoint_id, limit),
            )
            return [_attempt(row) for row in rows]

        return await self._thread.run(read)

    async def prune(self, before: float, limit: int) -> int:
        def prune(c: Any) -> int:
            db = self._connection(c)
            db.execute("BEGIN IMMEDIATE")
            try:
                # Settled rows only; their attempts go with them (ON DELETE CASCADE).
                count = db.execute(
                    "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox"
                    " WHERE status IN ('delivered', 'failed') AND next_attempt < ?"
                    " ORDER BY next_attempt LIMIT ?)",
                    (before, limit),
                ).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return int(count)

        return await self._thread.run(prune)


def _attempt(row: Sequence[Any]) -> WebhookAttempt:
    return WebhookAttempt(
        str(row[0]), str(row[1]), float(row[2]), row[3], row[4], float(row[5]), str(row[6])
    )


def _news(db: sqlite3.Connection) -> bool:
    """Rows past either cursor (or no cursor yet)."""
    row = db.execute(
        "SELECT (SELECT position FROM webhook_cursor WHERE name = 'messages'),"
        " (SELECT position FROM webhook_cursor WHERE name = 'attempts'),"
        " (SELECT coalesce(max(rowid), 0) FROM messages),"
        " (SELECT coalesce(max(id), 0) FROM delivery_attempts)"
    ).fetchone()
    return row[0] is None or row[1] is None or row[2] > row[0] or row[3] > row[1]


def _cursor(db: sqlite3.Connection, name: str, start: str) -> int:
    row = db.execute("SELECT position FROM webhook_cursor WHERE name = ?", (name,)).fetchone()
    if row is not None:
        return int(row[0])
    return int(db.execute(start).fetchone()[0] or 0)  # first run: from now on


def _move(db: sqlite3.Connection, name: str, position: int) -> None:
    db.execute(
        "INSERT INTO webhook_cursor (name, position) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        (name, position),
    )


def _collect(db: sqlite3.Connection, endpoints: Sequence[Endpoint], now: float, limit: int) -> int:
    messages = _cursor(db, "messages", "SELECT max(rowid) FROM messages")
    attempts = _cursor(db, "attempts", "SELECT max(id) FROM delivery_attempts")
    if not endpoints:  # nobody listens: nothing to read, start from here when someone does
        _move(
            db,
            "messages",
            int(db.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]),
        )
        _move(
            db,
            "attempts",
            int(db.execute("SELECT coalesce(max(id), 0) FROM delivery_attempts").fetchone()[0]),
        )
        return 0
    found: list[Event] = []
    rows = db.execute(
        "SELECT rowid, id, created_at, account, credential, client_ip, mail_from, rcpt_to, subject,"
        " size FROM messages WHERE rowid > ? ORDER BY rowid LIMIT ?",
        (messages, limit),
    ).fetchall()
    for row in rows:
        messages = int(row[0])
        if row[6]:  # a bounce we made ("" sender) is not an accepted message
            found.append(
                ev.accepted(
                    ev.AcceptedRow(
                        str(row[1]),
                        float(row[2]),
                        str(row[3]),
                        row[4],
                        str(row[5]),
                        str(row[6]),
                        tuple(json.loads(row[7])),
                        str(row[8]),
                        int(row[9]),
                    )
                )
            )
    # Attempts of one settled try commit together: read whole groups (ids up to a max).
    top = db.execute(
        "SELECT max(id) FROM (SELECT id FROM delivery_attempts WHERE id > ? ORDER BY id LIMIT ?)",
        (attempts, limit),
    ).fetchone()[0]
    if top is not None:
        # A settled attempt's rows (one message, one time) all go in this read.
        top = db.execute(
            "SELECT max(b.id) FROM delivery_attempts a JOIN delivery_attempts b"
            " ON b.message_id = a.message_id AND b.ts = a.ts WHERE a.id = ?",
            (top,),
        ).fetchone()[0]
        rows = db.execute(
            "SELECT a.id, a.message_id, m.account, m.mail_from, a.domain, a.ts, a.outcome,"
            " a.recipient, a.host, a.reply FROM delivery_attempts a JOIN messages m"
            " ON m.id = a.message_id WHERE a.id > ? AND a.id <= ? ORDER BY a.id",
            (attempts, top),
        ).fetchall()
        for group in ev.group_attempts(rows):
            if group.mail_from:  # not about our own bounces
                event = ev.outcome(group)
                if event is not None:
                    found.append(event)
        attempts = int(top)
    _move(db, "messages", messages)
    _move(db, "attempts", attempts)
    return _insert(db, ev.fan_out(endpoints, found), now)


def _insert(db: sqlite3.Connection, rows: Sequence[tuple[str, Event]], now: float) -> int:
    before = db.total_changes
    db.executemany(
        "INSERT INTO webhook_outbox (endpoint, event_id, type, body, status, next_attempt,"
        " created_at) VALUES (?, ?, ?, ?, 'queued', ?, ?) ON CONFLICT DO NOTHING",
        [(endpoint, e.id, e.type, e.body, now, now) for endpoint, e in rows],
    )
    return db.total_changes - before
