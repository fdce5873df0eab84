"""Accounts (storage.api.Accounts) on the embedded SQLite database.

accounts/store.py keeps the SQL and the change signal; this runs it in a
thread of its own (storage/thread.py), never on an event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from relaygate.accounts.store import Account, AccountStore
from relaygate.sasl import StoredKeys
from relaygate.storage import sqlite as storage
from relaygate.storage.thread import DatabaseThread


class SQLiteAccounts:
    def __init__(self, database: Path, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._thread = DatabaseThread(
            lambda: storage.connect(database), loop or asyncio.get_running_loop(), "accounts"
        )

    async def get(self, address: str) -> Account | None:
        return await self._thread.run(lambda db: AccountStore(db).get(address))

    async def list(self) -> list[Account]:
        return await self._thread.run(lambda db: AccountStore(db).list())

    async def count(self) -> int:
        return await self._thread.run(lambda db: AccountStore(db).count())

    async def add(
        self,
        address: str,
        password_hash: str,
        senders: Sequence[str] | None,
        scram: StoredKeys | None,
    ) -> Account:
        def add(db: sqlite3.Connection) -> Account:
            return AccountStore(db).add(address, password_hash, senders, scram=scram)

        return await self._thread.run(add)

    async def set_password_hash(
        self, address: str, password_hash: str, scram: StoredKeys | None
    ) -> None:
        await self._thread.run(
            lambda db: AccountStore(db).set_password_hash(address, password_hash, scram=scram)
        )

    async def set_disabled(self, address: str, disabled: bool) -> None:
        await self._thread.run(lambda db: AccountStore(db).set_disabled(address, disabled))

    async def set_senders(self, address: str, senders: Sequence[str]) -> None:
        await self._thread.run(lambda db: AccountStore(db).set_senders(address, senders))

    async def remove(self, address: str) -> None:
        await self._thread.run(lambda db: AccountStore(db).remove(address))

    async def close(self) -> None:
        await asyncio.to_thread(self._thread.close)
