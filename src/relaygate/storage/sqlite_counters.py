"""Sending-limit reads (storage.api.SendingCounters) on the embedded SQLite database.

quotas.py has the rules and the SQL; this runs them in a database thread
(the worker's service thread), never on the event loop. Counts are written
by the spool, in the transaction that accepts the messages.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from relaygate.quotas import Quotas, Scope
from relaygate.storage.thread import Closable, DatabaseThread

T = TypeVar("T", bound=Closable)


class SQLiteSendingCounters(Generic[T]):
    def __init__(
        self, thread: DatabaseThread[T], connection: Callable[[T], sqlite3.Connection]
    ) -> None:
        self._thread = thread
        self._connection = connection  # which of the thread's connections holds the counters

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

    async def prune(self, now: float | None = None) -> None:
        when = time.time() if now is None else now
        await self._thread.run(lambda c: Quotas(self._connection(c)).prune(when))
