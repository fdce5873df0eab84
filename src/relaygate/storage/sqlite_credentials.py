"""App credentials and sending-limit overrides (storage.api.Credentials) on the
embedded SQLite database.

accounts/credentials.py keeps the SQL, the secret's keyed hash and the change
signal; this runs it in the backend's database thread (storage/sqlite_backend.py),
never on an event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from relaygate.accounts.credentials import (
    Credential,
    CredentialStore,
    account_limits,
    all_account_limits,
    update_account_limits,
)
from relaygate.storage.sqlite_accounts import same
from relaygate.storage.thread import DatabaseThread


class SQLiteCredentials:
    def __init__(
        self,
        thread: DatabaseThread[Any],
        connection: Callable[[Any], sqlite3.Connection] = same,
    ) -> None:
        self._thread = thread
        self._connection = connection
        self._store: CredentialStore | None = None  # made in the thread: reads the key once

    def _in_thread(self, c: Any) -> CredentialStore:
        if self._store is None:
            self._store = CredentialStore(self._connection(c))
        return self._store

    async def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None,
        senders: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> tuple[Credential, str]:
        def add(c: Any) -> tuple[Credential, str]:
            return self._in_thread(c).add(
                address, name, expires_at=expires_at, senders=senders, networks=networks
            )

        return await self._thread.run(add)

    async def list(self, address: str) -> list[Credential]:
        return await self._thread.run(lambda c: self._in_thread(c).list(address))

    async def get(self, address: str, name: str) -> Credential:
        return await self._thread.run(lambda c: self._in_thread(c).get(address, name))

    async def revoke(self, address: str, name: str) -> Credential:
        return await self._thread.run(lambda c: self._in_thread(c).revoke(address, name))

    async def update_limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool
    ) -> Credential:
        def update(c: Any) -> Credential:
            return self._in_thread(c).update_limits(address, name, changes, clear=clear)

        return await self._thread.run(update)

    async def find(self, secret: str) -> Credential | None:
        return await self._thread.run(lambda c: self._in_thread(c).find(secret))

    async def by_id(self, credential_id: int) -> Credential | None:
        return await self._thread.run(lambda c: self._in_thread(c).by_id(credential_id))

    async def touch(self, credential_id: int, now: float) -> None:
        await self._thread.run(lambda c: self._in_thread(c).touch(credential_id, now))

    async def account_limits(self, address: str) -> dict[str, int] | None:
        return await self._thread.run(lambda c: account_limits(self._connection(c), address))

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        return await self._thread.run(lambda c: all_account_limits(self._connection(c)))

    async def update_account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool
    ) -> dict[str, int] | None:
        def update(c: Any) -> dict[str, int] | None:
            return update_account_limits(self._connection(c), address, changes, clear=clear)

        return await self._thread.run(update)
