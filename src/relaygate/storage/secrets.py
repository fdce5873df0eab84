"""Server-wide random keys kept in the database (table ``secrets``).

The CLI and every server worker open the same database file, so a key kept
there is one key for all of them: a credential the CLI hashes with it is found
by any worker. The first process that needs a key creates it; creation is
``INSERT OR IGNORE`` followed by ``SELECT`` under one write lock, so two
processes starting at once still agree on a single value.

Anyone who can read the database file can read these keys; they protect
against leaked dumps of other tables and log lines, not against a stolen file.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

from relaygate.storage.thread import DatabaseThread

__all__ = ["CREDENTIAL_KEY", "MIN_SECRET_SIZE", "SQLiteSecrets", "get_or_create_secret"]

CREDENTIAL_KEY = "credential_key"  # HMAC key for app-credential secrets
MIN_SECRET_SIZE = 16  # bytes; anything shorter is not a key worth having


def get_or_create_secret(db: sqlite3.Connection, name: str, size: int = 32) -> bytes:
    """The value of secret ``name``, creating ``size`` random bytes on first use.

    An existing value is returned as stored, whatever its size. When ``db`` is
    already inside a transaction the insert joins it (and is committed or
    rolled back with it); otherwise it runs in its own ``BEGIN IMMEDIATE``.
    """
    if size < MIN_SECRET_SIZE:
        raise ValueError(f"secret size must be at least {MIN_SECRET_SIZE} bytes (got {size})")
    found = _read(db, name)
    if found is not None:
        return found  # the usual case: one read, no write lock
    if db.in_transaction:
        return _create(db, name, size)
    db.execute("BEGIN IMMEDIATE")
    try:
        value = _create(db, name, size)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return value


def _read(db: sqlite3.Connection, name: str) -> bytes | None:
    row = db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()
    return bytes(row[0]) if row is not None else None


def _create(db: sqlite3.Connection, name: str, size: int) -> bytes:
    # If another process got here first, IGNORE keeps its value and we read it.
    db.execute(
        "INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)", (name, os.urandom(size))
    )
    value = _read(db, name)
    assert value is not None  # inserted just now, or already there
    return value


class SQLiteSecrets:
    """storage.api.Secrets over a database thread (see sqlite_accounts.same)."""

    def __init__(
        self,
        thread: DatabaseThread[Any],
        connection: Callable[[Any], sqlite3.Connection],
    ) -> None:
        self._thread = thread
        self._connection = connection

    async def get_or_create(self, name: str, size: int = 32) -> bytes:
        return await self._thread.run(
            lambda c: get_or_create_secret(self._connection(c), name, size)
        )
