"""HTTP API tokens in the SQLite database of one machine (storage.api.ApiTokens)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from relaygate.storage.api import ApiToken, TokenExists
from relaygate.storage.thread import DatabaseThread


def _token(row: Sequence[Any]) -> ApiToken:
    return ApiToken(str(row[0]), bool(row[1]), float(row[2]), row[3])


class SQLiteApiTokens:
    def __init__(
        self, thread: DatabaseThread[Any], connection: Callable[[Any], sqlite3.Connection]
    ) -> None:
        self._thread = thread
        self._connection = connection

    async def add(self, name: str, digest: bytes, read_only: bool, now: float) -> ApiToken:
        def add(c: Any) -> ApiToken:
            db = self._connection(c)
            try:
                with db:
                    db.execute(
                        "INSERT INTO api_tokens (name, digest, read_only, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (name, digest, int(read_only), now),
                    )
            except sqlite3.IntegrityError:
                raise TokenExists(name) from None
            return ApiToken(name, read_only, now, None)

        return await self._thread.run(add)

    async def list(self) -> list[ApiToken]:
        def read(c: Any) -> list[ApiToken]:
            rows = self._connection(c).execute(
                "SELECT name, read_only, created_at, last_used FROM api_tokens ORDER BY name"
            )
            return [_token(row) for row in rows]

        return await self._thread.run(read)

    async def revoke(self, name: str) -> bool:
        def revoke(c: Any) -> bool:
            db = self._connection(c)
            with db:
                return db.execute("DELETE FROM api_tokens WHERE name = ?", (name,)).rowcount > 0

        return await self._thread.run(revoke)

    async def find(self, digest: bytes, now: float) -> ApiToken | None:
        def find(c: Any) -> ApiToken | None:
            db = self._connection(c)
            row = db.execute(
                "SELECT name, read_only, created_at, last_used FROM api_tokens WHERE digest = ?",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            if row[3] is None or now - float(row[3]) >= 60:  # a write a minute at most
                with db:
                    db.execute("UPDATE api_tokens SET last_used = ? WHERE name = ?", (now, row[0]))
            return ApiToken(str(row[0]), bool(row[1]), float(row[2]), now)

        return await self._thread.run(find)
