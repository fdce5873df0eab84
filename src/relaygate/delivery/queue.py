"""The delivery queue: one row per (message, recipient domain), in SQLite.

Synchronous functions used by the spool (to enqueue inside its commit), by the
delivery process and by the ``relaygate queue`` CLI. A row's life:

    queued --claim--> sending --finish--> delivered | failed | queued (retry later)

Crash window: a row is marked ``sending`` before we talk to the remote host
and its outcome is committed right after the remote's final reply, before
QUIT. If relaygate dies between the remote's 250 and that commit (normally
well under a millisecond), the row is still ``sending`` at restart and the
message is sent again: SMTP has no way to ask a server whether it already
took a message (RFC 1047), so this window can be made small, not closed.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from relaygate import message
from relaygate.accepted import new_queue_id
from relaygate.config import DeliveryConfig


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    message_id: str
    domain: str
    recipients: tuple[str, ...]
    attempts: int
    created_at: float
    mail_from: str
    account: str
    warned: bool
    mail_options: tuple[str, ...] = ()  # SMTPUTF8, BODY=8BITMIME as the client gave them


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt did for each recipient of a delivery."""

    @classmethod
    def for_all(
        cls,
        delivery: Delivery,
        reply: str,
        *,
        host: str | None = None,
        tls: str | None = None,
    ) -> Outcome:
        """Every recipient shares ``reply``: failed if it is a 5xx, else deferred."""
        pairs = tuple((r, reply) for r in delivery.recipients)
        if reply.startswith("5"):
            return cls(failed=pairs, host=host, tls=tls)
        return cls(deferred=pairs, host=host, tls=tls)

    delivered: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (recipient, reply) refused for good
    deferred: tuple[tuple[str, str], ...] = ()  # (recipient, reply) to try again
    host: str | None = None
    tls: str | None = None
    reply: str = "250 delivered"  # the remote's answer to the message, for the history


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def enqueue(
    db: sqlite3.Connection,
    message_id: str,
    recipients: Sequence[str],
    now: float,
    status: str = "queued",
) -> None:
    """Add delivery rows for a new message; the caller holds the transaction.
    ``status`` "held": the account's mail is held (relaygate/defence.py)."""
    by_domain: dict[str, list[str]] = {}
    for recipient in recipients:
        by_domain.setdefault(domain_of(recipient), []).append(recipient)
    db.executemany(
        "INSERT INTO deliveries (message_id, domain, recipients, status, next_attempt,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(message_id, d, json.dumps(r), status, now, now, now) for d, r in by_domain.items()],
    )


def enqueue_many(
    db: sqlite3.Connection, items: Iterable[tuple[str, Sequence[str], str]], now: float
) -> None:
    """(message id, recipients, "queued" or "held") each."""
    for message_id, recipients, status in items:
        enqueue(db, message_id, recipients, now, status)


def reset_interrupted(db: sqlite3.Connection) -> list[str]:
    """At start: rows left ``sending`` by a crash go back to the queue; their messages."""
    rows = db.execute(
        "UPDATE deliveries SET status = 'queued' WHERE status = 'sending' RETURNING message_id"
    ).fetchall()
    return [str(row[0]) for row in rows]


_SELECT = (
    "SELECT d.id, d.message_id, d.domain, d.recipients, d.attempts, d.created_at,"
    " m.mail_from, m.account, d.warned, m.smtputf8, m.body_8bit"
    " FROM deliveries AS d JOIN messages AS m"
    " ON m.id = d.message_id"
)


def _delivery(row: Sequence[object]) -> Delivery:
    (
        id_,
        message_id,
        domain,
        recipients,
        attempts,
        created_at,
        mail_from,
        account,
        warned,
        smtputf8,
        body_8bit,
    ) = row
    return Delivery(
        id=int(str(id_)),
        message_id=str(message_id),
        domain=str(domain),
        recipients=tuple(json.loads(str(recipients))),
        attempts=int(str(attempts)),
        created_at=float(str(created_at)),
        mail_from=str(mail_from),
        account=str(account),
        warned=bool(warned),
        mail_options=(("SMTPUTF8",) if smtputf8 else ())
        + (("BODY=8BITMIME",) if body_8bit else ()),
    )


# A held account's rows are never claimed, whatever their status says: a worker
# may have stored a message as queued a moment after another held the account.
# Bounces (empty sender) go to the account's own sender and are never held.
NOT_HELD_SQLITE = (
    " AND (m.mail_from = '' OR lower(m.account) NOT IN"
    " (SELECT account FROM defence_accounts WHERE held_at IS NOT NULL))"
)


