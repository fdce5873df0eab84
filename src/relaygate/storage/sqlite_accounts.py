"""Accounts (storage.api.Accounts) on the embedded SQLite database.

accounts/store.py keeps the SQL and the change signal; this runs it in the
backend's database thread (storage/sqlite_backend.py), never on an event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relaygate.accounts.store import Account, AccountStore
from relaygate.sasl import StoredKeys
from relaygate.storage.thread import DatabaseThread


class SQLiteAccounts:
    def __init__(self, thread: DatabaseThread[sqlite3.Connection]) -> None:
        self._thread = thread

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
