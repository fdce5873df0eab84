"""Accounts (storage.api.Accounts) and server secrets on PostgreSQL.

The rules (address and pattern checks, messages for users) are
accounts/store.py's; only the SQL differs. Addresses compare without case:
the unique index is on lower(address) and every look-up goes through it.
Each write is one transaction, then ``announce`` tells the nodes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from relaygate.accounts.store import (
    Account,
    AccountError,
    account_from_row,
    encode_scram,
    normalize_address,
    normalize_senders,
)
from relaygate.sasl import StoredKeys

Announce = Callable[[], Awaitable[None]]

# One row per account with its patterns folded in (a newline cannot occur in a pattern).
_SELECT_ACCOUNT = """
    SELECT a.id, a.address, a.password_hash, a.disabled, a.created_at, a.updated_at,
           string_agg(s.pattern, E'\\n'), a.scram_sha256, a.limits, a.admin
    FROM accounts AS a LEFT JOIN account_senders AS s ON s.account_id = a.id
"""


async def get_account(connection: psycopg.AsyncConnection[Any], address: str) -> Account | None:
    """The account for ``address`` (any case), on a connection the caller holds."""
    try:
        address = normalize_address(address)
    except AccountError:
        return None
    cursor = await connection.execute(
        _SELECT_ACCOUNT + " WHERE lower(a.address) = lower(%s) GROUP BY a.id", (address,)
    )
    row = await cursor.fetchone()
    return account_from_row(row) if row is not None else None


def _existing(address: str) -> str:
    try:
        return normalize_address(address)
    except AccountError:
        raise AccountError(f"no such account: {address}") from None


class PostgresAccounts:
    def __init__(self, pool: AsyncConnectionPool, announce: Announce) -> None:
        self._pool = pool
        self._announce = announce

    async def get(self, address: str) -> Account | None:
        async with self._pool.connection() as connection:
            return await get_account(connection, address)

    async def list(self) -> list[Account]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                _SELECT_ACCOUNT + " GROUP BY a.id ORDER BY lower(a.address)"
            )
            return [account_from_row(row) for row in await cursor.fetchall()]

    async def count(self) -> int:
        async with self._pool.connection() as connection:
            cursor = await connection.execute("SELECT count(*) FROM accounts")
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0

    async def add(
        self,
        address: str,
        password_hash: str,
        senders: Sequence[str] | None,
        scram: StoredKeys | None,
    ) -> Account:
        address = normalize_address(address)
        patterns = normalize_senders([address] if senders is None else senders)
        now = time.time()
        try:
            async with self._pool.connection() as connection, connection.transaction():
                cursor = await connection.execute(
                    "INSERT INTO accounts (address, password_hash, disabled, created_at,"
                    " updated_at, scram_sha256) VALUES (%s, %s, FALSE, %s, %s, %s) RETURNING id",
                    (address, password_hash, now, now, encode_scram(scram) if scram else None),
                )
                row = await cursor.fetchone()
                assert row is not None
                account_id = int(row[0])
                await _insert_senders(connection, account_id, patterns)
        except psycopg.errors.UniqueViolation:
            raise AccountError(f"account already exists: {address}") from None
        await self._announce()
        return Account(
            id=account_id,
            address=address,
            password_hash=password_hash,
            disabled=False,
            senders=tuple(sorted(patterns)),
            created_at=now,
            updated_at=now,
            scram=scram,
        )

    async def set_password_hash(
        self, address: str, password_hash: str, scram: StoredKeys | None
    ) -> None:
        await self._update(
            address,
            "password_hash = %s, scram_sha256 = %s",
            (password_hash, encode_scram(scram) if scram else None),
        )

    async def set_disabled(self, address: str, disabled: bool) -> None:
        await self._update(address, "disabled = %s", (disabled,))

    async def set_admin(self, address: str, admin: bool) -> None:
        await self._update(address, "admin = %s", (admin,))

    async def set_senders(self, address: str, senders: Sequence[str]) -> None:
        patterns = normalize_senders(senders)
        async with self._pool.connection() as connection, connection.transaction():
            account_id = await _touch(connection, address, "", ())
            await connection.execute(
                "DELETE FROM account_senders WHERE account_id = %s", (account_id,)
            )
            await _insert_senders(connection, account_id, patterns)
        await self._announce()

    async def remove(self, address: str) -> None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "DELETE FROM accounts WHERE lower(address) = lower(%s)", (_existing(address),)
            )
            if cursor.rowcount == 0:
                raise AccountError(f"no such account: {address}")
        await self._announce()

    async def _update(self, address: str, assignment: str, values: tuple[object, ...]) -> None:
        async with self._pool.connection() as connection:
            await _touch(connection, address, assignment, values)
        await self._announce()


async def _touch(
    connection: psycopg.AsyncConnection[Any],
    address: str,
    assignment: str,
    values: tuple[object, ...],
) -> int:
    """Apply ``assignment`` and bump updated_at; the account id."""
    columns = f"{assignment}, updated_at = %s" if assignment else "updated_at = %s"
    cursor = await connection.execute(
        f"UPDATE accounts SET {columns} WHERE lower(address) = lower(%s) RETURNING id",  # noqa: S608
        (*values, time.time(), _existing(address)),
    )
    row = await cursor.fetchone()
    if row is None:
        raise AccountError(f"no such account: {address}")
    return int(row[0])


async def _insert_senders(
    connection: psycopg.AsyncConnection[Any], account_id: int, patterns: Sequence[str]
) -> None:
    async with connection.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO account_senders (account_id, pattern) VALUES (%s, %s)",
            [(account_id, pattern) for pattern in patterns],
        )


class PostgresSecrets:
    """Server secrets (storage.api.Secrets): the first node to ask makes one;
    ``ON CONFLICT DO NOTHING`` then a read makes every node agree on it."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def get_or_create(self, name: str, size: int = 32) -> bytes:
        async with self._pool.connection() as connection:
            await connection.execute(
                "INSERT INTO secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
                (name, os.urandom(size)),
            )
            cursor = await connection.execute("SELECT value FROM secrets WHERE name = %s", (name,))
            row = await cursor.fetchone()
        assert row is not None
        return bytes(row[0])