def claim_due(db: sqlite3.Connection, now: float, limit: int) -> list[Delivery]:
    """Take up to ``limit`` rows whose time has come and mark them ``sending``."""
    db.execute("BEGIN IMMEDIATE")
    try:
        rows = db.execute(
            _SELECT
            + " WHERE d.status = 'queued' AND d.next_attempt <= ?"
            + NOT_HELD_SQLITE
            + " ORDER BY d.next_attempt LIMIT ?",
            (now, limit),
        ).fetchall()
        db.executemany(
            "UPDATE deliveries SET status = 'sending', updated_at = ? WHERE id = ?",
            [(now, row[0]) for row in rows],
        )
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return [_delivery(row) for row in rows]


def next_due(db: sqlite3.Connection) -> float | None:
    row = db.execute("SELECT min(next_attempt) FROM deliveries WHERE status = 'queued'").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def retry_delay(config: DeliveryConfig, attempts: int) -> float:
    """Wait after ``attempts`` failed attempts: the schedule, +-20% jitter."""
    schedule = config.retry_schedule
    base = schedule[min(attempts, len(schedule)) - 1] if attempts > 0 else schedule[0]
    return base * random.uniform(0.8, 1.2)


def settle(
    delivery: Delivery, outcome: Outcome, now: float, config: DeliveryConfig
) -> tuple[Outcome, bool]:
    """The outcome to record, and whether the message expired with this attempt.

    Deferred recipients whose message is older than ``max_age`` fail instead
    (the caller bounces them). Pure: the caller builds the bounce from the
    result before anything is recorded.
    """
    if not outcome.deferred or now - delivery.created_at < config.max_age:
        return outcome, False
    expired = tuple(
        # RFC 3463 X.4.7: delivery time expired; the last remote reply follows.
        (r, f"554 5.4.7 gave up after {delivery.attempts + 1} attempts; last reply: {reply}")
        for r, reply in outcome.deferred
    )
    return replace(outcome, failed=outcome.failed + expired, deferred=()), True


