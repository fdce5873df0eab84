"""Compromised-account defence (storage.api.Defence) in the SQLite database of one machine.

The SQL runs in a DatabaseThread, never on the event loop. Holds, releases
and purges are one write transaction each (``BEGIN IMMEDIATE``), so a
release moves each held delivery row back to the queue exactly once even
when two admins press the button together.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from relaygate.defence import BASELINE_DAYS, HOUR, Activity, Trigger
from relaygate.quotas import window_keys
from relaygate.storage.api import HeldAccount, Sighting
from relaygate.storage.sqlite import write_transaction
from relaygate.storage.thread import DatabaseThread

DAY = 86400.0


def baseline_window(now: float) -> tuple[str, str]:
    """The hour keys (first, end) of the baseline: the last 14 days, this hour left out."""
    return window_keys(now - BASELINE_DAYS * DAY)[0], window_keys(now)[0]


def activity(db: sqlite3.Connection, account: str, now: float) -> Activity:
    scope = f"account:{account}"
    first, hour = baseline_window(now)
    row = db.execute(
        "SELECT messages, recipients, new_recipients FROM send_counters"
        " WHERE scope = ? AND window = ?",
        (scope, hour),
    ).fetchone()
    (peak,) = db.execute(
        "SELECT coalesce(max(messages), 0) FROM send_counters"
        " WHERE scope = ? AND window >= ? AND window < ?",
        (scope, first, hour),
    ).fetchone()
    novel, network = db.execute(
        "SELECT max(first_seen), value FROM defence_seen WHERE account = ? AND kind = 'network'"
        " AND novel = 1 AND first_seen > ?",
        (account, now - HOUR),
    ).fetchone()  # SQLite: value comes from the row holding the max
    state = db.execute(
        "SELECT held_at, expected_until, expected_messages FROM defence_accounts WHERE account = ?",
        (account,),
    ).fetchone()
    messages, recipients, new = row if row is not None else (0, 0, 0)
    return Activity(
        messages=int(messages),
        recipients=int(recipients),
        new_recipients=int(new),
        baseline=int(peak),
        new_network_at=None if novel is None else float(novel),
        new_network=None if novel is None else str(network),
        expected_until=None if state is None or state[1] is None else float(state[1]),
        expected_messages=0 if state is None else int(state[2]),
        held=state is not None and state[0] is not None,
    )


def seen(db: sqlite3.Connection, account: str, network: str, client: str, now: float) -> None:
    with write_transaction(db):
        db.execute(
            "INSERT INTO defence_seen (account, kind, value, first_seen, last_seen, novel)"
            " VALUES (?1, 'network', ?2, ?3, ?3, EXISTS (SELECT 1 FROM defence_seen"
            " WHERE account = ?1 AND kind = 'network'))"
            " ON CONFLICT (account, kind, value) DO UPDATE SET last_seen = excluded.last_seen",
            (account, network, now),
        )
        db.execute(
            "INSERT INTO defence_seen (account, kind, value, first_seen, last_seen)"
            " VALUES (?1, 'client', ?2, ?3, ?3)"
            " ON CONFLICT (account, kind, value) DO UPDATE SET last_seen = excluded.last_seen",
            (account, client, now),
        )


SIGHTINGS_SQL = (
    "SELECT kind, value, first_seen, last_seen, novel FROM defence_seen WHERE account = {a}"
    " ORDER BY last_seen DESC, value LIMIT {n}"
)


def sighting(row: Any) -> Sighting:
    kind, value, first, last, novel = row
    return Sighting(str(kind), str(value), float(first), float(last), bool(novel))


def hold(db: sqlite3.Connection, account: str, trigger: Trigger, now: float) -> int | None:
    with write_transaction(db):
        cursor = db.execute(
            "INSERT INTO defence_accounts (account, held_at, reason, detail, counts)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (account) DO UPDATE SET"
            " held_at = excluded.held_at, reason = excluded.reason, detail = excluded.detail,"
            " counts = excluded.counts WHERE defence_accounts.held_at IS NULL",
            (account, now, trigger.reason, trigger.detail, json.dumps(trigger.counts)),
        )
        if not cursor.rowcount:
            return None
        db.execute(
            "UPDATE deliveries SET status = 'held', updated_at = ? WHERE status = 'queued'"
            " AND message_id IN (SELECT id FROM messages WHERE lower(account) = ?"
            " AND mail_from <> '')",  # bounces to the account's own sender are not held
            (now, account),
        )
        return int(
            db.execute(
                "UPDATE messages SET status = 'held' WHERE lower(account) = ? AND id IN"
                " (SELECT message_id FROM deliveries WHERE status = 'held')",
                (account,),
            ).rowcount
        )


def held(db: sqlite3.Connection) -> list[HeldAccount]:
    counts = dict(
        db.execute(
            "SELECT lower(account), count(*) FROM messages WHERE status = 'held'"
            " GROUP BY lower(account)"
        ).fetchall()
    )
    # A held account's mail still 'queued' (committed just after the hold) waits too.
    for account, number in db.execute(
        "SELECT h.account, count(*) FROM defence_accounts h JOIN messages m"
        " ON lower(m.account) = h.account WHERE h.held_at IS NOT NULL"
        " AND m.status = 'queued' AND m.mail_from <> '' GROUP BY h.account"
    ):
        counts[account] = counts.get(account, 0) + number
    found: list[HeldAccount] = []
    for account, since, reason, detail, numbers in db.execute(
        "SELECT account, held_at, reason, detail, counts FROM defence_accounts"
        " WHERE held_at IS NOT NULL ORDER BY held_at"
    ):
        found.append(
            HeldAccount(
                str(account),
                float(since),
                reason,
                detail,
                _counts(numbers),
                int(counts.pop(account, 0)),
            )
        )
    # Mail held by a worker whose view was a moment old when the hold was released.
    for account, number in sorted(counts.items()):
        found.append(HeldAccount(str(account), None, None, None, {}, int(number)))
    return found


def _counts(text: str | None) -> dict[str, int]:
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _is_held(db: sqlite3.Connection, account: str) -> bool:
    row = db.execute(
        "SELECT 1 FROM defence_accounts WHERE account = ? AND held_at IS NOT NULL", (account,)
    ).fetchone()
    return row is not None


def release(
    db: sqlite3.Connection, account: str, now: float, expected_until: float
) -> list[str] | None:
    with write_transaction(db):
        flagged = _is_held(db, account)
        # Held, and (the account flagged) still queued: the queue claimed neither.
        ids = [
            str(r[0])
            for r in db.execute(
                "SELECT id FROM messages WHERE lower(account) = ? AND (status = 'held'"
                " OR (? AND status = 'queued' AND mail_from <> '')) ORDER BY created_at",
                (account, flagged),
            )
        ]
        if not flagged and not ids:
            return None
        db.execute(
            "UPDATE deliveries SET status = 'queued', next_attempt = ?, updated_at = ?"
            " WHERE status = 'held'"
            " AND message_id IN (SELECT id FROM messages WHERE lower(account) = ?)",
            (now, now, account),
        )
        db.execute(
            "UPDATE messages SET status = 'queued' WHERE lower(account) = ? AND status = 'held'",
            (account,),
        )
        (messages,) = db.execute(
            "SELECT coalesce(max(messages), 0) FROM send_counters WHERE scope = ? AND window = ?",
            (f"account:{account}", window_keys(now)[0]),
        ).fetchone()
        db.execute(
            "INSERT INTO defence_accounts (account, expected_until, expected_messages)"
            " VALUES (?, ?, ?) ON CONFLICT (account) DO UPDATE SET held_at = NULL,"
            " reason = NULL, detail = NULL, counts = NULL,"
            " expected_until = excluded.expected_until,"
            " expected_messages = max(defence_accounts.expected_messages,"
            " excluded.expected_messages)",
            (account, expected_until, int(messages)),
        )
        return ids


def purge(db: sqlite3.Connection, account: str, now: float) -> list[str] | None:
    with write_transaction(db):
        flagged = _is_held(db, account)
        # A flagged account's rows still 'queued' (accepted by a worker that had
        # not seen the hold yet) are held too: the queue never claimed them.
        also = "queued" if flagged else "held"
        ids = [
            str(r[0])
            for r in db.execute(
                "SELECT DISTINCT message_id FROM deliveries WHERE status IN ('held', ?)"
                " AND message_id IN (SELECT id FROM messages WHERE lower(account) = ?)",
                (also, account),
            )
        ]
        if not flagged and not ids:
            return None
        db.execute(
            "UPDATE deliveries SET status = 'purged', recipients = '[]', updated_at = ?"
            " WHERE status IN ('held', ?)"
            " AND message_id IN (SELECT id FROM messages WHERE lower(account) = ?)",
            (now, also, account),
        )
        db.executemany("UPDATE messages SET status = 'purged' WHERE id = ?", [(i,) for i in ids])
        db.execute(
            "UPDATE defence_accounts SET held_at = NULL, reason = NULL, detail = NULL,"
            " counts = NULL WHERE account = ?",
            (account,),
        )
        return sorted(ids)


def expect(db: sqlite3.Connection, account: str, until: float, messages: int) -> None:
    with write_transaction(db):
        db.execute(
            "INSERT INTO defence_accounts (account, expected_until, expected_messages)"
            " VALUES (?, ?, ?) ON CONFLICT (account) DO UPDATE SET"
            " expected_until = excluded.expected_until,"
            " expected_messages = excluded.expected_messages",
            (account, until, messages),
        )


class SQLiteDefence:
    def __init__(
        self, thread: DatabaseThread[Any], connection: Callable[[Any], sqlite3.Connection]
    ) -> None:
        self._thread = thread
        self._connection = connection

    async def activity(self, account: str, now: float) -> Activity:
        return await self._thread.run(lambda c: activity(self._connection(c), account, now))

    async def seen(self, account: str, network: str, client: str, now: float) -> None:
        await self._thread.run(lambda c: seen(self._connection(c), account, network, client, now))

    async def sightings(self, account: str, limit: int) -> list[Sighting]:
        sql = SIGHTINGS_SQL.format(a="?", n="?")
        rows = await self._thread.run(
            lambda c: self._connection(c).execute(sql, (account, limit)).fetchall()
        )
        return [sighting(r) for r in rows]

    async def hold(self, account: str, trigger: Trigger, now: float) -> int | None:
        return await self._thread.run(lambda c: hold(self._connection(c), account, trigger, now))

    async def held(self) -> list[HeldAccount]:
        return await self._thread.run(lambda c: held(self._connection(c)))

    async def release(self, account: str, now: float, expected_until: float) -> list[str] | None:
        return await self._thread.run(
            lambda c: release(self._connection(c), account, now, expected_until)
        )

    async def purge(self, account: str, now: float) -> list[str] | None:
        return await self._thread.run(lambda c: purge(self._connection(c), account, now))

    async def expect(self, account: str, until: float, messages: int) -> None:
        await self._thread.run(lambda c: expect(self._connection(c), account, until, messages))
