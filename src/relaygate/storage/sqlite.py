"""Opening the SQLite database and keeping its schema current.

One file under data_dir holds accounts and captured messages. WAL mode lets
readers (the CLI, AUTH look-ups) run beside the spool writer; synchronous=FULL
makes a commit durable before we answer 250.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relaygate.storage.files import private_file

SCHEMA_VERSION = 12

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


# Each entry upgrades the schema by one version; never edit a released one.
_MIGRATIONS: dict[int, str] = {
    2: """
ALTER TABLE accounts ADD COLUMN scram_sha256 TEXT;   -- "i:salt:stored_key:server_key", base64
ALTER TABLE accounts ADD COLUMN limits TEXT;         -- JSON sending-limit overrides
ALTER TABLE messages ADD COLUMN credential TEXT;     -- app credential name, NULL = the password
ALTER TABLE messages ADD COLUMN recipients INTEGER NOT NULL DEFAULT 0;
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
CREATE TABLE credentials (
    id           INTEGER PRIMARY KEY,
    account_id   INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    secret_hash  BLOB NOT NULL UNIQUE,   -- HMAC-SHA256(secrets.credential_key, secret)
    senders      TEXT,                   -- JSON list, NULL = the account's patterns
    networks     TEXT,                   -- JSON list of CIDRs, NULL = any network
    limits       TEXT,                   -- JSON sending-limit overrides
    expires_at   REAL,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL,
    UNIQUE (account_id, name)
);
CREATE TABLE auth_failures (
    ts      REAL NOT NULL,
    ip      TEXT NOT NULL,
    network TEXT NOT NULL,               -- the /24 (IPv4) or /64 (IPv6) of ip
    account TEXT NOT NULL COLLATE NOCASE -- the user name tried, known or not
);
CREATE INDEX auth_failures_network ON auth_failures(network, ts);
CREATE INDEX auth_failures_account ON auth_failures(account, ts);
CREATE TABLE auth_successes (
    account TEXT NOT NULL COLLATE NOCASE,
    network TEXT NOT NULL,
    ts      REAL NOT NULL,
    PRIMARY KEY (account, network)
);
CREATE TABLE send_counters (
    scope          TEXT NOT NULL,        -- "account:<address>" or "credential:<id>"
    window         TEXT NOT NULL,        -- "h2026112901" (UTC hour) or "d20261129" (UTC day)
    messages       INTEGER NOT NULL DEFAULT 0,
    recipients     INTEGER NOT NULL DEFAULT 0,
    new_recipients INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, window)
);
CREATE TABLE known_recipients (
    account    TEXT NOT NULL COLLATE NOCASE,
    recipient  TEXT NOT NULL COLLATE NOCASE,
    first_seen REAL NOT NULL,
    PRIMARY KEY (account, recipient)
);
""",
    3: """
CREATE TABLE deliveries (
    id           INTEGER PRIMARY KEY,
    message_id   TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    domain       TEXT NOT NULL,          -- recipients' domain, lower case
    recipients   TEXT NOT NULL,          -- JSON list still to deliver
    status       TEXT NOT NULL,          -- queued | sending | delivered | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    last_reply   TEXT,
    warned       INTEGER NOT NULL DEFAULT 0,
    UNIQUE (message_id, domain)
);
CREATE INDEX deliveries_due ON deliveries(status, next_attempt);
CREATE TABLE delivery_attempts (
    id          INTEGER PRIMARY KEY,
    message_id  TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    domain      TEXT NOT NULL,
    recipient   TEXT,                    -- NULL: the whole transaction
    ts          REAL NOT NULL,
    host        TEXT,
    reply       TEXT,
    tls         TEXT,                    -- "TLSv1.3 <cipher> verified", NULL = clear text
    outcome     TEXT NOT NULL            -- delivered | deferred | failed
);
CREATE INDEX delivery_attempts_message ON delivery_attempts(message_id);
""",
    4: """
ALTER TABLE messages ADD COLUMN smtputf8 INTEGER NOT NULL DEFAULT 0;  -- MAIL ... SMTPUTF8
ALTER TABLE messages ADD COLUMN body_8bit INTEGER NOT NULL DEFAULT 0; -- MAIL ... BODY=8BITMIME
""",
    5: """
ALTER TABLE message_bodies ADD COLUMN in_file INTEGER NOT NULL DEFAULT 0; -- 1: body in bodies/<id>
""",
    6: """
