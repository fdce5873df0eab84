"""The message log (storage.api.MessageLog) on the embedded SQLite database."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from relaygate.storage import bodies
from relaygate.storage.api import (
    MESSAGE_COLUMNS,
    DeliveryAttempt,
    MessageRecord,
    record_from_row,
)
from relaygate.storage.message_query import MessageQuery, where
from relaygate.storage.thread import DatabaseThread


def _recipients(rcpt_to: str) -> list[str]:
    try:
        value: Any = json.loads(rcpt_to)
    except ValueError:
        return [rcpt_to]  # not JSON after all: show what is stored rather than fail
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def _record(row: tuple[Any, ...]) -> MessageRecord:
    return record_from_row(row, _recipients(row[6]))


class SQLiteMessageLog:
    """Reads run in the backend's database thread (storage/sqlite_backend.py)."""

    def __init__(self, thread: DatabaseThread[sqlite3.Connection], bodies_directory: Path) -> None:
        self._thread = thread
        self._bodies = bodies_directory

    async def recent(self, limit: int) -> list[MessageRecord]:
        return await self._thread.run(_recent, limit)

    async def search(self, query: MessageQuery) -> list[MessageRecord]:
        return await self._thread.run(_search, query)

    async def get(self, message_id: str) -> MessageRecord | None:
        return await self._thread.run(_get, message_id)

    async def body(self, message_id: str) -> bytes | None:
        return await self._thread.run(bodies.read, self._bodies, message_id)

    async def history(self, message_id: str) -> list[DeliveryAttempt]:
        return await self._thread.run(_history, message_id)


def _recent(db: sqlite3.Connection, limit: int) -> list[MessageRecord]:
    rows = db.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages"  # noqa: S608 (a constant column list)
        " ORDER BY created_at DESC, id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [_record(row) for row in rows]


def _search(db: sqlite3.Connection, query: MessageQuery) -> list[MessageRecord]:
    clause, values = where(query, "?", "LIKE", "rcpt_to")  # LIKE: ASCII case-insensitive
    rows = db.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages{clause}"  # noqa: S608 (built from constants)
        " ORDER BY created_at DESC, id DESC LIMIT ?",
        (*values, query.limit),
    ).fetchall()
    return [_record(row) for row in rows]


def _get(db: sqlite3.Connection, message_id: str) -> MessageRecord | None:
    row = db.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",  # noqa: S608
        (message_id,),
    ).fetchone()
    return None if row is None else _record(row)


def _history(db: sqlite3.Connection, message_id: str) -> list[DeliveryAttempt]:
    rows = db.execute(
        "SELECT ts, domain, recipient, host, reply, tls, outcome FROM delivery_attempts"
        " WHERE message_id = ? ORDER BY ts, id",
        (message_id,),
    ).fetchall()
    return [DeliveryAttempt(*row) for row in rows]
