"""Hourly stats on PostgreSQL, added to by every node (storage.api.HourlyStats)."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import StatRow

# One statement per flush: the rows as arrays, summed first (one row per key,
# or ON CONFLICT would see the same key twice in one command).
UPSERT = """
INSERT INTO stats_hourly (hour, name, label, count)
SELECT hour, name, label, sum(count) FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::bigint[])
    AS r(hour, name, label, count)
GROUP BY hour, name, label
ON CONFLICT (hour, name, label) DO UPDATE SET count = stats_hourly.count + excluded.count
"""


class PostgresHourlyStats:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def add(self, rows: Sequence[StatRow]) -> None:
        if not rows:
            return
        async with self._pool.connection() as connection:
            await connection.execute(
                UPSERT,
                (
                    [r.hour for r in rows],
                    [r.name for r in rows],
                    [r.label for r in rows],
                    [r.count for r in rows],
                ),
            )

    async def read(self, first: int, end: int) -> list[StatRow]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT hour, name, label, count FROM stats_hourly"
                " WHERE hour >= %s AND hour < %s ORDER BY hour, name, label",
                (first, end),
            )
            return [
                StatRow(int(h), str(n), str(lb), int(c)) for h, n, lb, c in await cursor.fetchall()
            ]

    async def prune(self, before: int) -> None:
        async with self._pool.connection() as connection:
            await connection.execute("DELETE FROM stats_hourly WHERE hour < %s", (before,))