CREATE TABLE api_tokens (           -- bearer tokens of the HTTP API (storage/sqlite_tokens.py)
    name       TEXT PRIMARY KEY,
    digest     BLOB NOT NULL UNIQUE, -- HMAC-SHA256 of the token, keyed with a server secret
    read_only  INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used  REAL
);
""",
    7: """
ALTER TABLE accounts ADD COLUMN admin INTEGER NOT NULL DEFAULT 0; -- 1: manages all in the web UI
CREATE TABLE ui_sessions (          -- web UI logins (storage/sqlite_sessions.py)
    digest     BLOB PRIMARY KEY,     -- HMAC-SHA256 of the cookie, keyed with a server secret
    address    TEXT NOT NULL COLLATE NOCASE,
    password   BLOB NOT NULL,        -- fingerprint of the password hash it was opened with
    created_at REAL NOT NULL,
    seen_at    REAL NOT NULL
);
CREATE INDEX ui_sessions_seen ON ui_sessions(seen_at);
""",
    8: """
CREATE TABLE stats_hourly (         -- counts per hour (stats.py, storage/sqlite_stats.py)
    hour  INTEGER NOT NULL,         -- the hour's start, seconds since the epoch (UTC)
    name  TEXT NOT NULL,            -- accepted | delivered | deferred | bounced | refused | ...
    label TEXT NOT NULL,            -- '' or, for refused, the reason
    count INTEGER NOT NULL,
    PRIMARY KEY (hour, name, label)
);
""",
    9: """
CREATE INDEX messages_account ON messages(lower(account), created_at); -- one account's log
""",
    10: """
