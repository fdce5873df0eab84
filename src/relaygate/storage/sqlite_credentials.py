"""App credentials and sending-limit overrides (storage.api.Credentials) on the
embedded SQLite database.

accounts/credentials.py keeps the SQL, the secret's keyed hash and the change
signal; this runs it in the backend's database thread (storage/sqlite_backend.py),
never on an event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from relaygate.accounts.credentials import (
    Credential,
    CredentialStore,
    account_limits,
    all_account_limits,
    update_account_limits,
)
from relaygate.storage.thread import DatabaseThread


class SQLiteCredentials:
    def __init__(self, thread: DatabaseThread[sqlite3.Connection]) -> None:
        self._thread = thread

    async def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None,
        senders: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> tuple[Credential, str]:
        def add(db: sqlite3.Connection) -> tuple[Credential, str]:
            return CredentialStore(db).add(
                address, name, expires_at=expires_at, senders=senders, networks=networks
            )

        return await self._thread.run(add)

    async def list(self, address: str) -> list[Credential]:
        return await self._thread.run(lambda db: CredentialStore(db).list(address))

    async def get(self, address: str, name: str) -> Credential:
        return await self._thread.run(lambda db: CredentialStore(db).get(address, name))

    async def revoke(self, address: str, name: str) -> Credential:
        return await self._thread.run(lambda db: CredentialStore(db).revoke(address, name))

    async def update_limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool
    ) -> Credential:
        def update(db: sqlite3.Connection) -> Credential:
            return CredentialStore(db).update_limits(address, name, changes, clear=clear)

        return await self._thread.run(update)

    async def find(self, secret: str) -> Credential | None:
        return await self._thread.run(lambda db: CredentialStore(db).find(secret))

    async def by_id(self, credential_id: int) -> Credential | None:
        return await self._thread.run(lambda db: CredentialStore(db).by_id(credential_id))

    async def touch(self, credential_id: int, now: float) -> None:
        await self._thread.run(lambda db: CredentialStore(db).touch(credential_id, now))

    async def account_limits(self, address: str) -> dict[str, int] | None:
        return await self._thread.run(account_limits, address)

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        return await self._thread.run(all_account_limits)

    async def update_account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool
    ) -> dict[str, int] | None:
        def update(db: sqlite3.Connection) -> dict[str, int] | None:
            return update_account_limits(db, address, changes, clear=clear)

        return await self._thread.run(update)
