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

# Never edit a released step; add a new one. Failed-login windows and
# connection counts are not here: they are node-local, or in Redis when nodes
# share them ([shared] redis_url).
STEPS: dict[int, str | list[str]] = {
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
    # Everything else a node needs. Addresses compare without case (SQLite's
    # COLLATE NOCASE): unique indexes on lower(), and look-ups by lower().
    2: """
ALTER TABLE message_bodies ADD COLUMN header BYTEA NOT NULL DEFAULT '';
CREATE TABLE accounts (
    id            BIGSERIAL PRIMARY KEY,
    address       TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    disabled      BOOLEAN NOT NULL DEFAULT FALSE,
    scram_sha256  TEXT,
    limits        TEXT,
    created_at    DOUBLE PRECISION NOT NULL,
    updated_at    DOUBLE PRECISION NOT NULL
);
CREATE UNIQUE INDEX accounts_address ON accounts (lower(address));
CREATE TABLE account_senders (
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    pattern    TEXT NOT NULL
);
CREATE UNIQUE INDEX account_senders_pattern ON account_senders (account_id, lower(pattern));
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);
CREATE TABLE credentials (
    id           BIGSERIAL PRIMARY KEY,
    account_id   BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    secret_hash  BYTEA NOT NULL UNIQUE,
    senders      TEXT,
    networks     TEXT,
    limits       TEXT,
    expires_at   DOUBLE PRECISION,
    created_at   DOUBLE PRECISION NOT NULL,
    last_used_at DOUBLE PRECISION,
    revoked_at   DOUBLE PRECISION,
    UNIQUE (account_id, name)
);
CREATE TABLE send_counters (
    scope          TEXT NOT NULL,
    "window"       TEXT NOT NULL,
    messages       BIGINT NOT NULL DEFAULT 0,
    recipients     BIGINT NOT NULL DEFAULT 0,
    new_recipients BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, "window")
);
CREATE TABLE known_recipients (
    account    TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (account, recipient)
);
CREATE TABLE deliveries (
    id           BIGSERIAL PRIMARY KEY,
    message_id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    domain       TEXT NOT NULL,
    recipients   JSONB NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL,
    created_at   DOUBLE PRECISION NOT NULL,
    updated_at   DOUBLE PRECISION NOT NULL,
    last_reply   TEXT,
    warned       BOOLEAN NOT NULL DEFAULT FALSE,
    lease_node   TEXT,
    lease_until  DOUBLE PRECISION,
    UNIQUE (message_id, domain)
);
CREATE INDEX deliveries_due ON deliveries (next_attempt) WHERE status = 'queued';
CREATE INDEX deliveries_leased ON deliveries (lease_until) WHERE status = 'sending';
CREATE TABLE nodes (
    name       TEXT PRIMARY KEY,
    started_at DOUBLE PRECISION NOT NULL,
    last_seen  DOUBLE PRECISION NOT NULL,
    pid        INTEGER NOT NULL,
    version    TEXT NOT NULL
);
CREATE TABLE mta_sts_policies (
    domain     TEXT PRIMARY KEY,
    id         TEXT NOT NULL,
    policy     TEXT NOT NULL,
    fetched_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
""",
    # DKIM keys live with the rest on a cluster: every node signs with the same
    # keys (on one machine they stay files in data_dir/dkim).
    3: """
CREATE TABLE dkim_keys (
    domain     TEXT NOT NULL,
    selector   TEXT NOT NULL,
    key_type   TEXT NOT NULL,
    pem        TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (domain, selector, key_type)
);
-- Large bodies in pieces (storage/postgres/bodies.py): libpq keeps its buffers
-- as large as the largest value it has carried, for the connection's life.
ALTER TABLE message_bodies ADD COLUMN chunks INTEGER NOT NULL DEFAULT 0;
CREATE TABLE message_body_chunks (
    id   TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    seq  INTEGER NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (id, seq)
);
""",
    # Bodies are stored as they came, not compressed: compressing every message
    # on the way in cost PostgreSQL more CPU than anything else it does for one
    # (docs/performance.md); mail is mostly base64 and compresses little anyway.
    4: """
ALTER TABLE message_bodies ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE message_bodies ALTER COLUMN header SET STORAGE EXTERNAL;
ALTER TABLE message_body_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
-- A body that fits in a page stays in its row: no TOAST rows and index entries.
ALTER TABLE message_bodies SET (toast_tuple_target = 8160);
""",
    # Delivery outcomes recorded many at a time (storage/postgres/queue.py), one
    # round trip and one commit per batch. The messages' rows are locked first, so
    # finishes of one message's rows (here, on another connection or another
    # node) take turns and its status counts every outcome committed before it.
    5: [
        """
CREATE FUNCTION relaygate_finish(
    p_node TEXT, p_ids BIGINT[], p_status TEXT[], p_recipients TEXT[], p_attempts INTEGER[],
    p_next DOUBLE PRECISION[], p_now DOUBLE PRECISION[], p_last TEXT[],
    a_delivery BIGINT[], a_recipient TEXT[], a_host TEXT[], a_reply TEXT[], a_tls TEXT[],
    a_kind TEXT[]
) RETURNS SETOF BIGINT LANGUAGE plpgsql AS $$
DECLARE
    v_moved BIGINT[];
BEGIN
    PERFORM 1 FROM messages WHERE id IN (SELECT message_id FROM deliveries WHERE id = ANY(p_ids))
        ORDER BY id FOR UPDATE;
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_status, p_recipients, p_attempts, p_next, p_now, p_last)
            AS i(id, status, recipients, attempts, next_attempt, now, last_reply)
    ), moved AS (
        UPDATE deliveries AS d SET status = i.status, recipients = i.recipients::jsonb,
            attempts = i.attempts, next_attempt = i.next_attempt, updated_at = i.now,
            last_reply = i.last_reply, lease_node = NULL, lease_until = NULL
        FROM input AS i
        WHERE d.id = i.id AND d.status = 'sending' AND d.lease_node = p_node
        RETURNING d.id
    )
    SELECT coalesce(array_agg(id), '{}') INTO v_moved FROM moved;
    INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host, reply, tls, outcome)
        SELECT d.message_id, d.domain, a.recipient, d.updated_at, a.host, a.reply, a.tls, a.kind
        FROM unnest(a_delivery, a_recipient, a_host, a_reply, a_tls, a_kind)
            AS a(delivery, recipient, host, reply, tls, kind)
        JOIN deliveries AS d ON d.id = a.delivery
        WHERE a.delivery = ANY(v_moved);
    UPDATE messages SET status = CASE
        WHEN c.pending > 0 THEN CASE WHEN c.final = 0 THEN 'queued' ELSE 'partly delivered' END
        WHEN c.final = c.delivered AND c.final > 0 THEN 'delivered'
        WHEN c.final = c.failed AND c.final > 0 THEN 'failed'
        ELSE 'partly failed' END
    FROM (
        SELECT m.id,
            (SELECT count(*) FROM deliveries
                WHERE message_id = m.id AND status IN ('queued', 'sending')) AS pending,
            s.final, s.delivered, s.failed
        FROM (SELECT DISTINCT message_id AS id FROM deliveries WHERE id = ANY(v_moved)) AS m,
        LATERAL (
            SELECT count(*) FILTER (WHERE outcome <> 'deferred') AS final,
                count(*) FILTER (WHERE outcome = 'delivered') AS delivered,
                count(*) FILTER (WHERE outcome = 'failed') AS failed
            FROM delivery_attempts WHERE message_id = m.id AND recipient IS NOT NULL
        ) AS s
    ) AS c
    WHERE messages.id = c.id;
    RETURN QUERY SELECT unnest(v_moved);
END
$$
"""
    ],
    # Bearer tokens of the HTTP API (storage/postgres/tokens.py).
    6: """
CREATE TABLE api_tokens (
    name       TEXT PRIMARY KEY,
    digest     BYTEA NOT NULL UNIQUE,
    read_only  BOOLEAN NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    last_used  DOUBLE PRECISION
);
""",
    # The web UI: accounts that see everything, and login sessions (postgres/sessions.py).
    7: """
ALTER TABLE accounts ADD COLUMN admin BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE ui_sessions (
    digest     BYTEA PRIMARY KEY,
    address    TEXT NOT NULL,
    password   BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    seen_at    DOUBLE PRECISION NOT NULL
);
CREATE INDEX ui_sessions_seen ON ui_sessions(seen_at);
""",
    # Hourly stats, added to by every node (stats.py, storage/postgres/stats.py).
    8: """
CREATE TABLE stats_hourly (
    hour  BIGINT NOT NULL,
    name  TEXT NOT NULL,
    label TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (hour, name, label)
);
""",
    # One account's messages, newest first (the web UI for accounts, ?account= in the API).
    9: """
CREATE INDEX messages_account ON messages (lower(account), created_at DESC, id DESC);
""",
    # Webhooks: endpoints made through the API, the outbox, attempts (postgres/webhooks.py).
    10: """
CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    events     JSONB NOT NULL,
    secret     TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE webhook_outbox (
    id           BIGSERIAL PRIMARY KEY,
    endpoint     TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    body         TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt DOUBLE PRECISION NOT NULL,
    lease_until  DOUBLE PRECISION,
    node         TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    UNIQUE (endpoint, event_id)
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (status, next_attempt);
CREATE TABLE webhook_attempts (
    id          BIGSERIAL PRIMARY KEY,
    outbox_id   BIGINT NOT NULL REFERENCES webhook_outbox (id) ON DELETE CASCADE,
    endpoint    TEXT NOT NULL,
    ts          DOUBLE PRECISION NOT NULL,
    status_code INTEGER,
    error       TEXT,
    duration    DOUBLE PRECISION NOT NULL,
    outcome     TEXT NOT NULL
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint, ts);
CREATE TABLE webhook_cursor (
    name     TEXT PRIMARY KEY,
    position DOUBLE PRECISION NOT NULL
);
CREATE INDEX delivery_attempts_ts ON delivery_attempts (ts)
""",
    # Retention (services/retention.py): when it removed a message's body, and
    # the messages whose bodies it has still to look at.
    11: """
ALTER TABLE messages ADD COLUMN body_removed_at DOUBLE PRECISION;
CREATE INDEX messages_body_kept ON messages (created_at) WHERE body_removed_at IS NULL
""",
    # Compromised-account defence (storage/postgres/defence.py): holds and what
    # an account was seen logging in with; held messages and delivery rows.
    12: """
CREATE TABLE defence_accounts (
    account           TEXT PRIMARY KEY,
    held_at           DOUBLE PRECISION,
    reason            TEXT,
    detail            TEXT,
    counts            JSONB,
    expected_until    DOUBLE PRECISION,
    expected_messages BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE defence_seen (
    account    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    value      TEXT NOT NULL,
    first_seen DOUBLE PRECISION NOT NULL,
    last_seen  DOUBLE PRECISION NOT NULL,
    novel      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (account, kind, value)
);
CREATE INDEX messages_held ON messages (lower(account)) WHERE status = 'held';
CREATE INDEX deliveries_held ON deliveries (message_id) WHERE status = 'held'
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


async def current_version(connection: psycopg.AsyncConnection[object]) -> int:
    """The schema version of the database (0: none yet)."""
    cursor = await connection.execute("SELECT to_regclass('schema_version') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:  # type: ignore[index]
        return 0
    return await _version(connection)


async def _version(connection: psycopg.AsyncConnection[object]) -> int:
    cursor = await connection.execute("SELECT max(version) FROM schema_version")
    row = await cursor.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0  # type: ignore[index]


def _statements(script: str | list[str]) -> list[str]:
    """A step's statements: a script split at semicolons, or a list (for a
    function, whose body has semicolons of its own)."""
    if isinstance(script, list):
        return [statement.strip() for statement in script]
    return [statement.strip() for statement in script.split(";") if statement.strip()]
