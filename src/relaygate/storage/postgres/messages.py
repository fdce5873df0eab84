"""The message log (storage.api.MessageLog) on PostgreSQL."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import DeliveryAttempt, MessageRecord

_COLUMNS = (
    "id, created_at, account, credential, client_ip, mail_from, rcpt_to, subject, size, status"
)


def _record(row: tuple[Any, ...]) -> MessageRecord:
    id_, created_at, account, credential, client_ip, mail_from, rcpt_to, subject, size, status = row
    recipients = rcpt_to if isinstance(rcpt_to, list) else [rcpt_to]
    return MessageRecord(
        id=id_,
        created_at=float(created_at),
        account=account,
        credential=credential,
        client_ip=client_ip,
        mail_from=mail_from,
        rcpt_to=tuple(str(r) for r in recipients),
        subject=subject,
        size=int(size),
        status=status,
    )


class PostgresMessageLog:
    """Reads from the pool; the pool is the caller's (one per process, shared)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def recent(self, limit: int) -> list[MessageRecord]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {_COLUMNS} FROM messages"  # noqa: S608 (a constant column list)
                " ORDER BY created_at DESC, id DESC LIMIT %s",
                (limit,),
            )
            return [_record(row) for row in await cursor.fetchall()]

    async def get(self, message_id: str) -> MessageRecord | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE id = %s",  # noqa: S608
                (message_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else _record(row)

    async def body(self, message_id: str) -> bytes | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT body FROM message_bodies WHERE id = %s", (message_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def history(self, message_id: str) -> list[DeliveryAttempt]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT ts, domain, recipient, host, reply, tls, outcome FROM delivery_attempts"
                " WHERE message_id = %s ORDER BY ts, id",
                (message_id,),
            )
            return [DeliveryAttempt(*row) for row in await cursor.fetchall()]

    async def close(self) -> None:
        pass  # the pool belongs to whoever made it
