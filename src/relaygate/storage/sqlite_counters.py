"""Sending-limit reads (storage.api.SendingCounters) on the embedded SQLite database.

quotas.py has the rules and the SQL; this runs them in a database thread
(the worker's service thread), never on the event loop. Counts are written
by the spool, in the transaction that accepts the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from relaygate.quotas import Quotas, Scope
from relaygate.storage.sqlite import connect
from relaygate.storage.thread import Closable, DatabaseThread

T = TypeVar("T", bound=Closable)


class SQLiteSendingCounters(Generic[T]):
    def __init__(
        self,
        thread: DatabaseThread[T],
        connection: Callable[[T], sqlite3.Connection],
        database: Path | None = None,
    ) -> None:
        self._thread = thread
        self._connection = connection  # which of the thread's connections holds the counters
        self._database = database

    async def check_message(self, scopes: Sequence[Scope], now: float) -> bytes | None:
        return await self._thread.run(
            lambda c: Quotas(self._connection(c)).check_message(scopes, now)
        )

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
        return await self._thread.run(
            lambda c: Quotas(self._connection(c)).check_recipient(
                scopes,
                account_address,
                recipient,
                accepted_so_far=accepted_so_far,
                new_so_far=new_so_far,
                now=now,
            )
        )

    async def prune(self, now: float) -> None:
        database = self._database
        if database is None:
            await self._thread.run(lambda c: Quotas(self._connection(c)).prune(now))
            return

        # Its own short-lived thread and connection: a delete that waits on a lock
        # held elsewhere must not hold up the logins queued in the service thread.
        def prune() -> None:
            with contextlib.closing(connect(database)) as db:
                Quotas(db).prune(now)

        await asyncio.to_thread(prune)
