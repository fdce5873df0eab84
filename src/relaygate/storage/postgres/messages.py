"""The message log (storage.api.MessageLog) on PostgreSQL."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import (
    MESSAGE_COLUMNS,
    DeliveryAttempt,
    MessageRecord,
    record_from_row,
)
from relaygate.storage.message_query import MessageQuery, where
from relaygate.storage.postgres import bodies


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
