"""Durable acceptance: a message is committed to disk before we answer 250.

Group commit: sessions hand their messages to one writer thread per worker
process. While a commit (and its fsync) is running, new messages pile up;
the next commit takes them all. One fsync then covers many sessions, so
durability does not cap throughput. The thread releases the GIL inside
SQLite, so the event loop keeps serving while the disk works.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from pathlib import Path

from relaygate import quotas
from relaygate.accepted import SpooledMessage, SpoolError, new_queue_id
from relaygate.delivery import queue as delivery_queue
from relaygate.storage import bodies
from relaygate.storage import sqlite as storage

__all__ = ["Spool", "SpoolError", "SpooledMessage", "new_queue_id"]

MAX_BATCH = 256
WAL_LIMIT = 512 * 1024 * 1024  # bytes of WAL file before the spool forces a truncation


class Spool:
    def __init__(
        self, database: Path, loop: asyncio.AbstractEventLoop, *, deliver: bool = False
    ) -> None:
        self._database = database
        self._wal = database.with_name(database.name + "-wal")
        self._bodies = bodies.directory_for(database)
        self._bodies_ready = False  # data_dir/bodies made (once, by this writer)
        self._deliver = deliver  # queue for onward delivery (smarthost / mx modes)
        self._loop = loop
        self._pending: list[tuple[SpooledMessage, asyncio.Future[None]]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.commits = 0
        self.messages = 0
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def store(self, message: SpooledMessage) -> asyncio.Future[None]:
        """A future that completes once the message is durable on disk."""
        future: asyncio.Future[None] = self._loop.create_future()
        with self._wake:
            if self._stopping:
                future.set_exception(SpoolError("spool is shutting down"))
                return future
            self._pending.append((message, future))
            if len(self._pending) == 1:
                self._wake.notify()
        return future

    def close(self) -> None:
        """Commit what is pending, then stop the writer thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        db = storage.connect(self._database, check_same_thread=True)
        try:
            while True:
                with self._wake:
                    while not self._pending and not self._stopping:
                        self._wake.wait()
                    if not self._pending and self._stopping:
                        return
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                error = self._commit(db, [m for m, _ in batch])
                try:
                    self._loop.call_soon_threadsafe(_resolve, batch, error)
                except RuntimeError:
                    return  # the event loop is gone: nobody is waiting
                del batch  # let large bodies go now, not at the next batch
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, messages: list[SpooledMessage]) -> str | None:
        # Large bodies first, each in its own file, durable before the rows
        # that name them commit (storage/bodies.py).
        spilled = {m.id for m in messages if m.size >= bodies.SPILL_BYTES}
        try:
            if spilled:
                if not self._bodies_ready:
                    bodies.prepare(self._bodies)
                    self._bodies_ready = True
                for m in messages:
                    if m.id in spilled:
                        bodies.write_file(self._bodies, m.id, (m.header, m.body))
                bodies.sync_directory(self._bodies)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO messages (id, account, client_ip, mail_from, rcpt_to, subject,"
                    " size, status, created_at, credential, recipients, smtputf8, body_8bit)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            m.id,
                            m.account,
                            m.client_ip,
                            m.mail_from,
                            json.dumps(m.recipients),
                            m.subject,
                            m.size,
                            m.status,
                            m.created_at,
                            m.credential,
                            len(m.recipients),
                            m.smtputf8,
                            m.body_8bit,
                        )
                        for m in messages
                    ],
                )
                for m in messages:
                    _store_body(db, m, in_file=m.id in spilled)
                if self._deliver:
                    delivery_queue.enqueue_many(
                        db,
                        [
                            (m.id, m.recipients, "held" if m.status == "held" else "queued")
                            for m in messages
                        ],
                        messages[0].created_at,
                    )
                # Sending-limit counters commit with the messages they count.
                quotas.record_many(db, [m.usage for m in messages if m.usage is not None])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # anything else fails this batch, never the thread
            error = f"{type(exc).__name__}: {exc}"
        else:
            self.commits += 1
            self.messages += len(messages)
            self._limit_wal(db)
            return None
        for message_id in spilled:  # nobody was told 250: the files go too (if made)
            bodies.remove_file(self._bodies, message_id)
        return error

    def _limit_wal(self, db: sqlite3.Connection) -> None:
        """Keep the WAL file bounded under sustained large messages.

        The automatic checkpoint is PASSIVE: with readers active (logins, the CLI,
        delivery) it cannot always reset the log, so the file keeps growing, and
        SQLite never shrinks it by itself. journal_size_limit (storage.sqlite)
        truncates it whenever a reset happens; past WAL_LIMIT we also ask for a
        TRUNCATE checkpoint, waiting for readers only briefly.
        """
        try:
            if os.stat(self._wal).st_size <= WAL_LIMIT:
                return
            db.execute("PRAGMA busy_timeout=200")
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                db.execute("PRAGMA busy_timeout=30000")
        except (OSError, sqlite3.Error):
            pass  # the next commit tries again


def _store_body(db: sqlite3.Connection, message: SpooledMessage, *, in_file: bool) -> None:
    """The row for the body: the bytes themselves, or a mark that they are in a file.

    A small body is our header and the client's body joined as one blob, here
    in the writer thread right before the insert (the joined copy lives for
    that statement only).
    """
    if in_file:
        db.execute(
            "INSERT INTO message_bodies (id, body, in_file) VALUES (?, x'', 1)", (message.id,)
        )
        return
    db.execute(
        "INSERT INTO message_bodies (id, body) VALUES (?, ?)",
        (message.id, message.header + message.body if message.header else message.body),
    )


def _resolve(batch: list[tuple[SpooledMessage, asyncio.Future[None]]], error: str | None) -> None:
    for _, future in batch:
        if future.done():
            continue  # the session went away meanwhile; the message is stored all the same
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(SpoolError(error))
