"""DKIM signing keys on PostgreSQL: every node of a cluster signs with the same keys.

On one machine the keys are files in data_dir/dkim (delivery/dkim.py); with
``[storage] url`` they are rows of ``dkim_keys`` (the private key as PEM),
made by ``relaygate dkim generate`` on any node and loaded by every node's
delivery process. The rules (names, key sizes, one selector per DNS record)
are delivery/dkim.py's.
"""

from __future__ import annotations

import time

from psycopg_pool import AsyncConnectionPool

from relaygate.delivery.dkim import (
    DEFAULT_SELECTORS,
    KEY_TYPES,
    DKIMError,
    DKIMKey,
    KeyType,
    key_from_pem,
    new_key,
    normalize_domain,
    normalize_selector,
)


class PostgresDKIMKeys:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    def where(self, key: DKIMKey) -> str:
        """How commands name a stored key (files show their path)."""
        return f"database: {key.domain}/{key.selector}.{key.key_type}"

    async def generate(self, domain: str, selector: str | None, algorithm: KeyType) -> DKIMKey:
        """A new key, stored; never replaces one (nor reuses a selector of the domain)."""
        if algorithm not in KEY_TYPES:
            raise DKIMError(f"unknown algorithm: {algorithm!r}: use rsa or ed25519")
        domain = normalize_domain(domain)
        selector = normalize_selector(
            DEFAULT_SELECTORS[algorithm] if selector is None else selector
        )
        key, pem = new_key(domain, selector, algorithm)
        async with self._pool.connection() as connection, connection.transaction():
            # One selector names one DNS record, whatever the key type.
            await connection.execute("LOCK TABLE dkim_keys IN SHARE ROW EXCLUSIVE MODE")
            cursor = await connection.execute(
                "SELECT 1 FROM dkim_keys WHERE domain = %s AND selector = %s", (domain, selector)
            )
            if await cursor.fetchone() is not None:
                raise DKIMError(
                    f"{domain} has a key with selector {selector!r} already;"
                    " choose another selector (keys are never replaced)"
                )
            await connection.execute(
                "INSERT INTO dkim_keys (domain, selector, key_type, pem, created_at)"
                " VALUES (%s, %s, %s, %s, %s)",
                (domain, selector, algorithm, pem.decode("ascii"), time.time()),
            )
        return key

    async def load(self) -> dict[str, list[DKIMKey]]:
        """Every key, by domain (RSA before Ed25519, then by selector)."""
        async with self._pool.connection() as connection:
            cursor = await connection.execute(
                "SELECT domain, selector, key_type, pem FROM dkim_keys ORDER BY domain, selector"
            )
            rows = await cursor.fetchall()
        keys: dict[str, list[DKIMKey]] = {}
        for domain, selector, key_type, pem in rows:
            kind: KeyType = "rsa" if key_type == "rsa" else "ed25519"
            key = key_from_pem(
                str(pem).encode("ascii"), domain, selector, kind, f"dkim_keys {domain}/{selector}"
            )
            keys.setdefault(domain, []).append(key)
        for found in keys.values():
            found.sort(key=lambda k: (KEY_TYPES.index(k.key_type), k.selector))
        return keys