def finish(
    db: sqlite3.Connection,
    delivery: Delivery,
    outcome: Outcome,
    now: float,
    retry_at: float,
    *,
    also: Callable[[sqlite3.Connection], object] | None = None,
) -> None:
    """Record a settled attempt (see ``settle``) in one transaction; deferred
    recipients are due again at ``retry_at``.

    ``also`` runs inside that transaction (the bounce it caused is stored with
    it: a failure is never recorded without its DSN). Runs right after the
    remote's last reply, to keep the crash window short.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        record(db, delivery, outcome, now, retry_at, also=also)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def record(
    db: sqlite3.Connection,
    delivery: Delivery,
    outcome: Outcome,
    now: float,
    retry_at: float,
    *,
    also: Callable[[sqlite3.Connection], object] | None = None,
) -> None:
    """``finish`` inside a transaction the caller holds (several finishes share
    one commit: storage/sqlite_queue.py)."""
    failed = list(outcome.failed)
    deferred = list(outcome.deferred)
    results = [(r, outcome.reply, "delivered") for r in outcome.delivered]
    results += [(r, reply, "failed") for r, reply in failed]
    results += [(r, reply, "deferred") for r, reply in deferred]
    rows = [
        (delivery.message_id, delivery.domain, r, now, outcome.host, reply, outcome.tls, kind)
        for r, reply, kind in results
    ]
    db.executemany(
        "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host, reply, tls,"
        " outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    attempts = delivery.attempts + 1
    last_reply = (deferred or failed or [("", outcome.reply)])[0][1]
    if deferred:
        db.execute(
            "UPDATE deliveries SET status = 'queued', recipients = ?, attempts = ?,"
            " next_attempt = ?, updated_at = ?, last_reply = ? WHERE id = ?",
            (
                json.dumps([r for r, _ in deferred]),
                attempts,
                retry_at,
                now,
                last_reply,
                delivery.id,
            ),
        )
    else:
        db.execute(
            "UPDATE deliveries SET status = ?, recipients = '[]', attempts = ?,"
            " updated_at = ?, last_reply = ? WHERE id = ?",
            ("failed" if failed else "delivered", attempts, now, last_reply, delivery.id),
        )
    _update_message_status(db, delivery.message_id)
    if also is not None:
        also(db)


def release(db: sqlite3.Connection, delivery_id: int, next_attempt: float, now: float) -> None:
    """Put a claimed row back to ``queued`` unchanged, due at ``next_attempt``.

    For an attempt whose outcome could not be recorded: better to try again
    later than to leave the row ``sending`` until the next start.
    """
    db.execute(
        "UPDATE deliveries SET status = 'queued', next_attempt = ?, updated_at = ?"
        " WHERE id = ? AND status = 'sending'",
        (next_attempt, now, delivery_id),
    )


def _update_message_status(db: sqlite3.Connection, message_id: str) -> None:
    statuses = {
        row[0]
        for row in db.execute(
            "SELECT outcome FROM delivery_attempts WHERE message_id = ? AND recipient IS NOT NULL"
            " AND outcome != 'deferred'",
            (message_id,),
        )
    }
    pending = db.execute(
        "SELECT count(*) FROM deliveries WHERE message_id = ? AND status IN ('queued', 'sending')",
        (message_id,),
    ).fetchone()[0]
    if pending:
        status = "queued" if not statuses else "partly delivered"
    elif statuses == {"delivered"}:
        status = "delivered"
    elif statuses == {"failed"}:
        status = "failed"
    else:
        status = "partly failed"
    db.execute("UPDATE messages SET status = ? WHERE id = ?", (status, message_id))


def mark_warned(db: sqlite3.Connection, delivery_id: int) -> None:
    db.execute("UPDATE deliveries SET warned = 1 WHERE id = ?", (delivery_id,))


def insert_notification(
    db: sqlite3.Connection,
    *,
    account: str,
    recipient: str,
    body: bytes,
    now: float,
    keep_local: bool = True,
) -> str:
    """Spool a DSN from the null sender to ``recipient``; the caller holds the transaction.

    With ``keep_local`` (``bounce_to = "capture"``), a DSN for one of our own
    accounts stays here, in the message log ("captured"), where that user's
    messages are; every other DSN is queued like any other message (from <>,
    so it is never bounced itself).
    """
    queue_id = new_queue_id(now)
    local = (
        keep_local
        and db.execute("SELECT 1 FROM accounts WHERE address = ?", (recipient,)).fetchone()
        is not None
    )
    summary = message.summarize(body)
    db.execute(
        "INSERT INTO messages (id, account, client_ip, mail_from, rcpt_to, subject, size,"
        " status, created_at, recipients) VALUES (?, ?, '', '', ?, ?, ?, ?, ?, 1)",
        (
            queue_id,
            account,
            json.dumps([recipient]),
            summary.subject,
            len(body),
            "captured" if local else "queued",
            now,
        ),
    )
    db.execute("INSERT INTO message_bodies (id, body) VALUES (?, ?)", (queue_id, body))
    if not local:
        enqueue(db, queue_id, [recipient], now)
    return queue_id


# ------------------------------------------------------------ CLI side


def queue_rows(db: sqlite3.Connection) -> list[dict[str, object]]:
    rows = db.execute(
        "SELECT d.message_id, d.domain, d.recipients, d.status, d.attempts, d.next_attempt,"
        " d.created_at, d.last_reply, m.mail_from FROM deliveries AS d JOIN messages AS m"
        " ON m.id = d.message_id WHERE d.status IN ('queued', 'sending', 'held')"
        " ORDER BY d.created_at, d.message_id"
    ).fetchall()
    return [
        {
            "id": r[0],
            "domain": r[1],
            "recipients": json.loads(r[2]),
            "status": r[3],
            "attempts": r[4],
            "next_attempt": r[5],
            "created_at": r[6],
            "last_reply": r[7],
            "mail_from": r[8],
        }
        for r in rows
    ]


def history(db: sqlite3.Connection, message_id: str) -> list[dict[str, object]]:
    rows = db.execute(
        "SELECT ts, domain, recipient, host, reply, tls, outcome FROM delivery_attempts"
        " WHERE message_id = ? ORDER BY ts, id",
        (message_id,),
    ).fetchall()
    keys = ("ts", "domain", "recipient", "host", "reply", "tls", "outcome")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def retry_now(db: sqlite3.Connection, message_id: str | None, now: float) -> int:
    """Make queued deliveries (of one message, or all) due now."""
    if message_id is None:
        cursor = db.execute(
            "UPDATE deliveries SET next_attempt = ? WHERE status = 'queued'", (now,)
        )
    else:
        cursor = db.execute(
            "UPDATE deliveries SET next_attempt = ? WHERE status = 'queued' AND message_id = ?",
            (now, message_id),
        )
    return cursor.rowcount


def delete(db: sqlite3.Connection, message_id: str, now: float) -> int:
    """Stop delivering a message: its pending rows become failed, without a bounce."""
    db.execute("BEGIN IMMEDIATE")
    try:
        cursor = db.execute(
            "UPDATE deliveries SET status = 'deleted', recipients = '[]', updated_at = ?"
            " WHERE message_id = ? AND status IN ('queued', 'sending', 'held')",
            (now, message_id),
        )
        if cursor.rowcount:
            db.execute("UPDATE messages SET status = 'deleted' WHERE id = ?", (message_id,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return cursor.rowcount
