"""Web UI sessions on PostgreSQL, shared by every node (storage.api.UiSessions):
a person logged in through one node stays logged in behind a load balancer."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import UiSession

SEEN_EVERY = 60.0  # seconds: a request writes seen_at at most this often


class PostgresUiSessions:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def add(self, digest: bytes, address: str, password: bytes, now: float) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO ui_sessions (digest, address, password, created_at, seen_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (digest, address, password, now, now),
            )

    async def find(self, digest: bytes, now: float) -> UiSession | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT address, password, created_at, seen_at FROM ui_sessions WHERE digest = %s",
                (digest,),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            if now - float(row[3]) >= SEEN_EVERY:
                await connection.execute(
                    "UPDATE ui_sessions SET seen_at = %s WHERE digest = %s", (now, digest)
                )
        return UiSession(str(row[0]), bytes(row[1]), float(row[2]), float(row[3]))

    async def remove(self, digest: bytes) -> None:
        async with self._pool.connection() as connection:
            await connection.execute("DELETE FROM ui_sessions WHERE digest = %s", (digest,))

    async def prune(self, seen_before: float, created_before: float) -> int:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "DELETE FROM ui_sessions WHERE seen_at < %s OR created_at < %s",
                (seen_before, created_before),
            )
            return cursor.rowcount
