"""The message log (storage.api.MessageLog) on the embedded SQLite database."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relaygate.storage import bodies
from relaygate.storage.api import (
    MESSAGE_COLUMNS,
    Deleted,
    DeliveryAttempt,
    MessageRecord,
    record_from_row,
)
from relaygate.storage.message_query import SETTLED, MessageQuery, where
from relaygate.storage.sqlite import write_transaction
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

    async def delete(self, message_ids: Sequence[str]) -> Deleted:
        return await self._thread.run(_delete, self._bodies, list(message_ids))

    async def count_cutoff(self, keep: int) -> float | None:
        return await self._thread.run(_count_cutoff, keep)

    async def prune(self, before: float, limit: int) -> int:
        return await self._thread.run(_prune, self._bodies, before, limit)

    async def prune_bodies(self, before: float, limit: int, now: float) -> int:
        return await self._thread.run(_prune_bodies, self._bodies, before, limit, now)


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


def _remove(db: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    """Delete these messages (their bodies, queue rows and history go with
    them: ON DELETE CASCADE) inside the caller's transaction; the ids whose
    body is a file, to unlink once committed."""
    marks = ",".join("?" * len(ids))
    files = [
        str(row[0])
        for row in db.execute(
            f"SELECT id FROM message_bodies WHERE in_file = 1 AND id IN ({marks})",  # noqa: S608
            ids,
        )
    ]
    db.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)  # noqa: S608
    _clamp_webhook_cursors(db)
    return files


def _clamp_webhook_cursors(db: sqlite3.Connection) -> None:
    """Webhooks read new rows past a rowid (sqlite_webhooks.py), and SQLite
    hands the next row max(rowid) + 1: with the newest rows deleted, new ones
    would get ids the cursor has passed. Pull the cursors back to what is left,
    in the deleting transaction, so no message or attempt is skipped."""
    db.execute(
        "UPDATE webhook_cursor SET position ="
        " min(position, (SELECT coalesce(max(rowid), 0) FROM messages)) WHERE name = 'messages'"
    )
    db.execute(
        "UPDATE webhook_cursor SET position ="
        " min(position, (SELECT coalesce(max(id), 0) FROM delivery_attempts))"
        " WHERE name = 'attempts'"
    )


def _unlink(directory: Path, ids: Sequence[str]) -> None:
    # After the commit: a crash in between leaves files no row names, which
    # bodies.remove_orphans deletes at the next start.
    for message_id in ids:
        bodies.remove_file(directory, message_id)


def _delete(db: sqlite3.Connection, directory: Path, ids: list[str]) -> Deleted:
    removed: list[str] = []
    unknown: list[str] = []
    sending: list[str] = []
    with write_transaction(db):
        for message_id in dict.fromkeys(ids):
            if db.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone() is None:
                unknown.append(message_id)
            elif db.execute(
                "SELECT 1 FROM deliveries WHERE message_id = ? AND status = 'sending'",
                (message_id,),
            ).fetchone():
                sending.append(message_id)
            else:
                removed.append(message_id)
        files = _remove(db, removed) if removed else []
    _unlink(directory, files)
    return Deleted(removed, unknown, sending)


def _count_cutoff(db: sqlite3.Connection, keep: int) -> float | None:
    row = db.execute(
        "SELECT created_at FROM messages ORDER BY created_at DESC LIMIT 1 OFFSET ?", (keep - 1,)
    ).fetchone()
    return None if row is None else float(row[0])


def _prune(db: sqlite3.Connection, directory: Path, before: float, limit: int) -> int:
    with write_transaction(db):
        ids = [
            str(row[0])
            for row in db.execute(
                f"SELECT m.id FROM messages m WHERE m.created_at < ? AND {SETTLED}"  # noqa: S608
                " ORDER BY m.created_at LIMIT ?",
                (before, limit),
            )
        ]
        files = _remove(db, ids) if ids else []
    _unlink(directory, files)
    return len(ids)


def _prune_bodies(
    db: sqlite3.Connection, directory: Path, before: float, limit: int, now: float
) -> int:
    with write_transaction(db):
        rows = db.execute(
            "SELECT m.id, coalesce(b.in_file, 0) FROM messages m"  # noqa: S608 (constants)
            " LEFT JOIN message_bodies b ON b.id = m.id"
            f" WHERE m.created_at < ? AND m.body_removed_at IS NULL AND {SETTLED}"
            " ORDER BY m.created_at LIMIT ?",
            (before, limit),
        ).fetchall()
        ids = [str(row[0]) for row in rows]
        if ids:
            marks = ",".join("?" * len(ids))
            db.execute(f"DELETE FROM message_bodies WHERE id IN ({marks})", ids)  # noqa: S608
            db.execute(
                f"UPDATE messages SET body_removed_at = ? WHERE id IN ({marks})",  # noqa: S608
                (now, *ids),
            )
    _unlink(directory, [str(row[0]) for row in rows if row[1]])
    return len(ids)
