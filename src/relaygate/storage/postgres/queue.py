"""The delivery queue on PostgreSQL, shared by every node (storage.api.DeliveryQueue).

Claims: ``FOR UPDATE SKIP LOCKED`` picks due rows no other node is picking,
and each claimed row gets a lease (``lease_node``, ``lease_until``). The
delivery process renews the leases of rows it still works on; a row whose
lease ran out belongs to nobody and ``recover`` (every few seconds, on every
node) puts it back in the queue, logged as a takeover. Finishing checks the
lease in the same statement that records the outcome: a node that lost its
lease (it stalled past ``lease_seconds``) cannot overwrite the row.

The one duplicate this allows is SMTP's own (delivery/queue.py): the remote
said 250, then the node died before recording it; the row comes back on
takeover and is sent again. Clocks of the nodes must agree (NTP): leases are
compared as wall-clock times.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from relaygate import message
from relaygate.accepted import new_queue_id
from relaygate.delivery.queue import Delivery, Outcome
from relaygate.storage.api import LeaseLost, Notice, QueueEntry, QueueSummary, Takeover
from relaygate.storage.batches import Batches
from relaygate.storage.postgres import bodies
from relaygate.storage.queue_summary import SUMMARY_SQL, summary_of


@dataclass(frozen=True)
class _Finish:
    """One settled attempt waiting to be recorded with others."""

    delivery: Delivery
    outcome: Outcome
    now: float
    status: str
    recipients: list[str]
    next_attempt: float
    last_reply: str

    def results(self) -> list[tuple[str, str, str]]:
        """(recipient, reply, outcome) for delivery_attempts."""
        o = self.outcome
        found = [(r, o.reply, "delivered") for r in o.delivered]
        found += [(r, reply, "failed") for r, reply in o.failed]
        return found + [(r, reply, "deferred") for r, reply in o.deferred]


def _delivery(row: Sequence[Any]) -> Delivery:
    (id_, message_id, domain, recipients, attempts, created_at) = row[:6]
    mail_from, account, warned, smtputf8, body_8bit = row[6:11]
    return Delivery(
        id=int(id_),
        message_id=str(message_id),
        domain=str(domain),
        recipients=tuple(str(r) for r in recipients),
        attempts=int(attempts),
        created_at=float(created_at),
        mail_from=str(mail_from),
        account=str(account),
        warned=bool(warned),
        mail_options=(("SMTPUTF8",) if smtputf8 else ())
        + (("BODY=8BITMIME",) if body_8bit else ()),
    )


class PostgresDeliveryQueue:
    def __init__(self, pool: AsyncConnectionPool, node: str, lease_seconds: float) -> None:
        self._pool = pool
        self._node = node
        self._lease = lease_seconds
        self._started = False
        # Outcomes that arrive while a batch is recorded go together in the next
        # (relaygate_finish in the schema: one round trip, one commit per batch).
        self._outcomes: Batches[_Finish] = Batches(self._record_batch)

    async def recover(self, now: float) -> list[Takeover]:
        # At start, rows this node name still holds are from its previous life.
        mine = not self._started
        self._started = True
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "UPDATE deliveries AS d SET status = 'queued', lease_node = NULL,"
                " lease_until = NULL, next_attempt = LEAST(d.next_attempt, %(now)s),"
                " updated_at = %(now)s FROM (SELECT id, lease_node FROM deliveries"
                " WHERE status = 'sending' AND (lease_until < %(now)s"
                " OR (%(mine)s AND lease_node = %(node)s)) FOR UPDATE SKIP LOCKED) AS gone"
                " WHERE d.id = gone.id RETURNING d.message_id, gone.lease_node",
                {"now": now, "mine": mine, "node": self._node},
            )
            rows = await cursor.fetchall()
        return [Takeover(str(m), None if n is None else str(n)) for m, n in rows]

    async def claim(self, now: float, limit: int) -> list[Delivery]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "UPDATE deliveries AS d SET status = 'sending', lease_node = %(node)s,"
                " lease_until = %(until)s, updated_at = %(now)s"
                " FROM (SELECT id FROM deliveries WHERE status = 'queued'"
                " AND next_attempt <= %(now)s"
                # A held account's rows are never claimed, whatever their status
                # says: a node may have stored one as queued just after a hold.
                # Bounces (empty sender) go to the account's own sender: never held.
                " AND NOT EXISTS (SELECT 1 FROM messages AS hm JOIN defence_accounts AS h"
                " ON h.account = lower(hm.account) AND h.held_at IS NOT NULL"
                " WHERE hm.id = deliveries.message_id AND hm.mail_from <> '')"
                " ORDER BY next_attempt LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED) AS due, messages AS m"
                " WHERE d.id = due.id AND m.id = d.message_id RETURNING d.id, d.message_id,"
                " d.domain, d.recipients, d.attempts, d.created_at, m.mail_from, m.account,"
                " d.warned, m.smtputf8, m.body_8bit",
                {"node": self._node, "until": now + self._lease, "now": now, "limit": limit},
            )
            rows = await cursor.fetchall()
        deliveries = [_delivery(row) for row in rows]
        deliveries.sort(key=lambda d: d.id)
        return deliveries

    async def renew(self, delivery_ids: Sequence[int], now: float) -> None:
        if not delivery_ids:
            return
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE deliveries SET lease_until = %s WHERE id = ANY(%s)"
                " AND status = 'sending' AND lease_node = %s",
                (now + self._lease, list(delivery_ids), self._node),
            )

    async def finish(
        self,
        delivery: Delivery,
        outcome: Outcome,
        now: float,
        retry_at: float,
        notice: Notice | None,
    ) -> str | None:
        failed = list(outcome.failed)
        deferred = list(outcome.deferred)
        results = [(r, outcome.reply, "delivered") for r in outcome.delivered]
        results += [(r, reply, "failed") for r, reply in failed]
        results += [(r, reply, "deferred") for r, reply in deferred]
        last_reply = (deferred or failed or [("", outcome.reply)])[0][1]
        if deferred:
            status, recipients, next_attempt = "queued", [r for r, _ in deferred], retry_at
        else:
            status, recipients, next_attempt = ("failed" if failed else "delivered"), [], now
        if notice is None:  # the usual case: recorded with others, one commit
            await self._outcomes.submit(
                _Finish(delivery, outcome, now, status, recipients, next_attempt, last_reply)
            )
            return None
        async with self._pool.connection() as connection, connection.transaction():
            # Finishes of one message take turns (as in relaygate_finish): its status
            # below then counts every outcome committed before.
            await connection.execute(
                "SELECT 1 FROM messages WHERE id = %s FOR UPDATE", (delivery.message_id,)
            )
            # The lease is checked where the row changes: a lost lease changes nothing.
            cursor = await connection.execute(
                "UPDATE deliveries SET status = %s, recipients = %s::jsonb, attempts = %s,"
                " next_attempt = %s, updated_at = %s, last_reply = %s, lease_node = NULL,"
                " lease_until = NULL, warned = warned OR %s"
                " WHERE id = %s AND status = 'sending' AND lease_node = %s RETURNING id",
                (
                    status,
                    json.dumps(recipients),
                    delivery.attempts + 1,
                    next_attempt,
                    now,
                    last_reply,
                    notice is not None and notice.warning,
                    delivery.id,
                    self._node,
                ),
            )
            if await cursor.fetchone() is None:
                raise LeaseLost(delivery.message_id)
            if results:
                await connection.execute(
                    "INSERT INTO delivery_attempts (message_id, domain, recipient, ts, host,"
                    " reply, tls, outcome) SELECT %s, %s, r, %s, %s, reply, %s, kind"
                    " FROM unnest(%s::text[], %s::text[], %s::text[]) AS x(r, reply, kind)",
                    (
                        delivery.message_id,
                        delivery.domain,
                        now,
                        outcome.host,
                        outcome.tls,
                        [r for r, _, _ in results],
                        [reply for _, reply, _ in results],
                        [kind for _, _, kind in results],
                    ),
                )
            await _update_message_status(connection, delivery.message_id)
            if notice is None:
                return None
            return await _insert_notice(connection, notice, now, self._node)

    async def _record_batch(self, batch: list[_Finish]) -> list[Exception | None]:
        try:
            moved = await self._call_finish(batch)
        except psycopg.DataError as exc:
            if len(batch) == 1:
                return [exc]
            # One outcome PostgreSQL cannot store must not fail the others: alone, each.
            return [error for finish in batch for error in await self._record_batch([finish])]
        except Exception as exc:  # each caller gets the error to handle
            return [exc] * len(batch)
        return [None if f.delivery.id in moved else LeaseLost(f.delivery.message_id) for f in batch]

    async def _call_finish(self, batch: list[_Finish]) -> set[int]:
        attempts = [
            (f.delivery.id, recipient, f.outcome.host, reply, f.outcome.tls, kind)
            for f in batch
            for recipient, reply, kind in f.results()
        ]
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT relaygate_finish(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    self._node,
                    [f.delivery.id for f in batch],
                    [f.status for f in batch],
                    [json.dumps(f.recipients) for f in batch],
                    [f.delivery.attempts + 1 for f in batch],
                    [f.next_attempt for f in batch],
                    [f.now for f in batch],
                    [f.last_reply for f in batch],
                    [a[0] for a in attempts],
                    [a[1] for a in attempts],
                    [a[2] for a in attempts],
                    [a[3] for a in attempts],
                    [a[4] for a in attempts],
                    [a[5] for a in attempts],
                ),
            )
            rows = await cursor.fetchall()
        return {int(row[0]) for row in rows}

    async def release(self, delivery_id: int, next_attempt: float, now: float) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE deliveries SET status = 'queued', next_attempt = %s, updated_at = %s,"
                " lease_node = NULL, lease_until = NULL"
                " WHERE id = %s AND status = 'sending' AND lease_node = %s",
                (next_attempt, now, delivery_id, self._node),
            )

    async def body(self, message_id: str, limit: int | None = None) -> bytes | None:
        async with self._pool.connection() as connection:
            return await bodies.read(connection, message_id, limit)

    async def arrival(self, message_id: str) -> float | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT created_at FROM messages WHERE id = %s", (message_id,)
            )
            row = await cursor.fetchone()
        return float(row[0]) if row is not None else None

    async def entries(self) -> list[QueueEntry]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT d.message_id, d.domain, d.recipients, d.status, d.attempts,"
                " d.next_attempt, d.created_at, d.last_reply, m.mail_from, d.lease_node"
                " FROM deliveries AS d JOIN messages AS m ON m.id = d.message_id"
                " WHERE d.status IN ('queued', 'sending', 'held')"
                " ORDER BY d.created_at, d.message_id"
            )
            rows = await cursor.fetchall()
        return [
            QueueEntry(
                id=str(r[0]),
                domain=str(r[1]),
                recipients=tuple(str(x) for x in r[2]),
                status=str(r[3]),
                attempts=int(r[4]),
                next_attempt=float(r[5]),
                created_at=float(r[6]),
                last_reply=None if r[7] is None else str(r[7]),
                mail_from=str(r[8]),
                node=None if r[9] is None else str(r[9]),
            )
            for r in rows
        ]

    async def summary(self) -> QueueSummary:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(SUMMARY_SQL)
            return summary_of(await cursor.fetchall())

    async def retry_now(self, message_id: str | None, now: float) -> int:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "UPDATE deliveries SET next_attempt = %s WHERE status = 'queued'"
                " AND (%s::text IS NULL OR message_id = %s)",
                (now, message_id, message_id),
            )
            return cursor.rowcount

    async def delete(self, message_id: str, now: float) -> int:
        async with self._pool.connection() as connection, connection.transaction():
            cursor = await connection.execute(
                "UPDATE deliveries SET status = 'deleted', recipients = '[]', updated_at = %s,"
                " lease_node = NULL, lease_until = NULL"
                " WHERE message_id = %s AND status IN ('queued', 'sending', 'held')",
                (now, message_id),
            )
            count = cursor.rowcount
            if count:
                await connection.execute(
                    "UPDATE messages SET status = 'deleted' WHERE id = %s", (message_id,)
                )
            return count


async def _update_message_status(connection: Any, message_id: str) -> None:
    """The message's status from its rows and attempts (delivery/queue.py's rules)."""
    await connection.execute(
        "UPDATE messages SET status = CASE"
        " WHEN p.pending > 0 THEN CASE WHEN s.final = 0 THEN 'queued' ELSE 'partly delivered' END"
        " WHEN s.final = s.delivered AND s.final > 0 THEN 'delivered'"
        " WHEN s.final = s.failed AND s.final > 0 THEN 'failed'"
        " ELSE 'partly failed' END"
        " FROM (SELECT count(*) FILTER (WHERE status IN ('queued', 'sending')) AS pending"
        " FROM deliveries WHERE message_id = %(id)s) AS p,"
        " (SELECT count(*) FILTER (WHERE outcome <> 'deferred') AS final,"
        " count(*) FILTER (WHERE outcome = 'delivered') AS delivered,"
        " count(*) FILTER (WHERE outcome = 'failed') AS failed"
        " FROM delivery_attempts WHERE message_id = %(id)s AND recipient IS NOT NULL) AS s"
        " WHERE messages.id = %(id)s",
        {"id": message_id},
    )


async def _insert_notice(connection: Any, notice: Notice, now: float, node: str) -> str:
    """Store a DSN from the null sender; with ``notice.keep_local`` captured here
    when it is for one of our accounts (where that user's mail is), else queued
    like any message."""
    queue_id = new_queue_id(now)
    local = False
    if notice.keep_local:
        cursor = await connection.execute(
            "SELECT 1 FROM accounts WHERE lower(address) = lower(%s)", (notice.recipient,)
        )
        local = await cursor.fetchone() is not None
    summary = message.summarize(notice.body)
    await connection.execute(
        "INSERT INTO messages (id, account, client_ip, mail_from, rcpt_to, subject, size,"
        " status, created_at, recipients, node) VALUES (%s, %s, '', '', %s, %s, %s, %s, %s, 1, %s)",
        (
            queue_id,
            notice.account,
            json.dumps([notice.recipient]),
            summary.subject,
            len(notice.body),
            "captured" if local else "queued",
            now,
            node,
        ),
    )
    await connection.execute(
        "INSERT INTO message_bodies (id, header, body) VALUES (%s, '', %b)",
        (queue_id, notice.body),
    )
    if not local:
        by_domain: dict[str, list[str]] = defaultdict(list)
        by_domain[notice.recipient.rpartition("@")[2].lower()].append(notice.recipient)
        for domain, recipients in by_domain.items():
            await connection.execute(
                "INSERT INTO deliveries (message_id, domain, recipients, status, next_attempt,"
                " created_at, updated_at) VALUES (%s, %s, %s, 'queued', %s, %s, %s)",
                (queue_id, domain, json.dumps(recipients), now, now, now),
            )
    return queue_id


class PostgresPolicyCache:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def get(self, domain: str, now: float) -> tuple[str, str] | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT id, policy FROM mta_sts_policies WHERE domain = %s AND expires_at > %s",
                (domain, now),
            )
            row = await cursor.fetchone()
        return (str(row[0]), str(row[1])) if row is not None else None

    async def put(
        self, domain: str, policy_id: str, text: str, now: float, expires_at: float
    ) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO mta_sts_policies (domain, id, policy, fetched_at, expires_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (domain) DO UPDATE SET"
                " id = excluded.id, policy = excluded.policy, fetched_at = excluded.fetched_at,"
                " expires_at = excluded.expires_at",
                (domain, policy_id, text, now, expires_at),
            )
