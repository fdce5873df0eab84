"""Creating and upgrading the PostgreSQL schema, one numbered step at a time.

Each step runs in its own transaction under an advisory lock, so nodes that
start together (or `relaygate migrate` beside a running node) never apply a
step twice. The version lives in ``schema_version``; a database newer than
this relaygate is refused.
"""

from __future__ import annotations

import psycopg

MINIMUM_SERVER = 130000  # PostgreSQL 13: the oldest we test against and support
_LOCK_KEY = 0x72656C61  # "rela": the advisory lock that serialises migrations

# Never edit a released step; add a new one. The message log first; the other
# concerns (accounts, credentials, throttles, counters, queue leases) follow as
# their interfaces move to storage/api.py.
STEPS: dict[int, str] = {
    1: """
CREATE TABLE messages (
    id          TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    credential  TEXT,
    client_ip   TEXT NOT NULL,
    mail_from   TEXT NOT NULL,
    rcpt_to     JSONB NOT NULL,
    recipients  INTEGER NOT NULL,
    subject     TEXT NOT NULL,
    size        BIGINT NOT NULL,
    status      TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    smtputf8    BOOLEAN NOT NULL DEFAULT FALSE,
    body_8bit   BOOLEAN NOT NULL DEFAULT FALSE,
    node        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX messages_created ON messages (created_at DESC, id DESC);
CREATE TABLE message_bodies (
    id   TEXT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    body BYTEA NOT NULL
);
CREATE TABLE delivery_attempts (
    id          BIGSERIAL PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    domain      TEXT NOT NULL,
    recipient   TEXT,
    ts          DOUBLE PRECISION NOT NULL,
    host        TEXT,
    reply       TEXT,
    tls         TEXT,
    outcome     TEXT NOT NULL
);
CREATE INDEX delivery_attempts_message ON delivery_attempts (message_id, ts, id);
""",
}
SCHEMA_VERSION = max(STEPS)


class SchemaError(Exception):
    """The database cannot be used: too old a server, or a newer schema."""


async def migrate(connection: psycopg.AsyncConnection[object]) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION; (version before, version after)."""
    if connection.info.server_version < MINIMUM_SERVER:
        raise SchemaError(
            f"PostgreSQL {connection.info.server_version // 10000} is too old;"
            " relaygate needs 13 or later"
        )
    await connection.set_autocommit(True)
    await connection.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    try:
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        before = await _version(connection)
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"database schema {before} is newer than this relaygate ({SCHEMA_VERSION})"
            )
        version = before
        while version < SCHEMA_VERSION:
            version += 1
            async with connection.transaction():
                for statement in _statements(STEPS[version]):
                    await connection.execute(statement.encode())
                await connection.execute("DELETE FROM schema_version")
                await connection.execute(
                    "INSERT INTO schema_version (version) VALUES (%s)", (version,)
                )
        return before, version
    finally:
        await connection.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))


async def _version(connection: psycopg.AsyncConnection[object]) -> int:
    cursor = await connection.execute("SELECT max(version) FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0  # type: ignore[index]


def _statements(script: str) -> list[str]:
    return [statement.strip() for statement in script.split(";") if statement.strip()]
