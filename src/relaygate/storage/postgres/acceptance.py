"""Accepting messages on PostgreSQL (storage.api.Acceptance), with group commit.

Sessions hand their messages to ``store``; one commit at a time runs on a
connection of the pool, and whatever arrives meanwhile waits for the next,
which takes it all: one transaction (and one WAL flush, synchronous_commit
on) covers many sessions' messages, so round trips and fsyncs do not cap
throughput. A transaction holds, for its messages: the rows, the bodies, the
delivery queue rows, and the sending counters they add. The future of each
message completes only after COMMIT returned: that is when 250 may be sent.

Bodies are sent as binary parameters straight from the session's buffer
(the header we add is a separate column), large ones in pieces (bodies.py),
so a large message is neither copied whole nor left behind in libpq's
buffers. Counter and known-recipient rows are written in sorted order so two
nodes' commits never wait on each other in opposite orders.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from relaygate.accepted import SpooledMessage, SpoolError
from relaygate.quotas import Usage, counter_totals, fresh_recipients, window_keys
from relaygate.storage.postgres import bodies

MAX_BATCH = 256


class PostgresAcceptance:
    def __init__(
        self, pool: AsyncConnectionPool, node: str, *, deliver: bool, in_flight: int = 1
    ) -> None:
        self._pool = pool
        self._node = node
        self._deliver = deliver  # queue for onward delivery (smarthost / mx modes)
        self._pending: list[tuple[SpooledMessage, asyncio.Future[None]]] = []
        # Commits at once: a second lets a batch travel while the first one's
        # WAL flush runs; more only split batches.
        self._in_flight = in_flight
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.commits = 0
        self.messages = 0

    def store(self, message: SpooledMessage) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_exception(SpoolError("shutting down"))
            return future
        self._pending.append((message, future))
        self._start()
        return future

    async def close(self) -> None:
        """Commit what is pending, then stop taking more."""
        self._closing = True
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _start(self) -> None:
        while self._pending and self._running < self._in_flight:
            batch = self._pending[:MAX_BATCH]
            del self._pending[:MAX_BATCH]
            self._running += 1
            task = asyncio.ensure_future(self._commit_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _commit_batch(self, batch: list[tuple[SpooledMessage, asyncio.Future[None]]]) -> None:
        error: str | None = "not stored"
        try:
            error = await self._commit_or_say([m for m, _ in batch])
            if error is _REFUSED_DATA and len(batch) > 1:
                # One message the database will not take (a value it refuses)
                # must not cost the others their commit: each on its own.
                for one in batch:
                    alone = await self._commit_or_say([one[0]])
                    _resolve([one], _REFUSED_TEXT if alone is _REFUSED_DATA else alone)
            if error is _REFUSED_DATA:
                error = _REFUSED_TEXT
        finally:
            self._running -= 1
            _resolve(batch, error)
            self._start()  # what piled up meanwhile goes next, as one batch

    async def _commit_or_say(self, messages: list[SpooledMessage]) -> str | None:
        try:
            return await self._commit(messages)
        except psycopg.DataError:
            return _REFUSED_DATA

    async def _commit(self, messages: list[SpooledMessage]) -> str | None:
        try:
            async with self._pool.connection() as connection:
                if any(len(m.body) >= bodies.CHUNK_BYTES for m in messages):
                    # Large bodies go piece by piece (bodies.py): a transaction.
                    async with connection.transaction(), connection.cursor() as cursor:
                        await cursor.execute(*self._statement(messages))
                        for m in messages:
                            if len(m.body) >= bodies.CHUNK_BYTES:
                                await bodies.write(cursor, m.id, m.header, m.body)
                else:
                    # One statement on an autocommit connection is a transaction of
                    # its own: one round trip for the batch, no BEGIN or COMMIT.
                    await connection.execute(*self._statement(messages))
        except psycopg.DataError:
            raise  # this batch's data: _commit_batch tries its messages one by one
        except (psycopg.Error, OSError) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        except Exception as exc:  # anything else fails this batch, never the writer
            return f"{type(exc).__name__}: {exc}"
        self.commits += 1
        self.messages += len(messages)
        return None

    def _statement(self, messages: list[SpooledMessage]) -> tuple[str, dict[str, Any]]:
        """The batch as one INSERT with data-modifying CTEs: each table gets one
        insert over arrays (unnest), and they all commit together or not at all.
        Bodies of CHUNK_BYTES or more are left to the caller (bodies.write)."""
        small = [m for m in messages if len(m.body) < bodies.CHUNK_BYTES]
        parts = [
            "body AS (INSERT INTO message_bodies (id, header, body)"
            " SELECT * FROM unnest(%(body_ids)b::text[], %(headers)b::bytea[],"
            " %(bodies)b::bytea[]))"
        ]
        params: dict[str, Any] = {
            "node": self._node,
            "body_ids": [m.id for m in small],
            "headers": [m.header for m in small],
            "bodies": [m.body for m in small],  # the session's buffers
        }
        if self._deliver:
            parts.append(_QUEUE)
            params.update(_queue_rows(messages))
        usages = [m.usage for m in messages if m.usage is not None]
        if usages:
            parts += _COUNTERS
            params.update(_counter_rows(usages))
        # Only constant fragments are joined here; every value is a parameter.
        statement = " ".join(("WITH", ", ".join(parts), _MESSAGES))
        params.update(
            ids=[m.id for m in messages],
            accounts=[m.account for m in messages],
            credentials=[m.credential for m in messages],
            ips=[m.client_ip for m in messages],
            froms=[m.mail_from for m in messages],
            rcpts=[json.dumps(m.recipients) for m in messages],
            counts=[len(m.recipients) for m in messages],
            subjects=[m.subject for m in messages],
            sizes=[m.size for m in messages],
            statuses=[m.status for m in messages],
            created=[m.created_at for m in messages],
            utf8=[m.smtputf8 for m in messages],
            eight_bit=[m.body_8bit for m in messages],
        )
        return statement, params


_REFUSED_DATA = "refused data"  # compared by identity: _commit's own errors are other strings
_REFUSED_TEXT = "the database refused a value of this message"

_MESSAGES = (
    "INSERT INTO messages (id, account, credential, client_ip, mail_from, rcpt_to,"
    " recipients, subject, size, status, created_at, smtputf8, body_8bit, node)"
    " SELECT *, %(node)b FROM unnest(%(ids)b::text[], %(accounts)b::text[],"
    " %(credentials)b::text[], %(ips)b::text[], %(froms)b::text[], %(rcpts)b::jsonb[],"
    " %(counts)b::int[], %(subjects)b::text[], %(sizes)b::bigint[], %(statuses)b::text[],"
    " %(created)b::float8[], %(utf8)b::bool[], %(eight_bit)b::bool[])"
)

_QUEUE = (
    "queue AS (INSERT INTO deliveries (message_id, domain, recipients, status,"
    " next_attempt, created_at, updated_at) SELECT q.message_id, q.domain, q.recipients,"
    " q.status, q.due, q.due, q.due FROM unnest(%(queue_ids)b::text[],"
    " %(queue_domains)b::text[], %(queue_rcpts)b::jsonb[], %(queue_status)b::text[],"
    " %(queue_due)b::float8[]) AS q(message_id, domain, recipients, status, due))"
)


def _queue_rows(messages: list[SpooledMessage]) -> dict[str, list[Any]]:
    """Delivery rows, one per message and recipient domain, due now."""
    ids, domains, recipients, statuses, due = [], [], [], [], []
    for m in messages:
        by_domain: dict[str, list[str]] = defaultdict(list)
        for recipient in m.recipients:
            by_domain[recipient.rpartition("@")[2].lower()].append(recipient)
        for domain, group in by_domain.items():
            ids.append(m.id)
            domains.append(domain)
            recipients.append(json.dumps(group))
            statuses.append("held" if m.status == "held" else "queued")
            due.append(m.created_at)
    return {
        "queue_ids": ids,
        "queue_domains": domains,
        "queue_rcpts": recipients,
        "queue_status": statuses,
        "queue_due": due,
    }


# The sending counters a batch adds (quotas.py decides what counts). A recipient
# the account never sent to counts as new only if this insert found it new:
# ``known`` returns those, ``fresh`` attributes each to the (scope, window) pairs
# of the first message that names it (quotas.counter_totals, in SQL). Rows go in
# sorted order so two nodes' commits never wait on each other in opposite orders.
_COUNTERS = [
    "known AS (INSERT INTO known_recipients (account, recipient, first_seen)"
    " SELECT * FROM unnest(%(known_accounts)b::text[], %(known_rcpts)b::text[],"
    " %(known_first)b::float8[]) ON CONFLICT DO NOTHING RETURNING account, recipient)",
    "fresh AS (SELECT f.scope, f.win, count(*) AS n FROM unnest(%(fresh_accounts)b::text[],"
    " %(fresh_rcpts)b::text[], %(fresh_scopes)b::text[], %(fresh_windows)b::text[])"
    " AS f(account, recipient, scope, win) JOIN known USING (account, recipient)"
    " GROUP BY f.scope, f.win)",
    'counted AS (INSERT INTO send_counters (scope, "window", messages, recipients,'
    " new_recipients) SELECT t.scope, t.win, t.messages, t.recipients, coalesce(fresh.n, 0)"
    " FROM unnest(%(scopes)b::text[], %(windows)b::text[], %(messages)b::bigint[],"
    " %(recipients)b::bigint[]) AS t(scope, win, messages, recipients)"
    " LEFT JOIN fresh ON fresh.scope = t.scope AND fresh.win = t.win"
    ' ORDER BY t.scope, t.win ON CONFLICT (scope, "window") DO UPDATE SET'
    " messages = send_counters.messages + excluded.messages,"
    " recipients = send_counters.recipients + excluded.recipients,"
    " new_recipients = send_counters.new_recipients + excluded.new_recipients)",
]


def _counter_rows(usages: list[Usage]) -> dict[str, list[Any]]:
    candidates = sorted(fresh_recipients(usages))
    # Every candidate counted as if new; the SQL keeps only those ``known`` inserted.
    everything = {(c[0], c[1]) for c in candidates}
    totals = sorted(counter_totals(usages, set()).items())
    attributed: list[tuple[str, str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    for usage in usages:
        account = usage.account_address.lower()
        for rcpt in usage.new_recipients:
            key = (account, rcpt.lower())
            if key in everything and key not in seen:
                seen.add(key)
                for window in window_keys(usage.now):
                    attributed += [(*key, scope.key, window) for scope in usage.scopes]
    return {
        "known_accounts": [c[0] for c in candidates],
        "known_rcpts": [c[1] for c in candidates],
        "known_first": [c[2] for c in candidates],
        "fresh_accounts": [a[0] for a in attributed],
        "fresh_rcpts": [a[1] for a in attributed],
        "fresh_scopes": [a[2] for a in attributed],
        "fresh_windows": [a[3] for a in attributed],
        "scopes": [k[0] for k, _ in totals],
        "windows": [k[1] for k, _ in totals],
        "messages": [t[0] for _, t in totals],
        "recipients": [t[1] for _, t in totals],
    }


def _resolve(batch: list[tuple[SpooledMessage, asyncio.Future[None]]], error: str | None) -> None:
    for _, future in batch:
        if future.done():
            continue  # the session went away meanwhile; the message is stored all the same
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(SpoolError(error))
