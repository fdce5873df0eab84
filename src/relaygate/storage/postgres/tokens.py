"""HTTP API tokens on PostgreSQL, shared by every node (storage.api.ApiTokens)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import ApiToken, TokenExists


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(str(row[0]), bool(row[1]), float(row[2]), row[3])


class PostgresApiTokens:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def add(self, name: str, digest: bytes, read_only: bool, now: float) -> ApiToken:
        try:
            async with self._pool.connection() as connection:
                await connection.execute(
                    "INSERT INTO api_tokens (name, digest, read_only, created_at)"
                    " VALUES (%s, %s, %s, %s)",
                    (name, digest, read_only, now),
                )
        except psycopg.errors.UniqueViolation:
            raise TokenExists(name) from None
        return ApiToken(name, read_only, now, None)

    async def list(self) -> list[ApiToken]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT name, read_only, created_at, last_used FROM api_tokens ORDER BY name"
            )
            return [_token(row) for row in await cursor.fetchall()]

    async def revoke(self, name: str) -> bool:
        async with self._pool.connection() as connection:
            cursor = await connection.execute("DELETE FROM api_tokens WHERE name = %s", (name,))
            return cursor.rowcount > 0

    async def find(self, digest: bytes, now: float) -> ApiToken | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT name, read_only, created_at, last_used FROM api_tokens WHERE digest = %s",
                (digest,),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            if row[3] is None or now - float(row[3]) >= 60:  # a write a minute at most
                await connection.execute(
                    "UPDATE api_tokens SET last_used = %s WHERE name = %s", (now, row[0])
                )
        return ApiToken(str(row[0]), bool(row[1]), float(row[2]), now)
