"""Accounts (storage.api.Accounts) on the embedded SQLite database.

accounts/store.py keeps the SQL and the change signal; this runs it in the
backend's database thread (storage/sqlite_backend.py), never on an event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from relaygate.accounts.store import Account, AccountStore
from relaygate.sasl import StoredKeys
from relaygate.storage.thread import DatabaseThread


def same(connection: Any) -> sqlite3.Connection:
    """The thread's resource is the connection itself (the CLI's storage)."""
    return connection  # type: ignore[no-any-return]


class SQLiteAccounts:
    def __init__(
        self,
        thread: DatabaseThread[Any],
        connection: Callable[[Any], sqlite3.Connection] = same,
    ) -> None:
        self._thread = thread
        self._connection = connection  # which of the thread's connections has the accounts

    async def get(self, address: str) -> Account | None:
        return await self._thread.run(lambda c: AccountStore(self._connection(c)).get(address))

    async def list(self) -> list[Account]:
        return await self._thread.run(lambda c: AccountStore(self._connection(c)).list())

    async def count(self) -> int:
        return await self._thread.run(lambda c: AccountStore(self._connection(c)).count())

    async def add(
        self,
        address: str,
        password_hash: str,
        senders: Sequence[str] | None,
        scram: StoredKeys | None,
    ) -> Account:
        def add(c: Any) -> Account:
            return AccountStore(self._connection(c)).add(
                address, password_hash, senders, scram=scram
            )

        return await self._thread.run(add)

    async def set_password_hash(
        self, address: str, password_hash: str, scram: StoredKeys | None
    ) -> None:
        await self._thread.run(
            lambda c: AccountStore(self._connection(c)).set_password_hash(
                address, password_hash, scram=scram
            )
        )

    async def set_disabled(self, address: str, disabled: bool) -> None:
        await self._thread.run(
            lambda c: AccountStore(self._connection(c)).set_disabled(address, disabled)
        )

    async def set_admin(self, address: str, admin: bool) -> None:
        await self._thread.run(
            lambda c: AccountStore(self._connection(c)).set_admin(address, admin)
        )

    async def set_senders(self, address: str, senders: Sequence[str]) -> None:
        await self._thread.run(
            lambda c: AccountStore(self._connection(c)).set_senders(address, senders)
        )

    async def remove(self, address: str) -> None:
        await self._thread.run(lambda c: AccountStore(self._connection(c)).remove(address))
