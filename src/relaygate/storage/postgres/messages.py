"""The message log (storage.api.MessageLog) on PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import (
    MESSAGE_COLUMNS,
    Deleted,
    DeliveryAttempt,
    MessageRecord,
    record_from_row,
)
from relaygate.storage.message_query import SETTLED, MessageQuery, where
from relaygate.storage.postgres import bodies

# Retention on several nodes: one at a time does a batch (a transaction-level
# advisory lock; the others skip that round). Deleting twice would be harmless
# (deletes are idempotent) but would make nodes wait on each other's row locks.
RETENTION_LOCK = 0x72657465  # "rete"


def _record(row: tuple[Any, ...]) -> MessageRecord:
    rcpt_to = row[6]  # JSONB: psycopg hands back the list
    return record_from_row(row, rcpt_to if isinstance(rcpt_to, list) else [rcpt_to])


class PostgresMessageLog:
    """Reads from the pool; the pool is the caller's (one per process, shared)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def recent(self, limit: int) -> list[MessageRecord]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages"  # noqa: S608 (a constant column list)
                " ORDER BY created_at DESC, id DESC LIMIT %s",
                (limit,),
            )
            return [_record(row) for row in await cursor.fetchall()]

    async def search(self, query: MessageQuery) -> list[MessageRecord]:
        clause, values = where(query, "%s", "ILIKE", "rcpt_to::text")
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages{clause}"  # noqa: S608 (constants)
                " ORDER BY created_at DESC, id DESC LIMIT %s",
                (*values, query.limit),
            )
            return [_record(row) for row in await cursor.fetchall()]

    async def get(self, message_id: str) -> MessageRecord | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = %s",  # noqa: S608
                (message_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else _record(row)

    async def body(self, message_id: str) -> bytes | None:
        async with self._pool.connection() as connection:
            return await bodies.read(connection, message_id)

    async def history(self, message_id: str) -> list[DeliveryAttempt]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT ts, domain, recipient, host, reply, tls, outcome FROM delivery_attempts"
                " WHERE message_id = %s ORDER BY ts, id",
                (message_id,),
            )
            return [DeliveryAttempt(*row) for row in await cursor.fetchall()]

    async def delete(self, message_ids: Sequence[str]) -> Deleted:
        ids = list(dict.fromkeys(message_ids))
        async with self._pool.connection() as connection, connection.transaction():
            # Lock the rows first: a delivery attempt claiming one now waits, or has it.
            cursor = await connection.execute(
                "SELECT m.id, EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id"
                " AND d.status = 'sending') FROM messages m WHERE m.id = ANY(%s) FOR UPDATE",
                (ids,),
            )
            found = {str(row[0]): bool(row[1]) for row in await cursor.fetchall()}
            removed = [i for i in ids if i in found and not found[i]]
            if removed:
                await connection.execute("DELETE FROM messages WHERE id = ANY(%s)", (removed,))
        return Deleted(
            removed, [i for i in ids if i not in found], [i for i in ids if found.get(i)]
        )

    async def count_cutoff(self, keep: int) -> float | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT created_at FROM messages ORDER BY created_at DESC, id DESC"
                " LIMIT 1 OFFSET %s",
                (keep - 1,),
            )
            row = await cursor.fetchone()
        return None if row is None else float(row[0])

    async def prune(self, before: float, limit: int) -> int:
        async with self._pool.connection() as connection, connection.transaction():
            if not await _retention_turn(connection):
                return 0
            cursor = await connection.execute(
                "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m"  # noqa: S608
                f" WHERE m.created_at < %s AND {SETTLED}"
                " ORDER BY m.created_at LIMIT %s FOR UPDATE SKIP LOCKED)",
                (before, limit),
            )
            return int(cursor.rowcount)

    async def prune_bodies(self, before: float, limit: int, now: float) -> int:
        async with self._pool.connection() as connection, connection.transaction():
            if not await _retention_turn(connection):
                return 0
            cursor = await connection.execute(
                "UPDATE messages SET body_removed_at = %s"  # noqa: S608 (constants)
                " WHERE id IN (SELECT m.id FROM messages m"
                f" WHERE m.created_at < %s AND m.body_removed_at IS NULL AND {SETTLED}"
                " ORDER BY m.created_at LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
                (now, before, limit),
            )
            ids = [str(row[0]) for row in await cursor.fetchall()]
            if ids:
                await connection.execute(
                    "DELETE FROM message_body_chunks WHERE id = ANY(%s)", (ids,)
                )
                await connection.execute("DELETE FROM message_bodies WHERE id = ANY(%s)", (ids,))
            return len(ids)


async def _retention_turn(connection: Any) -> bool:
    """Whether this node does this round of retention (see RETENTION_LOCK)."""
    cursor = await connection.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,))
    row = await cursor.fetchone()
    return bool(row and row[0])
