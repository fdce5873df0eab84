"""Hourly stats in the SQLite database of one machine (storage.api.HourlyStats)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from relaygate.storage.api import StatRow
from relaygate.storage.thread import DatabaseThread

UPSERT = (
    "INSERT INTO stats_hourly (hour, name, label, count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (hour, name, label) DO UPDATE SET count = count + excluded.count"
)


class SQLiteHourlyStats:
    def __init__(
        self, thread: DatabaseThread[Any], connection: Callable[[Any], sqlite3.Connection]
    ) -> None:
        self._thread = thread
        self._connection = connection

    async def add(self, rows: Sequence[StatRow]) -> None:
        values = [(r.hour, r.name, r.label, r.count) for r in rows]

        def add(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.executemany(UPSERT, values)

        await self._thread.run(add)

    async def read(self, first: int, end: int) -> list[StatRow]:
        def read(c: Any) -> list[StatRow]:
            rows = self._connection(c).execute(
                "SELECT hour, name, label, count FROM stats_hourly"
                " WHERE hour >= ? AND hour < ? ORDER BY hour, name, label",
                (first, end),
            )
            return [StatRow(int(h), str(n), str(label), int(c)) for h, n, label, c in rows]

        return await self._thread.run(read)

    async def prune(self, before: int) -> None:
        def prune(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.execute("DELETE FROM stats_hourly WHERE hour < ?", (before,))

        await self._thread.run(prune)
