"""Web UI sessions in the SQLite database of one machine (storage.api.UiSessions)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from relaygate.storage.api import UiSession
from relaygate.storage.thread import DatabaseThread

SEEN_EVERY = 60.0  # seconds: a request writes seen_at at most this often


class SQLiteUiSessions:
    def __init__(
        self, thread: DatabaseThread[Any], connection: Callable[[Any], sqlite3.Connection]
    ) -> None:
        self._thread = thread
        self._connection = connection

    async def add(self, digest: bytes, address: str, password: bytes, now: float) -> None:
        def add(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.execute(
                    "INSERT INTO ui_sessions (digest, address, password, created_at, seen_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (digest, address, password, now, now),
                )

        await self._thread.run(add)

    async def find(self, digest: bytes, now: float) -> UiSession | None:
        def find(c: Any) -> UiSession | None:
            db = self._connection(c)
            row = db.execute(
                "SELECT address, password, created_at, seen_at FROM ui_sessions WHERE digest = ?",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            if now - float(row[3]) >= SEEN_EVERY:
                with db:
                    db.execute("UPDATE ui_sessions SET seen_at = ? WHERE digest = ?", (now, digest))
            return UiSession(str(row[0]), bytes(row[1]), float(row[2]), float(row[3]))

        return await self._thread.run(find)

    async def remove(self, digest: bytes) -> None:
        def remove(c: Any) -> None:
            db = self._connection(c)
            with db:
                db.execute("DELETE FROM ui_sessions WHERE digest = ?", (digest,))

        await self._thread.run(remove)

    async def prune(self, seen_before: float, created_before: float) -> int:
        def prune(c: Any) -> int:
            db = self._connection(c)
            with db:
                return db.execute(
                    "DELETE FROM ui_sessions WHERE seen_at < ? OR created_at < ?",
                    (seen_before, created_before),
                ).rowcount

        return await self._thread.run(prune)
