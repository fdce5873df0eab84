"""Webhook endpoints, outbox and attempts on PostgreSQL (storage.api.Webhooks).

Several nodes may collect and send at once. Ids and timestamps are not in
commit order here, so ``collect`` reads by time: rows stamped after the
cursor minus OVERLAP and before now minus SETTLE (at most MAX_WINDOW past the
cursor, so catching up after a pause reads in slices), and the (endpoint,
event id) key drops what an earlier read queued already (``limit`` is unused
here). A transaction that commits more than OVERLAP seconds after stamping
its rows would be missed; acceptance and delivery outcomes commit within
milliseconds. Claims lock with SKIP LOCKED and
hold a lease, as the delivery queue does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import OutboxItem, WebhookAttempt, WebhookNotFound
from relaygate.webhooks import events as ev
from relaygate.webhooks.events import Endpoint, Event

OVERLAP = 10.0
SETTLE = 1.0
MAX_WINDOW = 60.0  # seconds of history read per round when catching up
_LOCK_KEY = 0x77686F6B  # "whok": one collector at a time, cluster-wide


def _endpoint(row: Sequence[Any]) -> Endpoint:
    events = row[2] if isinstance(row[2], list) else json.loads(row[2])
    return Endpoint(str(row[0]), str(row[1]), tuple(events), str(row[3]), "api", float(row[4]))


class PostgresWebhooks:
    def __init__(self, pool: AsyncConnectionPool, node: str = "") -> None:
        self._pool = pool
        self._node = node
        self._recovered = False

    async def add(self, endpoint: Endpoint) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO webhooks (id, url, events, secret, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (
                    endpoint.id,
                    endpoint.url,
                    json.dumps(endpoint.events),
                    endpoint.secret,
                    endpoint.created_at,
                ),
            )

    async def endpoints(self) -> list[Endpoint]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT id, url, events, secret, created_at FROM webhooks ORDER BY created_at, id"
            )
            return [_endpoint(row) for row in await cursor.fetchall()]

    async def update(
        self, endpoint_id: str, url: str | None, events: tuple[str, ...] | None
    ) -> Endpoint:
        async with self._pool.connection() as connection, connection.transaction():
            if url is not None:
                await connection.execute(
                    "UPDATE webhooks SET url = %s WHERE id = %s", (url, endpoint_id)
                )
            if events is not None:
                await connection.execute(
                    "UPDATE webhooks SET events = %s WHERE id = %s",
                    (json.dumps(events), endpoint_id),
                )
            cursor = await connection.execute(
                "SELECT id, url, events, secret, created_at FROM webhooks WHERE id = %s",
                (endpoint_id,),
            )
            row = await cursor.fetchone()
        if row is None:
            raise WebhookNotFound(endpoint_id)
        return _endpoint(row)

    async def remove(self, endpoint_id: str) -> bool:
        async with self._pool.connection() as connection:
            cursor = await connection.execute("DELETE FROM webhooks WHERE id = %s", (endpoint_id,))
            return cursor.rowcount > 0

    async def collect(self, endpoints: Sequence[Endpoint], now: float, limit: int) -> int:
        until = now - SETTLE
        async with self._pool.connection() as connection, connection.transaction():
            cursor = await connection.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,))
            locked = await cursor.fetchone()
            if locked is None or not locked[0]:
                return 0  # another node is collecting right now
            cursor = await connection.execute(
                "SELECT position FROM webhook_cursor WHERE name = 'time'"
            )
            row = await cursor.fetchone()
            since = float(row[0]) if row is not None else until
            until = min(until, since + MAX_WINDOW)
            if endpoints and row is not None:  # the first run starts from now
                found: list[Event] = []
                cursor = await connection.execute(
                    "SELECT id, created_at, account, credential, client_ip, mail_from, rcpt_to,"
                    " subject, size FROM messages WHERE created_at > %s AND created_at <= %s"
                    " AND mail_from <> '' ORDER BY created_at",
                    (since - OVERLAP, until),
                )
                messages = await cursor.fetchall()
                for m in messages:
                    found.append(
                        ev.accepted(
                            ev.AcceptedRow(
                                str(m[0]),
                                float(m[1]),
                                str(m[2]),
                                m[3],
                                str(m[4]),
                                str(m[5]),
                                tuple(m[6]),
                                str(m[7]),
                                int(m[8]),
                            )
                        )
                    )
                cursor = await connection.execute(
                    "SELECT a.id, a.message_id, m.account, m.mail_from, a.domain, a.ts, a.outcome,"
                    " a.recipient, a.host, a.reply FROM delivery_attempts a JOIN messages m"
                    " ON m.id = a.message_id WHERE a.ts > %s AND a.ts <= %s ORDER BY a.id",
                    (since - OVERLAP, until),
                )
                for group in ev.group_attempts(await cursor.fetchall()):
                    if group.mail_from:
                        event = ev.outcome(group)
                        if event is not None:
                            found.append(event)
                queued = await _insert(connection, ev.fan_out(endpoints, found), now)
            else:
                queued = 0
            await connection.execute(
                "INSERT INTO webhook_cursor (name, position) VALUES ('time', %s)"
                " ON CONFLICT (name) DO UPDATE SET position = excluded.position",
                (max(until, since),),
            )
            return queued

    async def enqueue(self, endpoint_id: str, event: Event, now: float) -> None:
        async with self._pool.connection() as connection:
            await _insert(connection, [(endpoint_id, event)], now)

    async def claim(self, now: float, limit: int, lease: float) -> list[OutboxItem]:
        async with self._pool.connection() as connection, connection.transaction():
            if not self._recovered and self._node:
                # This node restarted: what it held before is not being sent by anyone.
                await connection.execute(
                    "UPDATE webhook_outbox SET status = 'queued', lease_until = NULL"
                    " WHERE status = 'sending' AND node = %s",
                    (self._node,),
                )
                self._recovered = True
            cursor = await connection.execute(
                "UPDATE webhook_outbox SET status = 'sending', lease_until = %s, node = %s"
                " WHERE id IN (SELECT id FROM webhook_outbox"
                " WHERE (status = 'queued' AND next_attempt <= %s)"
                " OR (status = 'sending' AND lease_until < %s)"
                " ORDER BY next_attempt LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING id, endpoint, event_id, type, body, attempts, created_at",
                (now + lease, self._node, now, now, limit),
            )
            rows = await cursor.fetchall()
        return [
            OutboxItem(
                int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), float(r[6])
            )
            for r in rows
        ]

    async def finish(
        self, item: OutboxItem, attempt: WebhookAttempt, next_attempt: float | None
    ) -> None:
        status = "queued" if next_attempt is not None else attempt.outcome
        async with self._pool.connection() as connection, connection.transaction():
            await connection.execute(
                "INSERT INTO webhook_attempts (outbox_id, endpoint, ts, status_code, error,"
                " duration, outcome) VALUES (%s, %s, %s, %s, %s, %s, %s)",
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
            await connection.execute(
                "UPDATE webhook_outbox SET status = %s, attempts = attempts + 1, next_attempt = %s,"
                " lease_until = NULL WHERE id = %s",
                (status, next_attempt if next_attempt is not None else attempt.ts, item.id),
            )

    async def attempts(self, endpoint_id: str, limit: int) -> list[WebhookAttempt]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT o.event_id, o.type, a.ts, a.status_code, a.error, a.duration, a.outcome"
                " FROM webhook_attempts a JOIN webhook_outbox o ON o.id = a.outbox_id"
                " WHERE a.endpoint = %s ORDER BY a.ts DESC, a.id DESC LIMIT %s",
                (endpoint_id, limit),
            )
            rows = await cursor.fetchall()
        return [
            WebhookAttempt(str(r[0]), str(r[1]), float(r[2]), r[3], r[4], float(r[5]), str(r[6]))
            for r in rows
        ]

    async def prune(self, before: float, limit: int) -> int:
        async with self._pool.connection() as connection:
            # Settled rows only; their attempts go with them (ON DELETE CASCADE).
            # Idempotent: nodes pruning at once at worst find fewer rows.
            cursor = await connection.execute(
                "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox"
                " WHERE status IN ('delivered', 'failed') AND next_attempt < %s"
                " ORDER BY next_attempt LIMIT %s FOR UPDATE SKIP LOCKED)",
                (before, limit),
            )
            return int(cursor.rowcount)


async def _insert(connection: Any, rows: Sequence[tuple[str, Event]], now: float) -> int:
    if not rows:
        return 0
    cursor = await connection.execute(
        "INSERT INTO webhook_outbox (endpoint, event_id, type, body, status, next_attempt,"
        " created_at) SELECT *, 'queued', %s, %s"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])"
        " ON CONFLICT DO NOTHING",
        (
            now,
            now,
            [r[0] for r in rows],
            [r[1].id for r in rows],
            [r[1].type for r in rows],
            [r[1].body for r in rows],
        ),
    )
    return int(cursor.rowcount)