CREATE TABLE webhooks (             -- webhook endpoints made through the API (sqlite_webhooks.py)
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,       -- JSON list; [] = every event
    secret     TEXT NOT NULL,       -- whsec_<base64>: the receiver needs it to verify
    created_at REAL NOT NULL
);
CREATE TABLE webhook_outbox (       -- one event for one endpoint, until delivered or given up
    id           INTEGER PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    event_id     TEXT NOT NULL,     -- the webhook-id header, the same on every retry
    type         TEXT NOT NULL,
    body         TEXT NOT NULL,
    status       TEXT NOT NULL,     -- queued | sending | delivered | failed
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    lease_until  REAL,
    created_at   REAL NOT NULL,
    UNIQUE (endpoint, event_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox(status, next_attempt);
CREATE TABLE webhook_attempts (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER NOT NULL REFERENCES webhook_outbox(id) ON DELETE CASCADE,
    endpoint    TEXT NOT NULL,
    ts          REAL NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration    REAL NOT NULL,
    outcome     TEXT NOT NULL       -- delivered | retry | failed
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts(endpoint, ts);
CREATE TABLE webhook_cursor (       -- how far collect has read messages / delivery_attempts
    name     TEXT PRIMARY KEY,
    position REAL NOT NULL
);
""",
    11: """
ALTER TABLE messages ADD COLUMN body_removed_at REAL; -- retention removed the stored body then
CREATE INDEX messages_body_kept ON messages(created_at) WHERE body_removed_at IS NULL;
""",
    12: """
CREATE TABLE defence_accounts (     -- compromised-account defence (storage/sqlite_defence.py)
    account           TEXT PRIMARY KEY,  -- lower case
    held_at           REAL,              -- NULL: not held
    reason            TEXT,              -- volume | new_recipients | new_network | remote_rejects
    detail            TEXT,
    counts            TEXT,              -- JSON: the counts that fired the trigger
    expected_until    REAL,              -- a release or `held expect` raised the baseline ...
    expected_messages INTEGER NOT NULL DEFAULT 0  -- ... to this many messages an hour
);
CREATE TABLE defence_seen (         -- networks (/24, /48) and EHLO names an account logged in with
    account    TEXT NOT NULL,
    kind       TEXT NOT NULL,           -- network | client
    value      TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen  REAL NOT NULL,
    novel      INTEGER NOT NULL DEFAULT 0, -- 1: the account had used other networks before
    PRIMARY KEY (account, kind, value)
);
CREATE INDEX messages_held ON messages(lower(account)) WHERE status = 'held';
CREATE INDEX deliveries_held ON deliveries(message_id) WHERE status = 'held';
""",
}


# Short-lived shared state (failed-login throttling) lives in a file of its own:
# every AUTH writes there (see throttle.py), and in the main database those
# writes would queue behind the spool's fsync-bound group commits. Losing it
# costs little (the windows are minutes to hours), so it commits without fsync.
# (Schema 2 of the main database has tables of the same names; they are unused.)
_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_failures (
    ts      REAL NOT NULL,
    ip      TEXT NOT NULL,
    network TEXT NOT NULL,               -- the /24 (IPv4) or /64 (IPv6) of ip
    account TEXT NOT NULL COLLATE NOCASE -- the user name tried, known or not
);
CREATE INDEX IF NOT EXISTS auth_failures_network ON auth_failures(network, ts);
CREATE INDEX IF NOT EXISTS auth_failures_account ON auth_failures(account, ts);
CREATE TABLE IF NOT EXISTS auth_pending ( -- attempts being checked right now (throttle.py)
    ts      REAL NOT NULL,
    ip      TEXT NOT NULL,
    network TEXT NOT NULL,
    account TEXT NOT NULL COLLATE NOCASE
);
CREATE INDEX IF NOT EXISTS auth_pending_network ON auth_pending(network);
CREATE INDEX IF NOT EXISTS auth_pending_account ON auth_pending(account);
CREATE TABLE IF NOT EXISTS auth_successes (
    account TEXT NOT NULL COLLATE NOCASE,
    network TEXT NOT NULL,
    ts      REAL NOT NULL,
    PRIMARY KEY (account, network)
);
"""


def state_path(database: Path) -> Path:
    """The throttle state file beside the main database."""
    return database.with_name("throttle.db")


def connect_state(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the throttle state database."""
    try:
        private_file(path)  # 0600, and so its -wal and -shm (storage/files.py)
        db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        db.execute("PRAGMA busy_timeout=10000")  # first: workers open it at the same time
        _use_wal(db, 10.0)
        db.execute("PRAGMA synchronous=NORMAL")
        _run_script(db, _STATE_SCHEMA)  # IF NOT EXISTS: also adds tables to an older file
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    return db


@dataclass
class ServiceConnections:
    """What a worker's service thread works with: the relaygate database
    (``data``: accounts, credentials, sending counters) and the throttle state
    (``state``). Two connections, not one with the other attached: a write
    transaction on an attached pair would lock both files, and a lock held on
    the main database (a backup, the CLI) must not stop throttle reservations.
    """

    data: sqlite3.Connection
    state: sqlite3.Connection

    def close(self) -> None:
        self.data.close()
        self.state.close()


def connect_service(database: Path) -> ServiceConnections:
    data = connect(database)
    # Reads, and small writes (credential last-used) that need no fsync.
    data.execute("PRAGMA synchronous=NORMAL")
    try:
        return ServiceConnections(data, connect_state(state_path(database)))
    except DatabaseError:
        data.close()
        raise


class DatabaseError(Exception):
    """A database problem a user can act on (unreadable file, newer schema)."""


def migrate(path: Path) -> tuple[int, int]:
    """Create or upgrade the database; (schema version before, after)."""

    def version() -> int:
        if not path.exists():
            return 0
        try:
            db = sqlite3.connect(path)
            try:
                return int(db.execute("PRAGMA user_version").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise DatabaseError(f"{path}: {exc}") from None

    before = version()
    connect(path).close()
    return before, version()


def connect(path: Path, *, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open (creating if needed) the database with our pragmas and schema."""
    try:
        private_file(path)  # 0600, and so its -wal and -shm (storage/files.py)
        db = sqlite3.connect(
            path, isolation_level=None, timeout=30.0, check_same_thread=check_same_thread
        )
        db.execute("PRAGMA busy_timeout=30000")
        _use_wal(db, 30.0)
        db.execute("PRAGMA synchronous=FULL")
        # Truncate the WAL file back to 256 MiB whenever it is reset (see spool._limit_wal).
        db.execute("PRAGMA journal_size_limit=268435456")
        db.execute("PRAGMA foreign_keys=ON")
        _migrate(db)
    except sqlite3.Error as exc:
        raise DatabaseError(f"{path}: {exc}") from None
    except OSError as exc:
        raise DatabaseError(f"{path}: {exc.strerror or exc}") from None
    return db


def _use_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Switch a new file to WAL. Several processes opening one new file at once
    race for the switch, and SQLite answers the losers "database is locked"
    at once, without its busy handler: try again until the winner is done."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (the write lock now, not at the first write, so no
    deadlock between two readers turning writers), committed at the end,
    rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
        if version == 0:
            _run_script(db, _SCHEMA)
            version = 1
        while version < SCHEMA_VERSION:
            version += 1
            _run_script(db, _MIGRATIONS[version])
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _run_script(db: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT our transaction; run statement by statement.
    # Comments go first, so a ";" inside one cannot split a statement.
    text = "\n".join(line.split("--")[0] for line in script.splitlines())
    for statement in text.split(";"):
        if statement.strip():
            db.execute(statement)
