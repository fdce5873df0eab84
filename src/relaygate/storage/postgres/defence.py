"""Compromised-account defence (storage.api.Defence) on PostgreSQL, shared by every node.

A hold, release or purge is one transaction; the flag row is locked first
(``FOR UPDATE``), so two nodes holding the same account, or two admins
releasing it, take turns and each held delivery row goes back to the queue
exactly once.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from relaygate.defence import HOUR, Activity, Trigger
from relaygate.quotas import window_keys
from relaygate.storage.api import HeldAccount, Sighting
from relaygate.storage.sqlite_defence import SIGHTINGS_SQL, baseline_window, sighting

_ACTIVITY = """
SELECT
    (SELECT array[messages, recipients, new_recipients] FROM send_counters
        WHERE scope = %(scope)s AND "window" = %(hour)s),
    (SELECT coalesce(max(messages), 0) FROM send_counters
        WHERE scope = %(scope)s AND "window" >= %(first)s AND "window" < %(hour)s),
    (SELECT max(first_seen) FROM defence_seen WHERE account = %(account)s
        AND kind = 'network' AND novel AND first_seen > %(recent)s),
    (SELECT value FROM defence_seen WHERE account = %(account)s
        AND kind = 'network' AND novel AND first_seen > %(recent)s
        ORDER BY first_seen DESC LIMIT 1),
    (SELECT array[held_at, expected_until, expected_messages] FROM defence_accounts
        WHERE account = %(account)s)
