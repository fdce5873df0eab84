"""Sending-limit reads (storage.api.SendingCounters) on PostgreSQL.

The rules are quotas.py's (decide_message, decide_recipient); counts are
written by the acceptance transaction (postgres/acceptance.py), so every node
reads the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg_pool import AsyncConnectionPool

from relaygate.quotas import (
    BASELINE_KEEP_SECONDS,
    KEEP_SECONDS,
    Counts,
    Scope,
    decide_message,
    decide_recipient,
    message_scopes,
    recipient_scopes,
    window_keys,
)


class PostgresSendingCounters:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def _counts(self, scopes: Sequence[Scope], windows: Sequence[str]) -> Counts:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                'SELECT scope, "window", messages, recipients, new_recipients FROM send_counters'
                ' WHERE scope = ANY(%s) AND "window" = ANY(%s)',
                ([s.key for s in scopes], list(windows)),
            )
            rows = await cursor.fetchall()
        return {(r[0], r[1]): (int(r[2]), int(r[3]), int(r[4])) for r in rows}

    async def check_message(self, scopes: Sequence[Scope], now: float) -> bytes | None:
        limited = message_scopes(scopes)
        if not limited:
            return None
        return decide_message(limited, await self._counts(limited, window_keys(now)), now)

    async def check_recipient(
        self,
        scopes: Sequence[Scope],
        account_address: str,
        recipient: str,
        *,
        accepted_so_far: int,
        new_so_far: int,
        now: float,
    ) -> tuple[bytes | None, bool]:
        day = window_keys(now)[1]
        async with self._pool.connection() as connection:
            # Whether the recipient is known decides which limits apply.
            cursor = await connection.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM known_recipients"
                " WHERE account = %s AND recipient = %s)",
                (account_address.lower(), recipient.lower()),
            )
            row = await cursor.fetchone()
        is_new = bool(row[0]) if row is not None else True
        limited = recipient_scopes(scopes, is_new)
        if not limited:
            return None, is_new
        counts = await self._counts(limited, (day,))
        refusal = decide_recipient(
            limited, counts, is_new, accepted_so_far=accepted_so_far, new_so_far=new_so_far, now=now
        )
        return refusal, is_new

    async def prune(self, now: float) -> None:
        hour_cut, day_cut = window_keys(now - KEEP_SECONDS)
        baseline_cut = window_keys(now - BASELINE_KEEP_SECONDS)[0]
        async with self._pool.connection() as connection:
            await connection.execute(
                'DELETE FROM send_counters WHERE "window" < %s'
                ' OR ("window" >= %s AND "window" < %s'
                " AND (scope NOT LIKE 'account:%%' OR \"window\" < %s))",
                (day_cut, "h", hour_cut, baseline_cut),
            )
