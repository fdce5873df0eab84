"""``relaygate storage copy --to URL``: one SQLite box's data into an empty PostgreSQL.

The way from one machine to a cluster: stop ``serve``, copy, point every node's
``[storage] url`` at the database, start them. Everything that defines the
service moves: accounts with their sender patterns, password hashes, SCRAM
keys and limits; app credentials (their keyed hashes stay valid because the
server secrets move too); DKIM keys; the message log with bodies and delivery
history; the delivery queue (held rows stay held); sending counters and known
recipients (so limits carry on where they were); the defence's holds and seen
networks; the MTA-STS cache; the hourly stats. Failed-login windows are
short-lived and stay behind.

The target must be empty (no accounts, messages or secrets): a copy into a
database in use would mix two services' keys. It runs in one transaction:
all of it lands, or nothing.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from relaygate.delivery.dkim import key_directory
from relaygate.storage import bodies
from relaygate.storage.postgres.pool import PostgresUnavailable, describe


class CopyError(Exception):
    """Why nothing was copied, in one line."""


@dataclass
class CopyReport:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, count: int) -> None:
        self.counts[what] = self.counts.get(what, 0) + count


_EMPTY_CHECK = ("accounts", "messages", "secrets", "dkim_keys")


def copy_to_postgres(database: Path, data_dir: Path, url: str) -> CopyReport:
    """Copy; raises CopyError or PostgresUnavailable (one line each)."""
    if not database.exists():
        raise CopyError(f"no database to copy at {database}")
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        try:
            target = psycopg.connect(url, connect_timeout=5)
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"{describe(url)}: {' '.join(str(exc).split())}") from None
        with target:
            for table in _EMPTY_CHECK:
                row = target.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone()  # noqa: S608
                if row is not None and row[0]:
                    raise CopyError(
                        f"{describe(url)} is not empty (table {table} has rows);"
                        " storage copy only fills a new database"
                    )
            report = CopyReport()
            _copy(source, target, database, data_dir, report)
        return report
    except psycopg.Error as exc:
        raise CopyError(f"copy failed, nothing was copied: {' '.join(str(exc).split())}") from None
    finally:
        source.close()


def _copy(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    database: Path,
    data_dir: Path,
    report: CopyReport,
) -> None:
    secrets = source.execute("SELECT name, value FROM secrets").fetchall()
    target.cursor().executemany(
        "INSERT INTO secrets (name, value) VALUES (%s, %s)", [(n, bytes(v)) for n, v in secrets]
    )
    report.add("secrets", len(secrets))

    # Accounts keep their ids, so credentials and patterns point at the same rows.
    accounts = source.execute(
        "SELECT id, address, password_hash, disabled, scram_sha256, limits, created_at,"
        " updated_at, admin FROM accounts"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO accounts (id, address, password_hash, disabled, scram_sha256, limits,"
        " created_at, updated_at, admin) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [(r[0], r[1], r[2], bool(r[3]), *r[4:8], bool(r[8])) for r in accounts],
    )
    report.add("accounts", len(accounts))
    senders = source.execute("SELECT account_id, pattern FROM account_senders").fetchall()
    target.cursor().executemany(
        "INSERT INTO account_senders (account_id, pattern) VALUES (%s, %s)", senders
    )
    credentials = source.execute(
        "SELECT id, account_id, name, secret_hash, senders, networks, limits, expires_at,"
        " created_at, last_used_at, revoked_at FROM credentials"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO credentials (id, account_id, name, secret_hash, senders, networks, limits,"
        " expires_at, created_at, last_used_at, revoked_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [(*r[:3], bytes(r[3]), *r[4:]) for r in credentials],
    )
    report.add("credentials", len(credentials))
    for table in ("accounts", "credentials"):  # new rows continue after the copied ids
        target.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"  # noqa: S608
            f" COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)"
        )

    # API tokens keep working: their keyed hashes moved with the secrets above.
    tokens = source.execute(
        "SELECT name, digest, read_only, created_at, last_used FROM api_tokens"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO api_tokens (name, digest, read_only, created_at, last_used)"
        " VALUES (%s, %s, %s, %s, %s)",
        [(r[0], bytes(r[1]), bool(r[2]), r[3], r[4]) for r in tokens],
    )
    report.add("api tokens", len(tokens))
    # The hourly stats, so the dashboard's history carries on.
    hours = source.execute("SELECT hour, name, label, count FROM stats_hourly").fetchall()
    target.cursor().executemany(
        "INSERT INTO stats_hourly (hour, name, label, count) VALUES (%s, %s, %s, %s)", hours
    )
    report.add("hourly stats", len(hours))
    report.add("dkim keys", _copy_dkim_keys(target, data_dir))
    _copy_messages(source, target, bodies.directory_for(database), report)

    deliveries = source.execute(
        "SELECT message_id, domain, recipients, status, attempts, next_attempt, created_at,"
        " updated_at, last_reply, warned FROM deliveries"
        " WHERE status IN ('queued', 'sending', 'held')"
    ).fetchall()
    # A row caught 'sending' (a crash) is queued again, as a restart would; held stays held.
    target.cursor().executemany(
        "INSERT INTO deliveries (message_id, domain, recipients, status, attempts, next_attempt,"
        " created_at, updated_at, last_reply, warned)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [
            (r[0], r[1], r[2], "held" if r[3] == "held" else "queued", *r[4:9], bool(r[9]))
            for r in deliveries
        ],
    )
    report.add("queued deliveries", len(deliveries))
    _copy_defence(source, target, report)

    counters = source.execute(
        "SELECT scope, window, messages, recipients, new_recipients FROM send_counters"
    ).fetchall()
    target.cursor().executemany(
        'INSERT INTO send_counters (scope, "window", messages, recipients, new_recipients)'
        " VALUES (%s, %s, %s, %s, %s)",
        counters,
    )
    known = source.execute(
        "SELECT lower(account), lower(recipient), min(first_seen) FROM known_recipients"
        " GROUP BY lower(account), lower(recipient)"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO known_recipients (account, recipient, first_seen) VALUES (%s, %s, %s)",
        known,
    )
    report.add("sending counters", len(counters))
    if _has_table(source, "mta_sts_policies"):
        policies = source.execute(
            "SELECT domain, id, policy, fetched_at, expires_at FROM mta_sts_policies"
        ).fetchall()
        target.cursor().executemany(
            "INSERT INTO mta_sts_policies (domain, id, policy, fetched_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            policies,
        )
        report.add("MTA-STS policies", len(policies))


def _copy_defence(
    source: sqlite3.Connection, target: psycopg.Connection[Any], report: CopyReport
) -> None:
    """Holds and baselines of the compromised-account defence (schema 12)."""
    if not _has_table(source, "defence_accounts"):
        return
    holds = source.execute(
        "SELECT account, held_at, reason, detail, counts, expected_until, expected_messages"
        " FROM defence_accounts"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO defence_accounts (account, held_at, reason, detail, counts,"
        " expected_until, expected_messages) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s)",
        holds,
    )
    report.add("held or expected accounts", len(holds))
    seen = source.execute(
        "SELECT account, kind, value, first_seen, last_seen, novel FROM defence_seen"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO defence_seen (account, kind, value, first_seen, last_seen, novel)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        [(*r[:5], bool(r[5])) for r in seen],
    )
    report.add("networks and clients seen", len(seen))


def _copy_messages(
    source: sqlite3.Connection,
    target: psycopg.Connection[Any],
    directory: Path,
    report: CopyReport,
) -> None:
    rows = source.execute(
        "SELECT id, account, credential, client_ip, mail_from, rcpt_to, recipients, subject,"
        " size, status, created_at, smtputf8, body_8bit, body_removed_at FROM messages"
        " ORDER BY created_at"
    ).fetchall()
    missing = 0
    with target.cursor() as cursor:
        for start in range(0, len(rows), 500):  # bodies a batch at a time, not all at once
            chunk = rows[start : start + 500]
            cursor.executemany(
                "INSERT INTO messages (id, account, credential, client_ip, mail_from, rcpt_to,"
                " recipients, subject, size, status, created_at, smtputf8, body_8bit,"
                " body_removed_at, node)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'copied')",
                [(*r[:11], bool(r[11]), bool(r[12]), r[13]) for r in chunk],
            )
            for row in chunk:
                try:
                    body = bodies.read(source, directory, row[0])
                except bodies.BodyMissing:
                    missing += 1
                    continue
                if body is not None:
                    cursor.execute(
                        "INSERT INTO message_bodies (id, body) VALUES (%s, %b)", (row[0], body)
                    )
    report.add("messages", len(rows))
    if missing:
        report.add("messages without their body file", missing)
    attempts = source.execute(
        "SELECT message_id, domain, recipient, ts, host, reply, tls, outcome"
        " FROM delivery_attempts ORDER BY id"
    ).fetchall()
    target.cursor().executemany(
        "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host, reply, tls,"
        " outcome) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        attempts,
    )
    report.add("delivery attempts", len(attempts))


def _copy_dkim_keys(target: psycopg.Connection[Any], data_dir: Path) -> int:
    directory = key_directory(data_dir)
    if not directory.is_dir():
        return 0
    count = 0
    now = time.time()
    for path in sorted(directory.glob("*/*.pem")):
        selector, _, key_type = path.stem.rpartition(".")
        if not selector or key_type not in ("rsa", "ed25519"):
            continue
        target.execute(
            "INSERT INTO dkim_keys (domain, selector, key_type, pem, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (path.parent.name, selector, key_type, path.read_text(encoding="ascii"), now),
        )
        count += 1
    return count


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return row.fetchone() is not None
