"""Opening the SQLite database and keeping its schema current.

One file under data_dir holds accounts and captured messages. WAL mode lets
readers (the CLI, AUTH look-ups) run beside the spool writer; synchronous=FULL
makes a commit durable before we answer 250.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id            INTEGER PRIMARY KEY,
    address       TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS account_senders (
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    pattern    TEXT NOT NULL COLLATE NOCASE,
    PRIMARY KEY (account_id, pattern)
);
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    client_ip   TEXT NOT NULL,
    mail_from   TEXT NOT NULL,
    rcpt_to     TEXT NOT NULL,      -- JSON array of addresses
    subject     TEXT NOT NULL,
    size        INTEGER NOT NULL,
    status      TEXT NOT NULL,      -- captured (more states come with delivery)
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages(created_at);
CREATE TABLE IF NOT EXISTS message_bodies (
    id   TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    body BLOB NOT NULL
);
"""


class DatabaseError(Exception):
    """A database problem a user can act on (unreadable file, newer schema)."""


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating if needed) the database with our pragmas and schema."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            path, isolation_level=None, timeout=30.0, check_same_thread=check_same_thread
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        _migrate(db)
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    return db


def _migrate(db: sqlite3.Connection) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise DatabaseError(
            f"database schema {version} is newer than this relaygate ({SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version < SCHEMA_VERSION:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
