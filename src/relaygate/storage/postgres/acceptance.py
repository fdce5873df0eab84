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
from relaygate.quotas import counter_totals, fresh_recipients
from relaygate.storage.postgres import bodies

MAX_BATCH = 256


class PostgresAcceptance:
    def __init__(
        self, pool: AsyncConnectionPool, node: str, *, deliver: bool, in_flight: int = 2
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
            error = await self._commit([m for m, _ in batch])
        finally:
            self._running -= 1
            _resolve(batch, error)
            self._start()  # what piled up meanwhile goes next, as one batch

    async def _commit(self, messages: list[SpooledMessage]) -> str | None:
        try:
            async with (
                self._pool.connection() as connection,
                connection.pipeline(),  # statements go out together: few round trips
                connection.transaction(),
            ):
                await self._write(connection, messages)
        except (psycopg.Error, OSError) as exc:
            return " ".join(str(exc).split()) or type(exc).__name__
        except Exception as exc:  # anything else fails this batch, never the writer
            return f"{type(exc).__name__}: {exc}"
        self.commits += 1
        self.messages += len(messages)
        return None

    async def _write(
        self, connection: psycopg.AsyncConnection[Any], messages: list[SpooledMessage]
    ) -> None:
        async with connection.cursor() as cursor:
            # One statement per table for the whole batch (arrays, unnest): the
            # server plans and runs one insert, not one per message.
            await cursor.execute(
                "INSERT INTO messages (id, account, credential, client_ip, mail_from, rcpt_to,"
                " recipients, subject, size, status, created_at, smtputf8, body_8bit, node)"
                " SELECT *, %s FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
                " %s::text[], %s::jsonb[], %s::int[], %s::text[], %s::bigint[], %s::text[],"
                " %s::float8[], %s::bool[], %s::bool[])",
                (
                    self._node,
                    [m.id for m in messages],
                    [m.account for m in messages],
                    [m.credential for m in messages],
                    [m.client_ip for m in messages],
                    [m.mail_from for m in messages],
                    [json.dumps(m.recipients) for m in messages],
                    [len(m.recipients) for m in messages],
                    [m.subject for m in messages],
                    [m.size for m in messages],
                    [m.status for m in messages],
                    [m.created_at for m in messages],
                    [m.smtputf8 for m in messages],
                    [m.body_8bit for m in messages],
                ),
            )
            small = [m for m in messages if len(m.body) < bodies.CHUNK_BYTES]
            if small:
                await cursor.execute(
                    "INSERT INTO message_bodies (id, header, body)"
                    " SELECT * FROM unnest(%s::text[], %b::bytea[], %b::bytea[])",
                    (
                        [m.id for m in small],
                        [m.header for m in small],
                        [m.body for m in small],  # the session's buffers, not copies
                    ),
                )
            for m in messages:
                if len(m.body) >= bodies.CHUNK_BYTES:
                    await bodies.write(cursor, m.id, m.header, m.body)
            if self._deliver:
                await enqueue_many(cursor, [(m.id, m.recipients) for m in messages], messages)
            usages = [m.usage for m in messages if m.usage is not None]
            if usages:
                await _count(cursor, usages)


async def enqueue_many(
    cursor: psycopg.AsyncCursor[Any],
    items: list[tuple[str, list[str]]],
    messages: list[SpooledMessage],
) -> None:
    """Delivery rows, one per message and recipient domain, due now."""
    now = messages[0].created_at
    rows = []
    for message_id, recipients in items:
        by_domain: dict[str, list[str]] = defaultdict(list)
        for recipient in recipients:
            by_domain[recipient.rpartition("@")[2].lower()].append(recipient)
        rows += [(message_id, d, json.dumps(r), now, now, now) for d, r in by_domain.items()]
    await cursor.executemany(
        "INSERT INTO deliveries (message_id, domain, recipients, status, next_attempt,"
        " created_at, updated_at) VALUES (%s, %s, %s, 'queued', %s, %s, %s)",
        rows,
    )


async def _count(cursor: psycopg.AsyncCursor[Any], usages: list[Any]) -> None:
    """The sending counters these messages add (quotas.py decides what counts)."""
    candidates = sorted(fresh_recipients(usages))
    inserted: set[tuple[str, str]] = set()
    if candidates:
        await cursor.execute(
            "INSERT INTO known_recipients (account, recipient, first_seen)"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[])"
            " ON CONFLICT DO NOTHING RETURNING account, recipient",
            (
                [c[0] for c in candidates],
                [c[1] for c in candidates],
                [c[2] for c in candidates],
            ),
        )
        inserted = {(str(a), str(r)) for a, r in await cursor.fetchall()}
    totals = sorted(counter_totals(usages, inserted).items())
    if totals:
        await cursor.execute(
            'INSERT INTO send_counters (scope, "window", messages, recipients, new_recipients)'
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
            ' %s::bigint[]) ON CONFLICT (scope, "window") DO UPDATE SET'
            " messages = send_counters.messages + excluded.messages,"
            " recipients = send_counters.recipients + excluded.recipients,"
            " new_recipients = send_counters.new_recipients + excluded.new_recipients",
            (
                [k[0] for k, _ in totals],
                [k[1] for k, _ in totals],
                [t[0] for _, t in totals],
                [t[1] for _, t in totals],
                [t[2] for _, t in totals],
            ),
        )


def _resolve(batch: list[tuple[SpooledMessage, asyncio.Future[None]]], error: str | None) -> None:
    for _, future in batch:
        if future.done():
            continue  # the session went away meanwhile; the message is stored all the same
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(SpoolError(error))