"""


class PostgresDefence:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def activity(self, account: str, now: float) -> Activity:
        first, hour = baseline_window(now)
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                _ACTIVITY,
                {
                    "scope": f"account:{account}",
                    "account": account,
                    "hour": hour,
                    "first": first,
                    "recent": now - HOUR,
                },
            )
            row: Any = await cursor.fetchone()
        counts, peak, novel, network, state = row
        messages, recipients, new = counts if counts is not None else (0, 0, 0)
        return Activity(
            messages=int(messages),
            recipients=int(recipients),
            new_recipients=int(new),
            baseline=int(peak),
            new_network_at=None if novel is None else float(novel),
            new_network=None if network is None else str(network),
            expected_until=None if state is None or state[1] is None else float(state[1]),
            expected_messages=0 if state is None else int(state[2]),
            held=state is not None and state[0] is not None,
        )

    async def seen(self, account: str, network: str, client: str, now: float) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO defence_seen (account, kind, value, first_seen, last_seen, novel)"
                " VALUES (%(a)s, 'network', %(n)s, %(now)s, %(now)s, EXISTS (SELECT 1 FROM"
                " defence_seen WHERE account = %(a)s AND kind = 'network'))"
                " ON CONFLICT (account, kind, value) DO UPDATE SET last_seen = excluded.last_seen",
                {"a": account, "n": network, "now": now},
            )
            await connection.execute(
                "INSERT INTO defence_seen (account, kind, value, first_seen, last_seen)"
                " VALUES (%(a)s, 'client', %(c)s, %(now)s, %(now)s)"
                " ON CONFLICT (account, kind, value) DO UPDATE SET last_seen = excluded.last_seen",
                {"a": account, "c": client, "now": now},
            )

    async def sightings(self, account: str, limit: int) -> list[Sighting]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                SIGHTINGS_SQL.format(a="%s", n="%s"), (account, limit)
            )
            return [sighting(r) for r in await cursor.fetchall()]

    async def hold(self, account: str, trigger: Trigger, now: float) -> int | None:
        params = {"account": account, "now": now}
        async with self._pool.connection() as connection, connection.transaction():
            cursor = await connection.execute(
                "INSERT INTO defence_accounts (account, held_at, reason, detail, counts)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (account) DO UPDATE SET"
                " held_at = excluded.held_at, reason = excluded.reason,"
                " detail = excluded.detail, counts = excluded.counts"
                " WHERE defence_accounts.held_at IS NULL",
                (account, now, trigger.reason, trigger.detail, Jsonb(trigger.counts)),
            )
            if not cursor.rowcount:
                return None
            await connection.execute(
                "UPDATE deliveries SET status = 'held', updated_at = %(now)s"
                " WHERE status = 'queued' AND message_id IN (SELECT id FROM messages"
                " WHERE lower(account) = %(account)s AND mail_from <> '')",
                params,
            )
            cursor = await connection.execute(
                "UPDATE messages SET status = 'held' WHERE lower(account) = %(account)s"
                " AND id IN (SELECT message_id FROM deliveries WHERE status = 'held')",
                params,
            )
            return int(cursor.rowcount)

    async def held(self) -> list[HeldAccount]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT lower(account), count(*) FROM messages WHERE status = 'held'"
                " GROUP BY lower(account)"
            )
            counts: dict[str, int] = {str(a): int(n) for a, n in await cursor.fetchall()}
            # A held account's mail still 'queued' (committed just after the hold) waits too.
            cursor = await connection.execute(
                "SELECT h.account, count(*) FROM defence_accounts h JOIN messages m"
                " ON lower(m.account) = h.account WHERE h.held_at IS NOT NULL"
                " AND m.status = 'queued' AND m.mail_from <> '' GROUP BY h.account"
            )
            for a, n in await cursor.fetchall():
                counts[str(a)] = counts.get(str(a), 0) + int(n)
            cursor = await connection.execute(
                "SELECT account, held_at, reason, detail, counts FROM defence_accounts"
                " WHERE held_at IS NOT NULL ORDER BY held_at"
            )
            rows = await cursor.fetchall()
        found = [
            HeldAccount(
                str(a),
                float(since),
                reason,
                detail,
                {str(k): int(v) for k, v in (numbers or {}).items()},
                counts.pop(str(a), 0),
            )
            for a, since, reason, detail, numbers in rows
        ]
        for account, number in sorted(counts.items()):
            found.append(HeldAccount(account, None, None, None, {}, number))
        return found

    async def _flag(self, connection: Any, account: str) -> bool:
        cursor = await connection.execute(
            "SELECT held_at IS NOT NULL FROM defence_accounts WHERE account = %s FOR UPDATE",
            (account,),
        )
        row = await cursor.fetchone()
        return row is not None and bool(row[0])

    async def release(self, account: str, now: float, expected_until: float) -> list[str] | None:
        params: dict[str, object] = {
            "account": account,
            "now": now,
            "until": expected_until,
            "scope": f"account:{account}",
            "hour": window_keys(now)[0],
        }
        async with self._pool.connection() as connection, connection.transaction():
            flagged = await self._flag(connection, account)
            params["flagged"] = flagged
            # Held, and (the account flagged) still queued: the queue claimed neither.
            cursor = await connection.execute(
                "SELECT id FROM messages WHERE lower(account) = %(account)s AND (status = 'held'"
                " OR (%(flagged)s AND status = 'queued' AND mail_from <> ''))"
                " ORDER BY created_at, id",
                params,
            )
            ids = [str(r[0]) for r in await cursor.fetchall()]
            await connection.execute(
                "UPDATE messages SET status = 'queued' WHERE lower(account) = %(account)s"
                " AND status = 'held'",
                params,
            )
            if not flagged and not ids:
                return None
            await connection.execute(
                "UPDATE deliveries SET status = 'queued', next_attempt = %(now)s,"
                " updated_at = %(now)s WHERE status = 'held' AND message_id IN"
                " (SELECT id FROM messages WHERE lower(account) = %(account)s)",
                params,
            )
            await connection.execute(
                "INSERT INTO defence_accounts (account, expected_until, expected_messages)"
                " VALUES (%(account)s, %(until)s, coalesce((SELECT messages FROM send_counters"
                ' WHERE scope = %(scope)s AND "window" = %(hour)s), 0))'
                " ON CONFLICT (account) DO UPDATE SET held_at = NULL, reason = NULL,"
                " detail = NULL, counts = NULL, expected_until = excluded.expected_until,"
                " expected_messages = greatest(defence_accounts.expected_messages,"
                " excluded.expected_messages)",
                params,
            )
        return ids

    async def purge(self, account: str, now: float) -> list[str] | None:
        params: dict[str, object] = {"account": account, "now": now}
        async with self._pool.connection() as connection, connection.transaction():
            flagged = await self._flag(connection, account)
            params["also"] = "queued" if flagged else "held"
            cursor = await connection.execute(
                "UPDATE deliveries SET status = 'purged', recipients = '[]',"
                " updated_at = %(now)s WHERE status IN ('held', %(also)s) AND message_id IN"
                " (SELECT id FROM messages WHERE lower(account) = %(account)s)"
                " RETURNING message_id",
                params,
            )
            ids = sorted({str(r[0]) for r in await cursor.fetchall()})
            if not flagged and not ids:
                return None
            await connection.execute(
                "UPDATE messages SET status = 'purged' WHERE id = ANY(%s)", (ids,)
            )
            await connection.execute(
                "UPDATE defence_accounts SET held_at = NULL, reason = NULL, detail = NULL,"
                " counts = NULL WHERE account = %s",
                (account,),
            )
        return ids

    async def expect(self, account: str, until: float, messages: int) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO defence_accounts (account, expected_until, expected_messages)"
                " VALUES (%s, %s, %s) ON CONFLICT (account) DO UPDATE SET"
                " expected_until = excluded.expected_until,"
                " expected_messages = excluded.expected_messages",
                (account, until, messages),
            )
