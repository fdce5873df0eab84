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
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from relaygate import quotas
from relaygate.delivery import queue as delivery_queue
from relaygate.quotas import Usage
from relaygate.storage import sqlite as storage

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MAX_BATCH = 256


_rng: tuple[int, random.Random] | None = None


def _random_bits(bits: int) -> int:
    """Fast non-secret randomness, seeded from the OS once per process (fork-safe)."""
    global _rng
    pid = os.getpid()
    if _rng is None or _rng[0] != pid:
        _rng = (pid, random.Random(os.urandom(16)))
    return _rng[1].getrandbits(bits)


def new_queue_id(now: float | None = None) -> str:
    """17 characters: 9 of millisecond time (sortable), 8 random (40 bits).

    Uniqueness, not secrecy, is what matters: a process-seeded PRNG costs a
    fraction of a getrandom() system call per message.
    """
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 40) | _random_bits(40)
    chars = []
    for _ in range(17):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(slots=True)
class SpooledMessage:
    id: str
    account: str
    client_ip: str
    mail_from: str
    recipients: list[str]
    subject: str
    body: bytes
    created_at: float
    status: str = "captured"
    credential: str | None = None  # the app credential's name; None: the password
    usage: Usage | None = None  # what it counts against sending limits
    smtputf8: bool = False  # relayed onward with the same MAIL parameters
    body_8bit: bool = False


class SpoolError(Exception):
    """The message could not be stored; the client gets a 451 and may retry."""


class Spool:
    def __init__(
        self, database: Path, loop: asyncio.AbstractEventLoop, *, deliver: bool = False
    ) -> None:
        self._database = database
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
                self._loop.call_soon_threadsafe(_resolve, batch, error)
        finally:
            db.close()

    def _commit(self, db: sqlite3.Connection, messages: list[SpooledMessage]) -> str | None:
        try:
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
                            len(m.body),
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
                db.executemany(
                    "INSERT INTO message_bodies (id, body) VALUES (?, ?)",
                    [(m.id, m.body) for m in messages],
                )
                if self._deliver:
                    delivery_queue.enqueue_many(
                        db, [(m.id, m.recipients) for m in messages], messages[0].created_at
                    )
                # Sending-limit counters commit with the messages they count.
                quotas.record_many(db, [m.usage for m in messages if m.usage is not None])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            return str(exc)
        self.commits += 1
        self.messages += len(messages)
        return None


def _resolve(batch: list[tuple[SpooledMessage, asyncio.Future[None]]], error: str | None) -> None:
    for _, future in batch:
        if future.done():
            continue  # the session went away meanwhile; the message is stored all the same
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(SpoolError(error))
