"""The nodes sharing one PostgreSQL database (storage.api.Nodes).

Each node's worker 0 writes a heartbeat every HEARTBEAT seconds; a node not
seen for ALIVE_FOR is taken as gone. ``relaygate nodes`` lists them with the
delivery leases each holds; ``serve`` looks here to refuse a second node
without ``[shared] redis_url``.
"""

from __future__ import annotations

import builtins

from psycopg_pool import AsyncConnectionPool

from relaygate.storage.api import NodeRecord

HEARTBEAT = 10.0  # seconds between a node's heartbeats
ALIVE_FOR = 3 * HEARTBEAT  # not seen for longer: gone


class PostgresNodes:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def heartbeat(self, name: str, started_at: float, pid: int, version: str) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO nodes (name, started_at, last_seen, pid, version)"
                " VALUES (%s, %s, extract(epoch FROM clock_timestamp()), %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET started_at = excluded.started_at,"
                " last_seen = excluded.last_seen, pid = excluded.pid, version = excluded.version",
                (name, started_at, pid, version),
            )

    async def list(self, now: float) -> list[NodeRecord]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT n.name, n.started_at, n.last_seen, n.pid, n.version,"
                " (SELECT count(*) FROM deliveries AS d"
                "  WHERE d.status = 'sending' AND d.lease_node = n.name)"
                " FROM nodes AS n ORDER BY n.name"
            )
            rows = await cursor.fetchall()
        return [
            NodeRecord(str(r[0]), float(r[1]), float(r[2]), int(r[3]), str(r[4]), int(r[5]))
            for r in rows
        ]

    async def others_alive(self, name: str) -> builtins.list[str]:
        """Names of other nodes seen lately (the database's clock decides)."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT name FROM nodes WHERE name <> %s"
                " AND last_seen > extract(epoch FROM clock_timestamp()) - %s ORDER BY name",
                (name, ALIVE_FOR),
            )
            return [str(row[0]) for row in await cursor.fetchall()]
