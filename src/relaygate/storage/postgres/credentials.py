"""App credentials and sending-limit overrides (storage.api.Credentials) on PostgreSQL.

The rules and messages are accounts/credentials.py's; the secret is stored
only as HMAC-SHA256 under the shared ``credential_key`` secret, so a
credential made on one node is found by every other.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from relaygate.accounts.credentials import (
    Credential,
    CredentialError,
    credential_from_row,
    credential_senders,
    decode_limits,
    encode_limits,
    looks_like_credential,
    merge_limits,
    new_credential_input,
    new_secret,
)
from relaygate.accounts.store import Account, AccountError, normalize_address
from relaygate.storage.postgres.accounts import Announce, get_account

_COLUMNS = """
    c.id, c.account_id, a.address, c.name, c.senders, c.networks, c.limits,
    c.expires_at, c.created_at, c.last_used_at, c.revoked_at
"""
_FROM = " FROM credentials AS c JOIN accounts AS a ON a.id = c.account_id"
_SELECT = "SELECT" + _COLUMNS + _FROM


def _existing(address: str) -> str:
    try:
        return normalize_address(address)
    except AccountError:
        raise CredentialError(f"no such account: {address}") from None


class PostgresCredentials:
    def __init__(self, pool: AsyncConnectionPool, announce: Announce, key: bytes) -> None:
        self._pool = pool
        self._announce = announce
        self._key = key  # secrets.credential_key, the same on every node

    def _hash(self, secret: str) -> bytes:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).digest()

    async def add(
        self,
        address: str,
        name: str,
        *,
        expires_at: float | None,
        senders: Sequence[str] | None,
        networks: Sequence[str] | None,
    ) -> tuple[Credential, str]:
        name, network_list = new_credential_input(name, expires_at, networks, now := time.time())
        secret = new_secret()
        async with self._pool.connection() as connection, connection.transaction():
            account = await _account(connection, address)
            sender_list = None if senders is None else credential_senders(senders, account)
            await _check_name_free(connection, account, name)
            try:
                cursor = await connection.execute(
                    "INSERT INTO credentials (account_id, name, secret_hash, senders, networks,"
                    " expires_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (
                        account.id,
                        name,
                        self._hash(secret),
                        None if sender_list is None else json.dumps(sender_list),
                        None if network_list is None else json.dumps(network_list),
                        expires_at,
                        now,
                    ),
                )
            except psycopg.errors.UniqueViolation:  # a concurrent add of the same name
                raise CredentialError(
                    f"credential {name!r} already exists for {account.address}"
                ) from None
            row = await cursor.fetchone()
            assert row is not None
        await self._announce()
        credential = Credential(
            id=int(row[0]),
            account_id=account.id,
            account_address=account.address,
            name=name,
            senders=None if sender_list is None else tuple(sender_list),
            networks=None if network_list is None else tuple(network_list),
            limits=None,
            expires_at=expires_at,
            created_at=now,
            last_used_at=None,
            revoked_at=None,
        )
        return credential, secret

    async def list(self, address: str) -> list[Credential]:
        async with self._pool.connection() as connection:
            account = await _account(connection, address)
            cursor = await connection.execute(
                _SELECT + " WHERE c.account_id = %s ORDER BY lower(c.name), c.id", (account.id,)
            )
            return [credential_from_row(row) for row in await cursor.fetchall()]

    async def get(self, address: str, name: str) -> Credential:
        async with self._pool.connection() as connection:
            return await _named(connection, await _account(connection, address), name)

    async def revoke(self, address: str, name: str) -> Credential:
        async with self._pool.connection() as connection, connection.transaction():
            credential = await _named(connection, await _account(connection, address), name)
            if credential.revoked_at is not None:
                raise CredentialError(
                    f"credential {credential.name!r} of {credential.account_address}"
                    " is already revoked"
                )
            cursor = await connection.execute(
                "UPDATE credentials SET revoked_at = %s WHERE id = %s RETURNING revoked_at",
                (time.time(), credential.id),
            )
            row = await cursor.fetchone()
            assert row is not None
        await self._announce()
        return replace(credential, revoked_at=float(row[0]))

    async def update_limits(
        self, address: str, name: str, changes: Mapping[str, int], *, clear: bool
    ) -> Credential:
        async with self._pool.connection() as connection, connection.transaction():
            credential = await _named(connection, await _account(connection, address), name)
            limits = merge_limits(credential.limits, changes, clear)
            await connection.execute(
                "UPDATE credentials SET limits = %s WHERE id = %s",
                (encode_limits(limits), credential.id),
            )
        await self._announce()
        return replace(credential, limits=limits)

    async def find(self, secret: str) -> Credential | None:
        if not looks_like_credential(secret):
            return None
        wanted = self._hash(secret)
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT c.secret_hash," + _COLUMNS + _FROM + " WHERE c.secret_hash = %s",
                (wanted,),
            )
            row = await cursor.fetchone()
        if row is None or not hmac.compare_digest(bytes(row[0]), wanted):
            return None
        return credential_from_row(row[1:])

    async def by_id(self, credential_id: int) -> Credential | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(_SELECT + " WHERE c.id = %s", (credential_id,))
            row = await cursor.fetchone()
        return credential_from_row(row) if row is not None else None

    async def touch(self, credential_id: int, now: float) -> None:
        async with self._pool.connection() as connection:
            await connection.execute(
                "UPDATE credentials SET last_used_at = %s"
                " WHERE id = %s AND (last_used_at IS NULL OR last_used_at < %s)",
                (now, credential_id, now),
            )

    async def account_limits(self, address: str) -> dict[str, int] | None:
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT limits FROM accounts WHERE lower(address) = lower(%s)",
                (_existing(address),),
            )
            row = await cursor.fetchone()
        if row is None:
            raise CredentialError(f"no such account: {address}")
        return decode_limits(row[0])

    async def all_account_limits(self) -> dict[str, dict[str, int] | None]:
        async with self._pool.connection() as connection:
            cursor = await connection.execute("SELECT address, limits FROM accounts")
            rows = await cursor.fetchall()
        return {str(address).lower(): decode_limits(limits) for address, limits in rows}

    async def update_account_limits(
        self, address: str, changes: Mapping[str, int], *, clear: bool
    ) -> dict[str, int] | None:
        normalized = _existing(address)
        async with self._pool.connection() as connection, connection.transaction():
            cursor = await connection.execute(
                "SELECT limits FROM accounts WHERE lower(address) = lower(%s) FOR UPDATE",
                (normalized,),
            )
            row = await cursor.fetchone()
            if row is None:
                raise CredentialError(f"no such account: {address}")
            limits = merge_limits(decode_limits(row[0]), changes, clear)
            await connection.execute(
                "UPDATE accounts SET limits = %s, updated_at = %s WHERE lower(address) = lower(%s)",
                (encode_limits(limits), time.time(), normalized),
            )
        await self._announce()
        return limits


async def _account(connection: psycopg.AsyncConnection[Any], address: str) -> Account:
    account = await get_account(connection, address)
    if account is None:
        raise CredentialError(f"no such account: {address}")
    return account


async def _named(
    connection: psycopg.AsyncConnection[Any], account: Account, name: str
) -> Credential:
    cursor = await connection.execute(
        _SELECT + " WHERE c.account_id = %s AND lower(c.name) = lower(%s)", (account.id, name)
    )
    row = await cursor.fetchone()
    if row is None:
        raise CredentialError(f"no such credential: {name!r} of {account.address}")
    return credential_from_row(row)


async def _check_name_free(
    connection: psycopg.AsyncConnection[Any], account: Account, name: str
) -> None:
    cursor = await connection.execute(
        "SELECT name, revoked_at FROM credentials"
        " WHERE account_id = %s AND lower(name) = lower(%s)",
        (account.id, name),
    )
    row = await cursor.fetchone()
    if row is not None:
        note = " (revoked credentials keep their name)" if row[1] is not None else ""
        raise CredentialError(f"credential {row[0]!r} already exists for {account.address}{note}")
